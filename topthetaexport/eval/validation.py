"""Validate an exported Top-θ model: parity with PyTorch, accuracy against dense, measured sparsity.

Everything about the ONNX model is measured by running it in onnxruntime with the custom-op library:
logits come from the real session, kept counts from the operator's own ``kept`` output. This module plans
the runs and writes the report; the measuring is ``measure.py``'s.

Parity is judged against the PyTorch Top-θ reference *pinned to onnxruntime's keep decisions* (recomputed
in float64 from the Q and K each node received, which is what the CPU kernel decides) and run in float64: what
is left is the onnxruntime graph's own float32 rounding. The same pinned run in float32 is reported next to the
dense float32 floor (both are the two runtimes' float32 rounding added up). Rows where the unpinned PyTorch run
decides differently are counted as decision flips. A float16 / bfloat16 graph is compared with the same float32
PyTorch model, at a tolerance for its own rounding (``PARITY_TOLS``). Thread counts are pinned (and reported)
so that two runs give the same numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import TopThetaError
from ..data import describe_data
from ..ort.sessions import OnnxModel
from ..progress import Progress, emitter
from .measure import (
    Agreement,
    KeptElements,
    Perplexity,
    RowKept,
    decode_through_cache,
    float64_weights,
    fp64_keep_masks,
    kept_count_diff,
    kept_counts,
    layer_windows,
    model_output,
    operator_parity,
    pinned_threads,
    read_op_attrs,
    v_rows_read,
    valid_counts,
)

PARITY_TOL = 1e-4
# max abs difference allowed per graph dtype, for the operator (against its fp64 reference) and as the model's
# least tolerance: float16/bfloat16 graphs round every activation (2^-11 / 2^-8 relative), far above float32's 1e-4
PARITY_TOLS = {"float32": PARITY_TOL, "float16": 1e-2, "bfloat16": 8e-2}
# A float16/bfloat16 model's logits move with their own scale (SmolLM2-135M's reach |33|: its dense bfloat16 logits
# differ from float32 by up to 0.57 in PyTorch), so its parity is judged against the dense floor of the same graph:
# within FLOOR_FACTOR times what θ = -inf through the same graph differs from dense PyTorch.
FLOOR_FACTOR = 2.0


def model_tolerance(dtype: str | None, dense_floor: float) -> float:
    """The model parity tolerance: the dtype's absolute one, widened for float16/bfloat16 to FLOOR_FACTOR times the
    dense floor (onnxruntime's θ = -inf run of the same graph against dense PyTorch)."""
    tol = PARITY_TOLS.get(dtype or "float32", PARITY_TOL)
    return tol if dtype in (None, "float32") else max(tol, FLOOR_FACTOR * dense_floor)


def validate(
    out_dir: str | os.PathLike | None = None,
    *,
    model: Any = None,
    onnx_path: Any = None,
    thresholds: Any = None,
    data: Any = "builtin:pydoc",
    seq_len: int | None = None,
    num_windows: int = 4,
    skip: int | None = None,
    decode_steps: int = 16,
    device: str = "cpu",
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the Top-θ ONNX model and its PyTorch counterparts on held-out windows; return the report dict.

    ``out_dir`` is a folder written by the pipeline (model.onnx + thresholds.*); the explicit arguments
    override its parts. ``skip`` defaults to the number of calibration windows so that evaluation text is
    held out from calibration. ``threads``: intra-op threads of torch and of every onnxruntime session
    (default ``measure.DEFAULT_THREADS``), pinned for the whole validation.
    """
    from ..data import as_token_tensor
    from ..models import load_model
    from ..thresholds import Thresholds

    step = emitter(progress, "validate")
    out_dir = Path(out_dir) if out_dir else None
    onnx_path = Path(onnx_path) if onnx_path else (out_dir / "model.onnx" if out_dir else None)
    if onnx_path is None:
        raise TopThetaError("validate needs an output folder or --onnx: pass the folder written by topθ-export")
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.load(thresholds or out_dir)
    attrs = read_op_attrs(onnx_path)
    comp_mode = int(next(iter(attrs.values())).get("comp_mode", 0))
    loaded = (
        model
        if model is not None and not isinstance(model, (str, os.PathLike))
        else load_model(model or th.meta.get("model_path") or th.meta.get("model"))
    )
    th.check_compatible(loaded)
    seq_len = int(seq_len or th.meta.get("seq_len") or 512)
    skip = int(th.meta.get("num_samples", 0) if skip is None else skip)

    step("loading held-out text", 0.0)
    tokens = as_token_tensor(data, loaded.tokenizer, seq_len=seq_len, num_samples=num_windows, skip=skip)
    with pinned_threads(threads) as n_threads:
        report = _measure(loaded, th, attrs, comp_mode, onnx_path, tokens, decode_steps, device, n_threads, step)
    report.update(
        {
            "onnx": str(onnx_path),
            "data": describe_data(data),
            "held_out_skip": skip,
            "threads": {"onnxruntime_intra_op": n_threads, "torch": n_threads},
        }
    )
    step("done", 1.0)
    first = ("model", "dtype", "onnx", "providers", "data", "seq_len", "windows", "held_out_skip", "threads")
    return {**{key: report[key] for key in first}, **report}


def _measure(
    loaded: Any,
    th: Any,
    attrs: dict[int, dict[str, Any]],
    comp_mode: int,
    onnx_path: Path,
    tokens: Any,
    decode_steps: int,
    device: str,
    threads: int,
    step: Any,
) -> dict[str, Any]:
    """Every run of the validation, with threads already pinned; the report without its provenance keys."""
    step("opening onnxruntime session", 0.05)
    n_win, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    # max_length: a shared-form KV cache holds the decode check's whole window
    om = OnnxModel(onnx_path, device=device, threads=threads, with_kept=True, expose_io=True, max_length=seq_len)
    om_dense = OnnxModel(onnx_path, device=device, threads=threads, theta_fill=float("-inf"))
    causal, is_lm, net = bool(loaded.causal), bool(loaded.is_lm), loaded.model
    valid = valid_counts(seq_len, causal)
    elements = KeptElements(th.num_layers, layer_windows(th.meta, th.num_layers))
    ppl = {key: Perplexity() for key in ("dense", "toptheta_onnx", "toptheta_torch", "toptheta_torch_pinned")}
    agree = Agreement()
    d_ref = d_pinned = d_pinned32 = d_dense = floor = 0.0
    flips = {"rows_compared": 0, "rows_with_different_kept_count": 0}
    pin_misses = 0
    cos = []
    t_ort = 0.0
    for w in range(n_win):
        ids = tokens[w : w + 1]
        ids_np = ids.numpy()
        step(f"window {w + 1}/{n_win}", 0.1 + 0.7 * w / n_win)
        dense = model_output(net, ids, is_lm, "dense")
        rec = RowKept()
        ref = model_output(net, ids, is_lm, "toptheta", thresholds=th, comp_mode=comp_mode, recorder=rec)
        t1 = time.perf_counter()
        res = om.run(ids_np)
        t_ort += time.perf_counter() - t1
        out = res.output.astype(np.float32)
        keep = fp64_keep_masks(res.io, attrs, th)
        pin_misses += kept_count_diff(res.kept, kept_counts(keep))["rows_with_different_kept_count"]
        pinned32 = model_output(net, ids, is_lm, "toptheta", thresholds=th, comp_mode=comp_mode, keep_masks=keep)
        with float64_weights(net):
            pinned = model_output(net, ids, is_lm, "toptheta", thresholds=th, comp_mode=comp_mode, keep_masks=keep)
        del keep
        window_flips = kept_count_diff(res.kept, rec.kept)
        for key in flips:
            flips[key] += window_flips[key]
        if w == 0:
            decisions = window_flips
            op_par = operator_parity(res.io, attrs, th)
        res.io.clear()
        floor = max(floor, float(np.abs(om_dense.run(ids_np).output.astype(np.float32) - dense).max()))
        d_ref = max(d_ref, float(np.abs(out - ref).max()))
        d_pinned = max(d_pinned, float(np.abs(out.astype(np.float64) - pinned).max()))
        d_pinned32 = max(d_pinned32, float(np.abs(out - pinned32).max()))
        d_dense = max(d_dense, float(np.abs(out - dense).max()))
        elements.add(res.kept, valid)
        if is_lm:
            agree.add(out, dense)
            for key, lg in (
                ("dense", dense),
                ("toptheta_onnx", out),
                ("toptheta_torch", ref),
                ("toptheta_torch_pinned", pinned),
            ):
                ppl[key].add(lg, ids_np)
        else:
            a, b = out.mean(1), dense.mean(1)
            cos.append(float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))))

    from ..onnx.summary import graph_dtype, graph_kv_cache

    dtype = graph_dtype(onnx_path)
    op_tol = PARITY_TOLS.get(dtype or "float32", PARITY_TOL)
    tol = model_tolerance(dtype, floor)
    report: dict[str, Any] = {
        "model": loaded.name,
        "dtype": dtype,
        "kv_cache": graph_kv_cache(onnx_path),
        "providers": om.providers,
        "seq_len": seq_len,
        "windows": n_win,
        "k": th.meta.get("k"),
        "comp_mode": comp_mode,
        "dense_layers": th.dense_layers,
        "parity": {
            "max_abs_diff_vs_torch_toptheta_pinned": d_pinned,
            "max_abs_diff_vs_torch_toptheta_pinned_fp32": d_pinned32,
            "max_abs_diff_vs_torch_toptheta": d_ref,
            "max_abs_diff_vs_torch_dense": d_dense,
            "dense_fp32_floor": floor,
            "operator_max_abs_diff_vs_fp64_reference": op_par["max_abs_diff"],
            "operator_per_layer": op_par["per_layer"],
            "tolerance": tol,
            "tolerance_rule": "absolute" if tol == op_tol else f"{FLOOR_FACTOR:g} x dense floor",
            "operator_tolerance": op_tol,
            # the pinned comparison is only ORT's decisions if the recomputed masks reproduce its kept counts
            "pass": d_pinned <= tol and pin_misses == 0,
            "operator_pass": op_par["max_abs_diff"] <= op_tol,
            "decision_flips": flips["rows_with_different_kept_count"],
            "decision_flips_rows_compared": flips["rows_compared"],
            "pinned_rows_differing_from_ort": pin_misses,
            "keep_decisions_window0": decisions,
        },
        "attention_elements": elements.summary(th.dense_layers),
        "onnx_seconds_per_window": t_ort / max(n_win, 1),
    }
    if is_lm:
        report["top1_agreement_vs_dense"] = agree.value
        report["perplexity"] = {key: m.value for key, m in ppl.items()}
        report["perplexity"]["relative_change"] = ppl["toptheta_onnx"].value / ppl["dense"].value - 1.0
        report["perplexity"]["tokens"] = ppl["dense"].tokens
        step("compensation variants", 0.8)
        report["compensation"] = _compensation_variants(
            onnx_path, tokens.numpy(), comp_mode, ppl["toptheta_onnx"].value, ppl["dense"].value, device, threads
        )
    else:
        report["embedding_cosine_vs_dense"] = {"mean": float(np.mean(cos)), "min": float(np.min(cos))}
    if is_lm and om.has_cache and decode_steps > 0:
        step("decode with the KV cache", 0.85)
        dec = decode_through_cache(
            om, tokens[0].numpy()[None, :], decode_steps, th.dense_layers, attrs=attrs, thresholds=th
        )
        report["decode"] = v_rows_read(dec, vmc=comp_mode == 2, per="step")
    return report


def _compensation_variants(
    onnx_path: Path, tokens: np.ndarray, comp_mode: int, ppl_main: float, ppl_dense: float, device: str, threads: int
) -> dict[str, Any]:
    """Perplexity through onnxruntime for every compensation mode (same graph, comp_mode overridden)."""
    names = {0: "none", 1: "sdc", 2: "sdc+vmc"}
    out = {}
    for mode in (0, 1, 2):
        if mode == comp_mode:
            ppl = ppl_main
        else:
            om = OnnxModel(onnx_path, device=device, threads=threads, comp_mode=mode)
            meter = Perplexity()
            for w in range(tokens.shape[0]):
                meter.add(om.run(tokens[w : w + 1]).output, tokens[w : w + 1])
            ppl = meter.value
        out[names[mode]] = {"comp_mode": mode, "perplexity": ppl, "relative_change": ppl / ppl_dense - 1.0}
    return out
