"""Validate an exported Top-θ model: parity with PyTorch, accuracy against dense, measured sparsity.

Everything about the ONNX model is measured by running it in onnxruntime with the custom-op library:
logits come from the real session, kept counts from the operator's own ``kept`` output.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import TopThetaError
from ..data import describe_data
from ..onnx.names import IO_PREFIX
from ..ort.sessions import OnnxModel
from ..progress import Progress, emitter

PARITY_TOL = 1e-4


def _read_op_attrs(model_path: Path) -> dict[int, dict[str, Any]]:
    """Attributes of every TopThetaAttention node, by layer (from its threshold initializer's name)."""
    import onnx

    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes the one-line error
        raise TopThetaError(f"{model_path} is not a valid ONNX model ({str(e).splitlines()[0][:200]}): re-export it") from None
    attrs = {}
    for node in m.graph.node:
        if node.op_type == "TopThetaAttention":
            layer = int(node.input[3].rsplit(".", 1)[-1]) if "." in node.input[3] else len(attrs)
            attrs[layer] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not attrs:
        raise TopThetaError(f"{model_path} has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
    return attrs


def _op_parity(io: dict[str, np.ndarray], attrs: dict[int, dict[str, Any]], th) -> dict[str, Any]:
    """Each TopThetaAttention's output in onnxruntime vs the float64 PyTorch reference on the same inputs."""
    import torch

    from ..torch.reference import toptheta_attention

    per_layer = {}
    for layer, a in sorted(attrs.items()):
        pre = f"{IO_PREFIX}{layer}."
        if pre + "y" not in io:
            continue
        t = {n: torch.from_numpy(io[pre + n]) for n in ("q", "k", "v", "mask", "y") if pre + n in io}
        theta, sdc = th.layer(layer)
        ref = toptheta_attention(t["q"].double(), t["k"].double(), t["v"].double(), theta,
                                 scale=float(a.get("scale", 0.0)) or None, causal=bool(a.get("causal", 0)),
                                 attn_mask=t.get("mask"), sdc=sdc, comp_mode=int(a.get("comp_mode", 0)))
        per_layer[layer] = float((ref - t["y"].double()).abs().max())
    worst = max(per_layer.values()) if per_layer else float("nan")
    return {"max_abs_diff": worst, "per_layer": [per_layer[k] for k in sorted(per_layer)]}


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the token count (float64)."""
    lg = logits[:, :-1, :].astype(np.float64)
    tgt = ids[:, 1:]
    mx = lg.max(-1, keepdims=True)
    lse = (np.log(np.exp(lg - mx).sum(-1, keepdims=True)) + mx)[..., 0]
    picked = np.take_along_axis(lg, tgt[..., None], -1)[..., 0]
    return float((lse - picked).sum()), int(tgt.size)


def _valid_counts(seq: int, causal: bool, past: int = 0) -> np.ndarray:
    """Number of valid keys for each query row of an unpadded sequence."""
    rows = np.arange(past, past + seq)
    return rows + 1 if causal else np.full(seq, past + seq)


class _RowRecorder:
    """Keeps the per-row kept counts of the last PyTorch Top-θ forward, by layer."""

    def __init__(self):
        self.kept: dict[int, np.ndarray] = {}

    def record(self, layer: int, kept, n_valid) -> None:
        self.kept[layer] = kept.detach().cpu().numpy().astype(np.int64)


def _decision_diff(ort_kept: dict[int, np.ndarray], torch_kept: dict[int, np.ndarray]) -> dict[str, Any]:
    """Rows whose kept count differs between onnxruntime and PyTorch (borderline keep decisions)."""
    rows = diff = 0
    first = None
    for layer in sorted(ort_kept):
        a, b = ort_kept[layer].astype(np.int64), torch_kept.get(layer)
        if b is None or a.shape != b.shape:
            continue
        d = int((a != b).sum())
        rows += a.size
        diff += d
        if d and first is None:
            first = layer
    return {"rows_compared": rows, "rows_with_different_kept_count": diff, "first_layer_differing": first}


class _Sparsity:
    def __init__(self, num_layers: int, dense_layers: list[int]):
        self.kept = np.zeros(num_layers)
        self.valid = np.zeros(num_layers)
        self.dense_layers = set(dense_layers)

    def add(self, kept: dict[int, np.ndarray], valid_per_row: np.ndarray):
        for layer, k in kept.items():  # k: [B, Hq, S]
            self.kept[layer] += float(k.astype(np.float64).sum())
            self.valid[layer] += float(valid_per_row.sum()) * k.shape[0] * k.shape[1]

    def summary(self) -> dict[str, Any]:
        sparse = [i for i in range(len(self.kept)) if i not in self.dense_layers]
        tot_k, tot_v = self.kept.sum(), self.valid.sum()
        sk, sv = self.kept[sparse].sum(), self.valid[sparse].sum()
        return {
            "kept_fraction": float(tot_k / max(tot_v, 1)),
            "reduction": float(tot_v / max(tot_k, 1)),
            "sparse_layers_kept_fraction": float(sk / max(sv, 1)),
            "sparse_layers_reduction": float(sv / max(sk, 1)),
            "per_layer_kept_fraction": [float(k / max(v, 1)) for k, v in zip(self.kept, self.valid)],
        }


def validate(out_dir: str | os.PathLike | None = None, *, model=None, onnx_path=None, thresholds=None,
             data="builtin:pydoc", seq_len: int | None = None, num_windows: int = 4, skip: int | None = None,
             decode_steps: int = 16, device: str = "cpu", threads: int | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Run the Top-θ ONNX model and its PyTorch counterparts on held-out windows; return the report dict.

    ``out_dir`` is a folder written by the pipeline (model.onnx + thresholds.*); the explicit arguments
    override its parts. ``skip`` defaults to the number of calibration windows so that evaluation text is
    held out from calibration.
    """
    import torch

    from ..data import as_token_tensor
    from ..models import load_model
    from ..thresholds import Thresholds
    from ..torch.attention import attention_mode

    step = emitter(progress, "validate")
    out_dir = Path(out_dir) if out_dir else None
    onnx_path = Path(onnx_path) if onnx_path else (out_dir / "model.onnx" if out_dir else None)
    if onnx_path is None:
        raise TopThetaError("validate needs an output folder or --onnx: pass the folder written by topθ-export")
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.load(thresholds or out_dir)
    attrs = _read_op_attrs(onnx_path)
    comp_mode = int(next(iter(attrs.values())).get("comp_mode", 0))
    loaded = model if model is not None and not isinstance(model, (str, os.PathLike)) else load_model(
        model or th.meta.get("model_path") or th.meta.get("model"))
    th.check_compatible(loaded)
    seq_len = int(seq_len or th.meta.get("seq_len") or 512)
    skip = int(th.meta.get("num_samples", 0) if skip is None else skip)

    step("loading held-out text", 0.0)
    tokens = as_token_tensor(data, loaded.tokenizer, seq_len=seq_len, num_samples=num_windows, skip=skip)
    step("opening onnxruntime session", 0.05)
    om = OnnxModel(onnx_path, device=device, threads=threads, with_kept=True, expose_io=True)
    causal = bool(loaded.causal)
    sp = _Sparsity(th.num_layers, th.dense_layers)
    d_ref = d_dense = 0.0
    agree = n_pos = 0
    nll = {"dense": 0.0, "toptheta_onnx": 0.0, "toptheta_torch": 0.0}
    n_tok = 0
    cos = []
    t_ort = 0.0
    model_t = loaded.model
    for w in range(tokens.shape[0]):
        ids = tokens[w:w + 1]
        step(f"window {w + 1}/{tokens.shape[0]}", 0.1 + 0.7 * w / tokens.shape[0])
        with torch.no_grad():
            with attention_mode(model_t, "dense"):
                dense = _model_output(model_t, ids, loaded.is_lm)
            rec = _RowRecorder()
            with attention_mode(model_t, "toptheta", thresholds=th, comp_mode=comp_mode, recorder=rec):
                ref = _model_output(model_t, ids, loaded.is_lm)
        t1 = time.perf_counter()
        res = om.run(ids.numpy())
        t_ort += time.perf_counter() - t1
        out = res.output.astype(np.float32)
        if w == 0:
            decisions = _decision_diff(res.kept, rec.kept)
            op_par = _op_parity(res.io, attrs, th)
            res.io.clear()
            floor = _dense_floor(onnx_path, ids.numpy(), dense, device, threads)
        d_ref = max(d_ref, float(np.abs(out - ref).max()))
        d_dense = max(d_dense, float(np.abs(out - dense).max()))
        sp.add(res.kept, _valid_counts(seq_len, causal))
        if loaded.is_lm:
            agree += int((out.argmax(-1) == dense.argmax(-1)).sum())
            n_pos += out.shape[1]
            for key, lg in (("dense", dense), ("toptheta_onnx", out), ("toptheta_torch", ref)):
                s, n = _nll(lg, ids.numpy())
                nll[key] += s
            n_tok += n
        else:
            a, b = out.mean(1), dense.mean(1)
            cos.append(float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))))

    report: dict[str, Any] = {
        "model": loaded.name,
        "onnx": str(onnx_path),
        "providers": om.providers,
        "data": describe_data(data),
        "seq_len": seq_len,
        "windows": int(tokens.shape[0]),
        "held_out_skip": skip,
        "k": th.meta.get("k"),
        "comp_mode": comp_mode,
        "dense_layers": th.dense_layers,
        "parity": {
            "max_abs_diff_vs_torch_toptheta": d_ref,
            "max_abs_diff_vs_torch_dense": d_dense,
            "dense_fp32_floor": floor,
            "operator_max_abs_diff_vs_fp64_reference": op_par["max_abs_diff"],
            "operator_per_layer": op_par["per_layer"],
            "tolerance": PARITY_TOL,
            "pass": d_ref <= PARITY_TOL,
            "operator_pass": op_par["max_abs_diff"] <= PARITY_TOL,
            "keep_decisions_window0": decisions,
        },
        "attention_elements": sp.summary(),
        "onnx_seconds_per_window": t_ort / max(tokens.shape[0], 1),
    }
    report["attention_elements"]["dense_per_row"] = float(_valid_counts(seq_len, causal).mean())
    report["attention_elements"]["kept_per_row"] = (
        report["attention_elements"]["dense_per_row"] * report["attention_elements"]["kept_fraction"])
    if loaded.is_lm:
        ppl = {k: math.exp(v / max(n_tok, 1)) for k, v in nll.items()}
        report["top1_agreement_vs_dense"] = agree / max(n_pos, 1)
        report["perplexity"] = {
            "dense": ppl["dense"],
            "toptheta_onnx": ppl["toptheta_onnx"],
            "toptheta_torch": ppl["toptheta_torch"],
            "relative_change": ppl["toptheta_onnx"] / ppl["dense"] - 1.0,
            "tokens": n_tok,
        }
    else:
        report["embedding_cosine_vs_dense"] = {"mean": float(np.mean(cos)), "min": float(np.min(cos))}
    if loaded.is_lm:
        step("compensation variants", 0.8)
        report["compensation"] = _compensation_variants(onnx_path, tokens.numpy(), comp_mode,
                                                        report["perplexity"]["toptheta_onnx"],
                                                        ppl["dense"], device, threads)
    if loaded.is_lm and om.has_cache and decode_steps > 0:
        step("decode with the KV cache", 0.85)
        report["decode"] = v_rows_read(_decode_check(om, tokens[0].numpy()[None, :], decode_steps,
                                                     th.dense_layers), vmc=comp_mode == 2, per="step")
    step("done", 1.0)
    return report


