"""Operator benchmark behind ``topθ-export bench`` and bench/cpu_bench.py: TopThetaAttention against onnxruntime's
dense attention operators, all as single-node graphs in the same onnxruntime build on the same random inputs.

Dense references: ONNX ``Attention`` (opset 23) and, with ``methods``, ``com.microsoft`` ``MultiHeadAttention``
(no GQA: K/V repeated to the query heads) and ``GroupQueryAttention`` (decode: a cache of T - 1 keys plus the new
one). Calls are interleaved (one call of each method per round, the order rotating) and the median per method is
reported, so that machine load disturbs all methods alike. Thresholds are set per head from the score
distribution so that a chosen fraction of keys is kept (keep 1: θ = -inf, dense Top-θ). The GPU benchmark is
bench/attention_bench.py.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from . import library as runtime

DENSE = "dense_attention"
METHODS = ("toptheta", DENSE, "mha", "gqa")


def _vi(name, shape, t=None):
    from onnx import TensorProto as TP
    from onnx import helper as h

    return h.make_tensor_value_info(name, TP.FLOAT if t is None else t, shape)


def _model(node, inputs, outputs, opsets):
    from onnx import helper as h

    g = h.make_graph([node], node.op_type, inputs, outputs)
    return h.make_model(g, opset_imports=[h.make_opsetid(d, v) for d, v in opsets]).SerializeToString()


def _graphs(hq: int, hkv: int, d: int, scale: float, phase: str, methods=METHODS):
    """Serialized single-node models of `methods` for one phase ('prefill': causal square; 'decode': one row)."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    q, k, v = _vi("q", ["B", hq, "S", d]), _vi("k", ["B", hkv, "T", d]), _vi("v", ["B", hkv, "T", d])
    y = _vi("y", ["B", hq, "S", d])
    causal = 1 if phase == "prefill" else 0
    out = {}
    if "toptheta" in methods:
        tt = h.make_node(
            "TopThetaAttention",
            ["q", "k", "v", "theta", "mask"],
            ["y", "", "", "kept"],
            domain=runtime.DOMAIN,
            scale=scale,
            causal=1,
            num_heads=hq,
            num_kv_heads=hkv,
            comp_mode=0,
        )
        out["toptheta"] = _model(
            tt,
            [q, k, v, _vi("theta", [hq, "R"]), _vi("mask", ["B", "T"], TP.BOOL)],
            [y, _vi("kept", ["B", hq, "S"], TP.INT32)],
            [("", 23), (runtime.DOMAIN, 1)],
        )
    if DENSE in methods:
        # No mask (the key mask fed to Top-θ is all ones). is_causal is top-left aligned: right for the square
        # prefill; the one-row decode sees every key (the bottom-right causal row), so it runs without it.
        att = h.make_node(
            "Attention", ["q", "k", "v"], ["y"], scale=scale, is_causal=causal, q_num_heads=hq, kv_num_heads=hkv
        )
        out[DENSE] = _model(att, [q, k, v], [y], [("", 23)])
    if "mha" in methods:  # query [B, S, Hq*D], key/value [B, Hq, T, D] (K/V repeated: MHA has no GQA)
        mha = h.make_node(
            "MultiHeadAttention",
            ["qs", "kr", "vr"],
            ["ys"],
            domain="com.microsoft",
            num_heads=hq,
            scale=scale,
            unidirectional=causal,
        )
        out["mha"] = _model(
            mha,
            [_vi("qs", ["B", "S", hq * d]), _vi("kr", ["B", hq, "T", d]), _vi("vr", ["B", hq, "T", d])],
            [_vi("ys", ["B", "S", hq * d])],
            [("", 17), ("com.microsoft", 1)],
        )
    if "gqa" in methods:  # always causal (bottom-right); decode: past of T - 1 keys + 1 new
        gqa = h.make_node(
            "GroupQueryAttention",
            ["qs", "kn", "vn", "pk", "pv", "seqlens_k", "total_len"],
            ["ys", "present_k", "present_v"],
            domain="com.microsoft",
            num_heads=hq,
            kv_num_heads=hkv,
            scale=scale,
        )  # presents requested: onnxruntime 1.32 crashes at 32k without them
        out["gqa"] = _model(
            gqa,
            [
                _vi("qs", ["B", "S", hq * d]),
                _vi("kn", ["B", "S", hkv * d]),
                _vi("vn", ["B", "S", hkv * d]),
                _vi("pk", ["B", hkv, "P", d]),
                _vi("pv", ["B", hkv, "P", d]),
                _vi("seqlens_k", ["B"], TP.INT32),
                _vi("total_len", [], TP.INT32),
            ],
            [_vi("ys", ["B", "S", hq * d]), _vi("present_k", ["B", hkv, "T", d]), _vi("present_v", ["B", hkv, "T", d])],
            [("", 17), ("com.microsoft", 1)],
        )
    return out


