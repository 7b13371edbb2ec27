"""Quick operator benchmark behind ``topθ-export bench``: TopThetaAttention vs ONNX's dense Attention.

Both run as single-node graphs in the same onnxruntime build, on the same random inputs, timed back to back
(median of ``repeats`` after warm-up). Thresholds are set per head from the score distribution so that a
chosen fraction of keys is kept. The GPU benchmark with torch SDPA and ORT's fused kernels is bench/.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from . import library as runtime


def _graphs(hq: int, hkv: int, d: int, scale: float):
    from onnx import TensorProto as TP
    from onnx import helper as h

    def vi(name, shape, t=TP.FLOAT):
        return h.make_tensor_value_info(name, t, shape)

    q, k, v = vi("q", ["B", hq, "S", d]), vi("k", ["B", hkv, "T", d]), vi("v", ["B", hkv, "T", d])
    y = vi("y", ["B", hq, "S", d])
    mask = vi("mask", ["B", "T"], TP.BOOL)
    theta = vi("theta", [hq, "R"])
    kept = vi("kept", ["B", hq, "S"], TP.INT32)
    tt = h.make_node("TopThetaAttention", ["q", "k", "v", "theta", "mask"], ["y", "", "", "kept"],
                     domain=runtime.DOMAIN, scale=scale, causal=1, num_heads=hq, num_kv_heads=hkv, comp_mode=0)
    g_tt = h.make_graph([tt], "tt", [q, k, v, theta, mask], [y, kept])
    m_tt = h.make_model(g_tt, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(runtime.DOMAIN, 1)])
    # Dense references: ONNX Attention (opset 23) without a mask (the key mask fed to Top-θ is all ones).
    # Its is_causal is top-left aligned, so it is right only for a square prefill; a one-row decode sees every
    # key, which is the bottom-right causal row, so it runs without is_causal.
    dense = {}
    for phase, causal in (("prefill", 1), ("decode", 0)):
        att = h.make_node("Attention", ["q", "k", "v"], ["y"], scale=scale, is_causal=causal,
                          q_num_heads=hq, kv_num_heads=hkv)
        g_d = h.make_graph([att], f"dense_{phase}", [q, k, v], [y])
        dense[phase] = h.make_model(g_d, opset_imports=[h.make_opsetid("", 23)]).SerializeToString()
    return m_tt.SerializeToString(), dense


def _median_ms(sess, feeds, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def thresholds_for_keep(q: np.ndarray, k: np.ndarray, scale: float, keep: float) -> np.ndarray:
    """θ per query head: the (1-keep) quantile of that head's scores (GQA-aware)."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = np.repeat(k, hq // hkv, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q[:, :, -8:], kk) * scale
    return np.quantile(s.transpose(1, 0, 2, 3).reshape(hq, -1), 1.0 - keep, axis=1).astype(np.float32)


def run_bench(*, device="cpu", heads=8, kv_heads=2, head_dim=64, seqs=(512, 2048), keep=0.125,
              repeats=20, batch=1, seed=0):
    import onnxruntime as ort

    from .._errors import TopThetaError
    from .._io import check_options

    check_options(device=device, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seqs=list(seqs), keep=keep,
                  repeats=repeats)
    if heads % kv_heads:
        raise TopThetaError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}: grouped-query attention "
                            "shares each kv head among a whole number of query heads")
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(head_dim)
    m_tt, m_dense = _graphs(heads, kv_heads, head_dim, scale)
    providers = runtime.providers_for(device)
    s_tt = ort.InferenceSession(m_tt, runtime.session_options(), providers=providers)
    s_dense = {phase: ort.InferenceSession(m, providers=providers) for phase, m in m_dense.items()}
    rows = []
    for T in seqs:
        k = rng.standard_normal((batch, kv_heads, T, head_dim), dtype=np.float32)
        v = rng.standard_normal((batch, kv_heads, T, head_dim), dtype=np.float32)
        for phase, S in (("prefill", T), ("decode", 1)):
            q = rng.standard_normal((batch, heads, S, head_dim), dtype=np.float32)
            theta = np.repeat(thresholds_for_keep(q, k, scale, keep)[:, None], 1, axis=1)
            feeds = {"q": q, "k": k, "v": v}
            dense_ms = _median_ms(s_dense[phase], feeds, repeats)
            tt_feeds = {**feeds, "theta": theta, "mask": np.ones((batch, T), bool)}
            tt_ms = _median_ms(s_tt, tt_feeds, repeats)
            kept = s_tt.run(["kept"], tt_feeds)[0].astype(np.float64)
            valid = np.arange(T - S, T) + 1.0  # causal, bottom-right aligned rows
            rows.append({"phase": phase, "context": T, "dense_ms": dense_ms, "toptheta_ms": tt_ms,
                         "kept_fraction": float(kept.sum() / (valid.sum() * heads * batch)),
                         "providers": providers})
    return rows
