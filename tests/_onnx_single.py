"""Single-node ``ai.toptheta::TopThetaAttention`` ONNX models, and a float64 NumPy reference of the op.

Used by the kernel tests and benchmarks. The reference follows docs/op.md line by line and is written
independently of ``topthetaexport.torch.reference`` (PyTorch), so the two check each other.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.toptheta"
OP = "TopThetaAttention"

_ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
}

INPUTS = (
    "query",
    "key",
    "value",
    "thresholds",
    "attn_mask",
    "past_key",
    "past_value",
    "sdc",
    "past_sequence_length",
    "past_shadow_key",
    "past_shadow_range",
)
OUTPUTS = ("output", "present_key", "present_value", "kept", "present_shadow_key", "present_shadow_range")


def make_model(
    dtype: str = "float32",
    *,
    mask: str | None = None,
    past: bool = False,
    sdc: bool = False,
    present: bool = False,
    kept: bool = True,
    past_lens: bool = False,
    shadow: bool | tuple[str, str] = False,
    **attrs,
) -> onnx.ModelProto:
    """A model with one TopThetaAttention node. Inputs/outputs carry no shapes, so one model serves any
    shape and shape errors reach the kernel's own validation.

    ``mask``: None, 'bool', 'float32' or 'float16' (type of input 4). ``attrs``: node attributes
    (scale, causal, num_heads, num_kv_heads, comp_mode). Omitted optional inputs/outputs that sit
    before a used one are passed as '' (the ONNX convention). ``past_lens``: input 8
    ``past_sequence_length`` (int32), the shared-buffer KV-cache form (with ``past`` and ``present``).
    ``shadow``: inputs 9-10 ``past_shadow_key`` (uint8) / ``past_shadow_range`` (T) and outputs 4-5, the shadow K
    (a pair of type names instead of True: the inputs' declared types, to reach the op's type checks).
    """
    t = _ONNX_TYPES[dtype]

    def vi(name, elem):
        return helper.make_tensor_value_info(name, elem, None)

    used_in = {
        "query": vi("query", t),
        "key": vi("key", t),
        "value": vi("value", t),
        "thresholds": vi("thresholds", TensorProto.FLOAT),
    }
    if mask:
        used_in["attn_mask"] = vi("attn_mask", _ONNX_TYPES[mask])
    if past:
        used_in["past_key"] = vi("past_key", t)
        used_in["past_value"] = vi("past_value", t)
    if sdc:
        used_in["sdc"] = vi("sdc", TensorProto.FLOAT)
    if past_lens:
        used_in["past_sequence_length"] = vi("past_sequence_length", TensorProto.INT32)
    if shadow:
        codes_t, range_t = shadow if isinstance(shadow, tuple) else ("uint8", dtype)
        used_in["past_shadow_key"] = vi("past_shadow_key", _ONNX_TYPES[codes_t])
        used_in["past_shadow_range"] = vi("past_shadow_range", _ONNX_TYPES[range_t])
    used_out = {"output": vi("output", t)}
    if present:
        used_out["present_key"] = vi("present_key", t)
        used_out["present_value"] = vi("present_value", t)
    if kept:
        used_out["kept"] = vi("kept", TensorProto.INT32)
    if shadow:
        used_out["present_shadow_key"] = vi("present_shadow_key", TensorProto.UINT8)
        used_out["present_shadow_range"] = vi("present_shadow_range", t)

    node = helper.make_node(
        OP,
        _names(INPUTS, used_in),
        _names(OUTPUTS, used_out),
        domain=DOMAIN,
        name="tt0",
        **{k: v for k, v in attrs.items() if v is not None},
    )
    graph = helper.make_graph([node], "toptheta_single", list(used_in.values()), list(used_out.values()))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=10
    )
    return model


def _names(all_names, used):
    last = max(i for i, n in enumerate(all_names) if n in used)
    return [n if n in used else "" for n in all_names[: last + 1]]


def session(model: onnx.ModelProto, library=None, threads: int | None = None):
    """An onnxruntime CPU session for ``model`` with the Top-θ library registered."""
    import onnxruntime as ort

    from topthetaexport.ort import library as runtime

    so = runtime.session_options(threads=threads, library=library)
    so.log_severity_level = 4  # errors reach the caller as exceptions; keep stderr quiet
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def run(sess, **feeds):
    """Runs ``sess`` on the feeds that are inputs of its model (None values and names the model does
    not have are skipped); returns a dict of outputs."""
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    res = sess.run(names, {k: v for k, v in feeds.items() if v is not None and k in inputs})
    return dict(zip(names, res))


def pack(x: np.ndarray) -> np.ndarray:
    """[B, H, S, D] -> [B, S, H·D], the op's packed layout (what the graph has before it splits heads)."""
    B, H, S, D = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, S, H * D))