def _compensation_variants(onnx_path: Path, tokens: np.ndarray, comp_mode: int, ppl_main: float,
                           ppl_dense: float, device: str, threads) -> dict[str, Any]:
    """Perplexity through onnxruntime for every compensation mode (same graph, comp_mode overridden)."""
    names = {0: "none", 1: "sdc", 2: "sdc+vmc"}
    out = {}
    for mode in (0, 1, 2):
        if mode == comp_mode:
            ppl = ppl_main
        else:
            om = OnnxModel(onnx_path, device=device, threads=threads, comp_mode=mode)
            s = n = 0
            for w in range(tokens.shape[0]):
                a, b = _nll(om.run(tokens[w:w + 1]).output, tokens[w:w + 1])
                s, n = s + a, n + b
            ppl = math.exp(s / max(n, 1))
        out[names[mode]] = {"comp_mode": mode, "perplexity": ppl, "relative_change": ppl / ppl_dense - 1.0}
    return out


def _dense_floor(onnx_path: Path, ids: np.ndarray, dense: np.ndarray, device: str, threads) -> float:
    """max |Δ| between onnxruntime and PyTorch with every θ = -inf (dense attention through our operator).

    This is the fp32 disagreement of the two runtimes on this model with no sparsity at all: the floor
    under which Top-θ parity cannot be expected to go.
    """
    om = OnnxModel(onnx_path, device=device, threads=threads, theta_fill=float("-inf"))
    return float(np.abs(om.run(ids).output.astype(np.float32) - dense).max())