def thresholds_for_keep(q: np.ndarray, k: np.ndarray, scale: float, keep: float) -> np.ndarray:
    """θ per query head: the (1-keep) quantile of that head's scores (last 8 rows, GQA-aware); -inf for keep 1."""
    hq, hkv = q.shape[1], k.shape[1]
    if keep >= 1:
        return np.full(hq, -np.inf, np.float32)
    kk = np.repeat(k, hq // hkv, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q[:, :, -8:], kk) * scale
    return np.quantile(s.transpose(1, 0, 2, 3).reshape(hq, -1), 1.0 - keep, axis=1).astype(np.float32)


def _feeds(method, q, k, v, theta):
    B, hq, S, d = q.shape
    hkv, T = k.shape[1], k.shape[2]
    bsh = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, x.shape[2], -1))  # noqa: E731
    if method == "toptheta":
        return {"q": q, "k": k, "v": v, "theta": theta[:, None], "mask": np.ones((B, T), bool)}
    if method == DENSE:
        return {"q": q, "k": k, "v": v}
    if method == "mha":
        return {"qs": bsh(q), "kr": np.repeat(k, hq // hkv, axis=1), "vr": np.repeat(v, hq // hkv, axis=1)}
    P = T - S  # prefill: no past; decode: a cache of T - 1 keys
    return {
        "qs": bsh(q),
        "kn": bsh(k[:, :, P:]),
        "vn": bsh(v[:, :, P:]),
        "pk": np.ascontiguousarray(k[:, :, :P]),
        "pv": np.ascontiguousarray(v[:, :, :P]),
        "seqlens_k": np.full(B, T - 1, np.int32),
        "total_len": np.array(T, np.int32),
    }


def _interleaved_ms(sessions, feeds, repeats):
    """Median ms per method; one call of each method per round, the order rotating between rounds."""
    names = list(sessions)
    for n in names:
        for _ in range(2):
            sessions[n].run(None, feeds[n])
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append(time.perf_counter() - t)
    return {n: 1e3 * statistics.median(ts) for n, ts in times.items()}


def _kept_stats(q, k, scale, theta, phase):
    """(kept fraction per head of the valid keys, V rows read: the union over each GQA group, as a fraction)."""
    B, hq, S, _ = q.shape
    hkv, T = k.shape[1], k.shape[2]
    G = hq // hkv
    if phase == "decode":
        s = np.einsum("bhd,bhkd->bhk", q[:, :, 0], np.repeat(k, G, axis=1)) * scale
        keep = s >= theta[None, :, None]
        union = keep.reshape(B, hkv, G, T).any(axis=2)
        return float(keep.mean()), float(union.mean())
    return None, None


def run_suite(
    *,
    heads,
    kv_heads,
    head_dim,
    phase,
    seqs,
    keeps,
    repeats=15,
    batch=1,
    seed=0,
    methods=METHODS,
    device="cpu",
    progress=None,
):
    """Rows of {phase, context, keep, <method>_ms, kept_fraction, v_rows_read} for every (T, keep)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(head_dim)
    providers = runtime.providers_for(device)
    sessions = {}
    for m, blob in _graphs(heads, kv_heads, head_dim, scale, phase, methods).items():
        so = runtime.session_options() if m == "toptheta" else ort.SessionOptions()
        sessions[m] = ort.InferenceSession(blob, so, providers=providers)
    rows = []
    for T in seqs:
        S = T if phase == "prefill" else 1
        k = rng.standard_normal((batch, kv_heads, T, head_dim), dtype=np.float32)
        v = rng.standard_normal((batch, kv_heads, T, head_dim), dtype=np.float32)
        q = rng.standard_normal((batch, heads, S, head_dim), dtype=np.float32)
        for keep in keeps:
            theta = thresholds_for_keep(q, k, scale, keep)
            feeds = {m: _feeds(m, q, k, v, theta) for m in sessions}
            ms = _interleaved_ms(sessions, feeds, repeats)
            row = {"phase": phase, "context": T, "keep": keep, **{f"{m}_ms": t for m, t in ms.items()}}
            if "toptheta" in sessions:
                kept = sessions["toptheta"].run(["kept"], feeds["toptheta"])[0].astype(np.float64)
                valid = np.arange(T - S, T) + 1.0  # causal, bottom-right aligned rows
                row["kept_fraction"] = float(kept.sum() / (valid.sum() * heads * batch))
                row["v_rows_read"] = _kept_stats(q, k, scale, theta, phase)[1]
            rows.append(row)
            if progress:
                progress(row)
    return rows


def run_bench(
    *, device="cpu", heads=8, kv_heads=2, head_dim=64, seqs=(512, 2048), keep=0.125, repeats=20, batch=1, seed=0
):
    """``topθ-export bench``: prefill and decode rows at each context, Top-θ vs ONNX Attention."""
    from .._errors import TopThetaError
    from ..options import check_options

    check_options(
        device=device, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seqs=list(seqs), keep=keep, repeats=repeats
    )
    if heads % kv_heads:
        raise TopThetaError(
            f"--heads {heads} is not a multiple of --kv-heads {kv_heads}: grouped-query attention "
            "shares each kv head among a whole number of query heads"
        )
    rows = []
    providers = runtime.providers_for(device)
    for phase in ("prefill", "decode"):
        for r in run_suite(
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            phase=phase,
            seqs=seqs,
            keeps=[keep],
            repeats=repeats,
            batch=batch,
            seed=seed,
            methods=("toptheta", DENSE),
            device=device,
        ):
            rows.append(
                {
                    "phase": phase,
                    "context": r["context"],
                    "dense_ms": r[f"{DENSE}_ms"],
                    "toptheta_ms": r["toptheta_ms"],
                    "kept_fraction": r["kept_fraction"],
                    "providers": providers,
                }
            )
    rows.sort(key=lambda r: (r["context"], r["phase"] != "prefill"))
    return rows