def assert_packed_equals_heads_first(sess, feeds: dict) -> dict:
    """Runs ``sess`` on ``feeds`` (query/key/value heads first) and again with them packed: the packed output is the
    heads-first one packed, bit for bit, and the kept counts and present K/V are the same. Returns the heads-first
    outputs."""
    heads_first = run(sess, **{n: (v.copy() if isinstance(v, np.ndarray) else v) for n, v in feeds.items()})
    packed = run(sess, **{**feeds, **{n: pack(feeds[n]) for n in ("query", "key", "value")}})
    B, Hq, Sq, Dv = heads_first["output"].shape
    assert packed["output"].shape == (B, Sq, Hq * Dv)
    np.testing.assert_array_equal(packed["output"], pack(heads_first["output"]))
    np.testing.assert_array_equal(packed["kept"], heads_first["kept"])
    for n in ("present_key", "present_value"):
        if n in heads_first:
            np.testing.assert_array_equal(packed[n], heads_first[n])
    return heads_first


# ---------------------------------------------------------------------------------------------
# float64 reference of docs/op.md


def _valid_and_additive(mask, b, h, Sq, Ktot):
    """(valid [Sq, Ktot] bool, additive [Sq, Ktot] float64) of batch b, head h."""
    if mask is None:
        return np.ones((Sq, Ktot), bool), np.zeros((Sq, Ktot))
    m = mask[min(b, mask.shape[0] - 1)] if mask.ndim == 2 else mask
    if mask.ndim == 2:
        m = np.broadcast_to(m[None, :], (Sq, Ktot))
    else:
        m = np.broadcast_to(m[min(b, m.shape[0] - 1), min(h, m.shape[1] - 1)], (Sq, Ktot))
    if m.dtype == np.bool_:
        return m.copy(), np.zeros((Sq, Ktot))
    cut = -65504.0 if m.dtype == np.float16 else -1e30
    a = m.astype(np.float64)
    valid = a > cut
    return valid, np.where(valid, a, 0.0)


def key_lens(B, Ktot, past_lens=None, Sk=None):
    """Keys of each batch row, Ktot_b: P_b + Sk in the shared form (``past_lens`` [B] or [1]), else Ktot."""
    if past_lens is None:
        return np.full(B, Ktot, np.int64)
    return np.broadcast_to(np.asarray(past_lens, np.int64).reshape(-1), (B,)) + Sk


