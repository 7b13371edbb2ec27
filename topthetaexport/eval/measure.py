"""The measurement engine of validation and evaluation: every number they report is measured here.

* negative log-likelihood / perplexity over windows, top-1 agreement of two runs' logits;
* attention elements kept per row (the operator's own ``kept`` output), all layers and sparse layers;
* decode through the KV cache: the V rows each step reads. A query head reads the rows it keeps; for GQA a V
  row is read once for its KV group when any query head of the group keeps it (the spec's rule); V-mean
  compensation (comp_mode 2) reads every valid row for the mean;
* keep decisions recomputed in float64 from the Q and K that an onnxruntime run fed each TopThetaAttention
  node: exactly the CPU kernel's decisions (docs/op.md "Numerics"), used to pin the PyTorch reference to them;
* a float64 run of the PyTorch model (the oracle for those pinned decisions: the difference left is the
  onnxruntime graph's own float32 rounding, not the two runtimes' rounding added up);
* pinned thread counts, so that the same inputs give the same numbers in every run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import TopThetaError
from ..onnx import names
from ..onnx.names import IO_PREFIX
from ..ort.sessions import OnnxModel

__all__ = [
    "DEFAULT_THREADS",
    "Agreement",
    "KeptElements",
    "layer_windows",
    "Perplexity",
    "RowKept",
    "decode_through_cache",
    "float64_weights",
    "fp64_keep_masks",
    "kept_count_diff",
    "kept_counts",
    "kv_group_union",
    "model_output",
    "nll",
    "operator_parity",
    "pinned_threads",
    "read_op_attrs",
    "v_rows_read",
    "valid_counts",
]

# One intra-op thread unless told otherwise: float32 reductions then run in one fixed order on every machine.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def pinned_threads(threads: int | None = None) -> Iterator[int]:
    """Pin torch's intra-op threads for the block (restored after); yields the count for onnxruntime sessions."""
    n = DEFAULT_THREADS if threads is None else int(threads)
    if n < 1:
        raise TopThetaError(f"threads must be >= 1 (got {threads}): pass a positive thread count or leave it unset")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def read_op_attrs(model_path: Path) -> dict[int, dict[str, Any]]:
    """Attributes of every TopThetaAttention node, by layer (from its threshold initializer's name)."""
    import onnx

    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx.load raises protobuf, OS and value errors alike
        raise TopThetaError(
            f"{model_path} is not a valid ONNX model ({str(e).splitlines()[0][:200]}): re-export it"
        ) from None
    attrs: dict[int, dict[str, Any]] = {}
    for node in m.graph.node:
        if node.op_type == names.OP_TYPE and node.domain == names.DOMAIN:
            layer = int(node.input[3].rsplit(".", 1)[-1]) if "." in node.input[3] else len(attrs)
            attrs[layer] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not attrs:
        raise TopThetaError(f"{model_path} has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
    return attrs


# -- windows ---------------------------------------------------------------------------------------------


def nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the token count (float64)."""
    lg = logits[:, :-1, :].astype(np.float64)
    tgt = ids[:, 1:]
    mx = lg.max(-1, keepdims=True)
    lse = (np.log(np.exp(lg - mx).sum(-1, keepdims=True)) + mx)[..., 0]
    picked = np.take_along_axis(lg, tgt[..., None], -1)[..., 0]
    return float((lse - picked).sum()), int(tgt.size)


def valid_counts(seq: int, causal: bool, past: int = 0) -> np.ndarray:
    """Number of valid keys for each query row of an unpadded sequence."""
    rows = np.arange(past, past + seq)
    return rows + 1 if causal else np.full(seq, past + seq)


class Perplexity:
    """exp(mean next-token NLL) over every window added."""

    def __init__(self) -> None:
        self.nll_sum, self.tokens = 0.0, 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> None:
        s, n = nll(logits, ids)
        self.nll_sum, self.tokens = self.nll_sum + s, self.tokens + n

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))


class Agreement:
    """Fraction of positions where two runs' logits pick the same top-1 token."""

    def __init__(self) -> None:
        self.matches, self.positions = 0, 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.matches += int((a.argmax(-1) == b.argmax(-1)).sum())
        self.positions += int(a.shape[1])

    @property
    def value(self) -> float:
        return self.matches / max(self.positions, 1)


def layer_windows(meta: dict[str, Any], num_layers: int) -> list[int]:
    """Per layer the sliding window a row sees (0: global), from the thresholds meta (calibration records
    ``attention_kinds`` and ``sliding_window``); all 0 when it does not say."""
    kinds, window = meta.get("attention_kinds") or [], int(meta.get("sliding_window") or 0)
    if not window or len(kinds) != num_layers:
        return [0] * num_layers
    return [window if kind == "sliding" else 0 for kind in kinds]


class KeptElements:
    """Kept / valid attention elements per layer (prefill rows), and the V rows of each window's last
    ``decode_rows`` rows: with causal attention and the KV cache, decoding the token at position t reads the
    V rows query row t keeps in a prefill (same θ row, same keys). ``windows`` (``layer_windows``): a sliding
    layer's row sees at most its window of keys, so its valid count is ``min(valid, window)``: the window's own
    cut is not counted as pruned."""

    def __init__(self, num_layers: int, windows: list[int] | None = None) -> None:
        self.kept, self.valid = np.zeros(num_layers), np.zeros(num_layers)
        self.windows = list(windows) if windows else [0] * num_layers
        self.rows, self.valid_rows = 0, 0.0
        self.dec_kept, self.dec_dense, self.dec_rows = np.zeros(num_layers), np.zeros(num_layers), 0

    def add(self, kept: dict[int, np.ndarray], valid_per_row: np.ndarray, decode_rows: int = 0) -> None:
        """``kept``: layer -> counts [B, Hq, S]; ``valid_per_row``: [S] (causal or full counts, no window)."""
        batch = None
        for layer, k in kept.items():
            k = k.astype(np.float64)
            batch, heads = k.shape[0], k.shape[1]
            window = self.windows[layer]
            valid = np.minimum(valid_per_row, window) if window else valid_per_row
            self.kept[layer] += k.sum()
            self.valid[layer] += valid.sum() * batch * heads
            if decode_rows:
                self.dec_kept[layer] += k[:, :, -decode_rows:].mean(1).sum()
                self.dec_dense[layer] += float(valid[-decode_rows:].sum()) * batch
        if batch is None:
            return
        self.rows += batch * len(valid_per_row)
        self.valid_rows += float(valid_per_row.sum()) * batch
        if decode_rows:
            self.dec_rows += decode_rows * batch

    def summary(self, dense_layers: list[int]) -> dict[str, Any]:
        n = len(self.kept)
        sparse = [i for i in range(n) if i not in set(dense_layers)]
        out: dict[str, Any] = {
            "dense_per_row": self.valid_rows / max(self.rows, 1),
            "kept_fraction": float(self.kept.sum() / max(self.valid.sum(), 1)),
            "sparse_layers_kept_fraction": float(self.kept[sparse].sum() / max(self.valid[sparse].sum(), 1)),
            "per_layer_kept_fraction": [float(k / max(v, 1)) for k, v in zip(self.kept, self.valid)],
        }
        out["kept_per_row"] = out["dense_per_row"] * out["kept_fraction"]
        out["reduction"] = 1.0 / max(out["kept_fraction"], 1e-12)
        out["sparse_layers_reduction"] = 1.0 / max(out["sparse_layers_kept_fraction"], 1e-12)
        if any(self.windows):  # sliding and global layers, each against the keys it sees
            by_kind = {
                "sliding": [i for i in sparse if self.windows[i]],
                "global": [i for i in sparse if not self.windows[i]],
            }
            out["sparse_layers_kept_fraction_by_attention"] = {
                kind: float(self.kept[ls].sum() / max(self.valid[ls].sum(), 1)) for kind, ls in by_kind.items() if ls
            }
        if self.dec_rows:
            dense = self.dec_dense.sum() / n / self.dec_rows
            dense_sparse = self.dec_dense[sparse].sum() / max(len(sparse), 1) / self.dec_rows
            kept_all = self.dec_kept.sum() / n / self.dec_rows
            kept_sparse = self.dec_kept[sparse].sum() / max(len(sparse), 1) / self.dec_rows
            out["decode"] = {
                "rows": self.dec_rows,
                "v_rows_dense_per_token": dense,
                "v_rows_kept_per_token": kept_all,
                "v_rows_reduction": dense / max(kept_all, 1e-12),
                "sparse_layers_v_rows_kept_per_token": kept_sparse,
                "sparse_layers_v_rows_reduction": dense_sparse / max(kept_sparse, 1e-12),
            }
        return out


class RowKept:
    """Recorder for ``attention_mode``: the per-row kept counts [B, Hq, S] of the last forward, by layer."""

    def __init__(self) -> None:
        self.kept: dict[int, np.ndarray] = {}

    def record(self, layer: int, kept: torch.Tensor, n_valid: torch.Tensor) -> None:
        self.kept[layer] = kept.detach().cpu().numpy().astype(np.int64)


def kept_count_diff(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[str, Any]:
    """Rows whose kept count differs between two runs (e.g. onnxruntime and PyTorch: borderline decisions)."""
    rows = diff = 0
    first = None
    for layer in sorted(a):
        x, y = a[layer].astype(np.int64), b.get(layer)
        if y is None or x.shape != y.shape:
            continue
        d = int((x != y).sum())
        rows += x.size
        diff += d
        if d and first is None:
            first = layer
    return {"rows_compared": rows, "rows_with_different_kept_count": diff, "first_layer_differing": first}


def model_output(model: torch.nn.Module, ids: torch.Tensor, is_lm: bool, mode: str, **mode_args: Any) -> np.ndarray:
    """Logits (or last hidden state) of one PyTorch forward with ``mode`` attention (see attention_mode);
    float64 from a model in float64 (``float64_weights``), else float32."""
    from ..torch.attention import attention_mode

    with torch.no_grad(), attention_mode(model, mode, **mode_args):
        out = model(input_ids=ids, attention_mask=ids.new_ones(ids.shape))
    t = out.logits if is_lm else out.last_hidden_state
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()


@contextlib.contextmanager
def float64_weights(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in float64 inside the block; the original tensors (any dtype) are put back after."""
    saved = [(t, t.data) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    for t, data in saved:
        t.data = data.double()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


# -- keep decisions of an onnxruntime run ----------------------------------------------------------------


def _op_inputs(io: dict[str, np.ndarray], layer: int) -> dict[str, torch.Tensor]:
    pre = f"{IO_PREFIX}{layer}."
    return {n: torch.from_numpy(io[pre + n]) for n in ("q", "k", "v", "mask", "y") if pre + n in io}


def _kernel_scale(attrs: dict[str, Any], head_dim: int) -> float:
    # the kernel's float32 scale (attribute, or 1/sqrt(D) rounded to float32), widened to double
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(head_dim)
    return float(np.float32(scale))


def fp64_keep_masks(
    io: dict[str, np.ndarray], attrs: dict[int, dict[str, Any]], thresholds: Any
) -> dict[int, torch.Tensor]:
    """layer -> bool [B, Hq, Sq, Ktot]: ``valid and s >= θ`` with ``s`` in float64 from the Q and K the node got.

    The CPU kernel accumulates and compares in double (docs/op.md), so these are its decisions; the run must
    come from a session with ``expose_io=True``.
    """
    from ..torch.reference import _row_table, valid_and_scores

    masks = {}
    for layer, a in sorted(attrs.items()):
        t = _op_inputs(io, layer)
        if "q" not in t or "k" not in t:
            raise TopThetaError(f"the onnxruntime run exposes no Q/K of layer {layer}: open it with expose_io=True")
        q, k = t["q"].double(), t["k"].double()
        s, valid = valid_and_scores(
            q,
            k,
            scale=_kernel_scale(a, q.shape[-1]),
            causal=bool(a.get("causal", 0)),
            attn_mask=t.get("mask"),
            softcap=float(a.get("softcap", 0.0)) or None,
        )
        theta = _row_table(thresholds.layer(layer)[0], q.shape[2], k.shape[2], torch.float64)
        masks[layer] = valid & (s >= theta)
    return masks


def kept_counts(masks: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
    """layer -> kept counts [B, Hq, Sq] of keep masks (comparable with the operator's ``kept`` output)."""
    return {layer: m.sum(-1).numpy().astype(np.int64) for layer, m in masks.items()}


def kv_group_union(keep: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hkv, Sq]: keys kept by any query head of each KV group (the V rows the group reads once)."""
    b, hq, sq, kt = keep.shape
    return keep.view(b, num_kv_heads, hq // num_kv_heads, sq, kt).any(2).sum(-1)


def operator_parity(io: dict[str, np.ndarray], attrs: dict[int, dict[str, Any]], thresholds: Any) -> dict[str, Any]:
    """Each TopThetaAttention's output in onnxruntime vs the float64 PyTorch reference on the same inputs."""
    from ..torch.reference import toptheta_attention

    per_layer = {}
    for layer, a in sorted(attrs.items()):
        t = _op_inputs(io, layer)
        if "y" not in t:
            continue
        theta, sdc = thresholds.layer(layer)
        ref = toptheta_attention(
            t["q"].double(),
            t["k"].double(),
            t["v"].double(),
            theta,
            scale=float(a.get("scale", 0.0)) or None,
            causal=bool(a.get("causal", 0)),
            attn_mask=t.get("mask"),
            sdc=sdc,
            comp_mode=int(a.get("comp_mode", 0)),
            softcap=float(a.get("softcap", 0.0)) or None,
        )
        per_layer[layer] = float((ref - t["y"].double()).abs().max())
    worst = max(per_layer.values()) if per_layer else float("nan")
    return {"max_abs_diff": worst, "per_layer": [per_layer[k] for k in sorted(per_layer)]}


# -- decode ----------------------------------------------------------------------------------------------


def decode_through_cache(
    om: OnnxModel,
    ids: np.ndarray,
    steps: int,
    dense_layers: list[int],
    *,
    attrs: dict[int, dict[str, Any]] | None = None,
    thresholds: Any = None,
) -> dict[str, Any]:
    """Prefill all but the last ``steps`` tokens, then decode them one by one through the KV cache.

    Returns V rows kept per decode step (the kept count of the single query row, mean over query heads)
    against dense, and the largest difference between decode-step logits and full-prefill logits at the same
    positions. With ``attrs`` and ``thresholds`` and a session opened with ``expose_io=True``, also the V rows
    of the GQA rule (a row read once per KV group when any of its query heads keeps it).
    """
    full = om.run(ids)
    s = ids.shape[1]
    pre = s - steps
    res = om.run(ids[:, :pre])
    kept_rows, union_rows = np.zeros(om.num_layers), np.zeros(om.num_layers)
    union = attrs is not None and thresholds is not None and bool(res.io)
    dense_rows = max_diff = 0.0
    mask = np.ones((1, pre), np.int64)
    for t in range(pre, s):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        res = om.run(ids[:, t : t + 1], mask, res.cache)
        max_diff = max(max_diff, float(np.abs(res.output[:, -1] - full.output[:, t]).max()))
        for layer, k in res.kept.items():
            kept_rows[layer] += float(k.astype(np.float64).mean())
        if union:
            for layer, keep in fp64_keep_masks(res.io, attrs or {}, thresholds).items():
                union_rows[layer] += float(kv_group_union(keep, om.kv_heads).double().mean())
        dense_rows += t + 1
    sparse = [i for i in range(om.num_layers) if i not in set(dense_layers)]
    kept_all = kept_rows.sum() / om.num_layers
    kept_sparse = kept_rows[sparse].sum() / max(len(sparse), 1)
    out = {
        "context_start": pre,
        "steps": steps,
        "v_rows_dense_per_step": dense_rows / steps,
        "v_rows_kept_per_step": kept_all / steps,
        "v_rows_reduction": dense_rows / max(kept_all, 1e-9),
        "sparse_layers_v_rows_reduction": dense_rows / max(kept_sparse, 1e-9),
        "max_abs_diff_decode_vs_prefill": max_diff,
    }
    if union:
        out["v_rows_kv_group_union_per_step"] = union_rows.sum() / om.num_layers / steps
    return out


def v_rows_read(dec: dict[str, Any], *, vmc: bool, per: str) -> dict[str, Any]:
    """Add the V rows a decode step actually reads to a decode summary (``per``: "step" or "token").

    Top-θ's P·V reads the kept rows only, but V-mean compensation (comp_mode 2) forms the mean of every valid
    V row of the row (docs/op.md), so with it a step reads all of them: no V-row saving.
    """
    dense, kept = dec[f"v_rows_dense_per_{per}"], dec[f"v_rows_kept_per_{per}"]
    read = dense if vmc else kept
    dec[f"v_rows_read_per_{per}"] = read
    dec["v_rows_read_reduction"] = dense / max(read, 1e-12)
    union = dec.get(f"v_rows_kv_group_union_per_{per}")
    if union is not None:
        read_union = dense if vmc else union
        dec[f"v_rows_read_kv_group_union_per_{per}"] = read_union
        dec["v_rows_read_kv_group_union_reduction"] = dense / max(read_union, 1e-12)
    if vmc:
        dec["note"] = "comp_mode 2 (V-mean compensation) reads every valid V row for the mean"
    return dec