def _model_output(model, ids, is_lm: bool) -> np.ndarray:
    out = model(input_ids=ids, attention_mask=ids.new_ones(ids.shape))
    t = out.logits if is_lm else out.last_hidden_state
    return t.float().numpy()


def v_rows_read(dec: dict[str, Any], *, vmc: bool, per: str) -> dict[str, Any]:
    """Add the V rows a decode step actually reads to a decode summary (``per``: "step" or "token").

    Top-θ's P·V reads the kept rows only, but V-mean compensation (comp_mode 2) forms the mean of every valid
    V row of the row (docs/op.md), so with it a step reads all of them: no V-row saving.
    """
    dense, kept = dec[f"v_rows_dense_per_{per}"], dec[f"v_rows_kept_per_{per}"]
    read = dense if vmc else kept
    dec[f"v_rows_read_per_{per}"] = read
    dec["v_rows_read_reduction"] = dense / max(read, 1e-12)
    if vmc:
        dec["note"] = "comp_mode 2 (V-mean compensation) reads every valid V row for the mean"
    return dec


def _decode_check(om: OnnxModel, ids: np.ndarray, steps: int, dense_layers: list[int]) -> dict[str, Any]:
    """Prefill all but the last ``steps`` tokens, then decode them one by one through the KV cache.

    Returns V rows read per decode step (the kept count of the single query row) against dense, and the
    largest difference between decode-step logits and the full-prefill logits at the same positions.
    """
    full = om.run(ids)
    s = ids.shape[1]
    pre = s - steps
    res = om.run(ids[:, :pre])
    kept_rows = np.zeros(om.num_layers)
    dense_rows = 0.0
    max_diff = 0.0
    mask = np.ones((1, pre), np.int64)
    for t in range(pre, s):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        res = om.run(ids[:, t:t + 1], mask, res.present)
        max_diff = max(max_diff, float(np.abs(res.output[:, -1] - full.output[:, t]).max()))
        for layer, k in res.kept.items():
            kept_rows[layer] += float(k.astype(np.float64).mean())
        dense_rows += t + 1
    sparse = [i for i in range(om.num_layers) if i not in set(dense_layers)]
    kept_all = kept_rows.sum() / om.num_layers
    kept_sparse = kept_rows[sparse].sum() / max(len(sparse), 1)
    return {
        "context_start": pre,
        "steps": steps,
        "v_rows_dense_per_step": dense_rows / steps,
        "v_rows_kept_per_step": kept_all / steps,
        "v_rows_reduction": dense_rows / max(kept_all, 1e-9),
        "sparse_layers_v_rows_reduction": dense_rows / max(kept_sparse, 1e-9),
        "max_abs_diff_decode_vs_prefill": max_diff,
    }