def reference(
    q,
    k,
    v,
    thresholds,
    mask=None,
    past_key=None,
    past_value=None,
    sdc=None,
    *,
    scale=0.0,
    causal=0,
    comp_mode=0,
    past_lens=None,
):
    """float64 TopThetaAttention: returns (output, kept, scores) with scores [B, Hq, Sq, Ktot]
    (NaN where the key is not valid), for tests that need to know how close scores are to θ.

    ``past_lens`` ([B] or [1]): the shared-buffer form; past_key/past_value are then the [B, Hkv, M, *]
    buffers, batch row b attends over their first P_b rows followed by k/v, the mask is [B, M] (or 4-D
    with M keys) and scores are [B, Hq, Sq, M]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if past_lens is not None:
        Ktot = past_key.shape[2]  # M
        lens = key_lens(B, Ktot, past_lens, Sk)
        pk, pv = np.asarray(past_key, np.float64), np.asarray(past_value, np.float64)
        keys = [np.concatenate([pk[b, :, : lens[b] - Sk], k[b]], axis=1) for b in range(B)]
        vals = [np.concatenate([pv[b, :, : lens[b] - Sk], v[b]], axis=1) for b in range(B)]
    else:
        if past_key is not None:
            k = np.concatenate([np.asarray(past_key, np.float64), k], axis=2)
            v = np.concatenate([np.asarray(past_value, np.float64), v], axis=2)
        Ktot = k.shape[2]
        lens = key_lens(B, Ktot)
        keys, vals = list(k), list(v)
    Hkv, Dv = k.shape[1], v.shape[3]
    R = thresholds.shape[1]
    scale = scale or 1.0 / np.sqrt(D)
    th = np.asarray(thresholds, np.float64)
    rho_all = None if sdc is None else np.asarray(sdc, np.float64)
    out = np.zeros((B, Hq, Sq, Dv))
    kept = np.zeros((B, Hq, Sq), np.int32)
    scores = np.full((B, Hq, Sq, Ktot), np.nan)
    for b in range(B):
        Kb = int(lens[b])
        for h in range(Hq):
            g = h // (Hq // Hkv)
            valid, add = _valid_and_additive(mask, b, h, Sq, Ktot)
            valid, add = valid[:, :Kb], add[:, :Kb]
            s_all = scale * (q[b, h] @ keys[b][g].T) + add
            for i in range(Sq):
                r = Kb - Sq + i
                rr = min(r, R - 1)
                theta = th[h, rr]
                ok = valid[i].copy()
                if causal:
                    ok[r + 1 :] = False
                s = s_all[i]
                scores[b, h, i, :Kb][ok] = s[ok]
                keep = ok & (s >= theta)
                n_valid, n_kept = int(ok.sum()), int(keep.sum())
                m = max(theta, s[keep].max()) if n_kept else theta
                w = np.exp(s[keep] - m)
                dk, num = w.sum(), w @ vals[b][g][keep]
                n_pruned = n_valid - n_kept
                dp = 0.0
                if comp_mode >= 1 and rho_all is not None and n_pruned > 0:
                    dp = n_pruned * rho_all[h, rr] * (np.exp(theta - m) if n_kept else 1.0)
                if comp_mode == 2 and dp > 0:
                    num = num + dp * vals[b][g][ok].mean(axis=0)
                den = dk + dp
                out[b, h, i] = num / den if den > 0 else 0.0
                kept[b, h, i] = n_kept
    return out, kept, scores


def untie_thresholds(thresholds, scores, gap=1e-3, lens=None):
    """Moves every finite θ[h, rr] away from the scores it is compared with (|s - θ| >= gap), so that
    float32 and float64 agree on which keys are kept. ``scores`` from ``reference``; ``lens``: the keys of
    each batch row (``key_lens``; default: every row has all of them)."""
    th = np.array(thresholds, np.float32, copy=True)
    B, Hq, Sq, Ktot = scores.shape
    R = th.shape[1]
    lens = key_lens(B, Ktot) if lens is None else lens
    rr_of = np.minimum(np.asarray(lens)[:, None] - Sq + np.arange(Sq)[None, :], R - 1)  # [B, Sq]
    for h in range(Hq):
        for rr in range(R):
            if not np.isfinite(th[h, rr]):
                continue
            s = scores[:, h][rr_of == rr].ravel()
            s = np.sort(s[np.isfinite(s)])
            t = float(th[h, rr])
            while s.size and np.abs(s - t).min() < gap:
                t += gap
            th[h, rr] = t
    return th
