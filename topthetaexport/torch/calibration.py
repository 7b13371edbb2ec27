"""Calibrate Top-θ thresholds θ and SDC constants ρ in PyTorch (docs/op.md, "Calibration")."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from .._errors import TopThetaError
from ..data import as_token_tensor
from ..models import LoadedModel, load_model
from ..options import AGGREGATIONS
from ..progress import Progress, emitter
from ..thresholds import FORMAT_VERSION, Thresholds, check_k_growth, k_rows, parse_dense_heads, parse_layer_k
from .attention import attention_mode

__all__ = ["calibrate"]


DEFAULT_SIGMA_C = 0.1  # the official code's c in mean + c·σ
# Scores held at once per attention call (query rows x keys x heads x batch): 2^23 float32 = 32 MiB.
CHUNK_ELEMENTS = 1 << 23


class _Accumulator:
    """Running sums, sums of squares and counts per (layer, head, row) in float64."""

    def __init__(self, layers: int, heads: int, rows: int):
        self.sum = torch.zeros(layers, heads, rows, dtype=torch.float64)
        self.sq = torch.zeros(layers, heads, rows, dtype=torch.float64)
        self.cnt = torch.zeros(layers, heads, rows, dtype=torch.float64)

    def add(self, layer: int, values: torch.Tensor, ok: torch.Tensor, row0: int = 0) -> None:
        """values, ok: [B, H, C] for rows ``row0 .. row0 + C``; only entries with ``ok`` count."""
        rows = slice(row0, row0 + values.shape[-1])
        v = torch.where(ok, values.double(), 0.0).cpu()
        self.sum[layer, :, rows] += v.sum(0)
        self.sq[layer, :, rows] += (v * v).sum(0)
        self.cnt[layer, :, rows] += ok.sum(0).double().cpu()

    def mean(self, empty: float) -> torch.Tensor:
        return torch.where(self.cnt > 0, self.sum / self.cnt.clamp(min=1), empty).float()

    def mean_plus_sigma(self, c: float, empty: float) -> torch.Tensor:
        """mean + c·σ (σ: sample standard deviation over the samples, 0 where a row has one sample)."""
        n = self.cnt.clamp(min=1)
        mean = self.sum / n
        var = ((self.sq - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
        return torch.where(self.cnt > 0, mean + c * var.sqrt(), empty).float()


def _row_chunks(b: int, h: int, sq: int, ktot: int, budget: int):
    rows = max(1, budget // max(b * h * ktot, 1))
    for r0 in range(0, sq, rows):
        yield r0, min(sq, r0 + rows)


def _chunk_scores(q, k, mask, scale, causal, r0: int, r1: int, softcap=None):
    """Scores [B, Hq, r1-r0, Kc] and valid mask of query rows r0..r1 against the keys they can see (Kc <= Ktot).

    Row position r = Ktot - Sq + i (bottom-right aligned, docs/op.md); causal rows never see keys past r1's row,
    so those keys are left out.
    """
    from .reference import _expand_kv, _mask_parts

    b, hq, sq, d = q.shape
    ktot = k.shape[2]
    offset = ktot - sq
    kend = min(ktot, offset + r1) if causal else ktot
    scale = (1.0 / math.sqrt(d)) if not scale else float(scale)
    kk = _expand_kv(k[:, :, :kend], hq).float()
    s = torch.matmul(q[:, :, r0:r1].float(), kk.transpose(-1, -2)) * scale
    if softcap:  # Gemma 2: θ lives in the space of the capped scores, which the softmax sees
        s = torch.tanh(s / float(softcap)) * float(softcap)
    valid = torch.ones((1, 1, r1 - r0, kend), dtype=torch.bool, device=q.device)
    if causal:
        r = torch.arange(r0, r1, device=q.device) + offset
        valid = valid & (torch.arange(kend, device=q.device)[None, :] <= r[:, None])[None, None]
    if mask is not None:  # [B, Ktot] or 4-D broadcastable to [B, Hq, Sq, Ktot]
        if mask.dim() == 2:
            m = mask[:, :kend]
        else:
            m = mask[..., :kend] if mask.shape[-2] == 1 else mask[..., r0:r1, :kend]
        allowed, add = _mask_parts(m, b, kend, torch.float32)
        if allowed is not None:
            valid = valid & allowed
        if add is not None:
            s = s + add
    return s, valid.expand(b, hq, r1 - r0, kend), kend


class _ChunkedPass:
    """The attention function of one calibration pass: per chunk of query rows, the scores against the keys
    the rows see, a statistic per row (``collect``), and the attention output (dense; with ``topk`` the exact
    top-k of each row, so that later layers see sparsified activations). Row r's k is k(r) (``k_rows``: ``k``,
    or grown by ``growth``)."""

    def __init__(
        self,
        collect,
        dense: set[int],
        k: int,
        topk: bool,
        budget: int,
        growth: str | None = None,
        layer_k: dict[int, int] | None = None,
    ):
        self.collect, self.dense, self.k, self.topk, self.budget = collect, dense, k, topk, budget
        self.growth, self.layer_k = growth, layer_k or {}

    def __call__(self, layer, q, k, v, mask, scale, causal, softcap=None):
        from .reference import _expand_kv

        b, hq, sq, _ = q.shape
        offset = k.shape[2] - sq
        out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float32, device=q.device)
        for r0, r1 in _row_chunks(b, hq, sq, k.shape[2], self.budget):
            s, valid, kend = _chunk_scores(q, k, mask, scale, causal, r0, r1, softcap)
            masked = s.masked_fill(~valid, float("-inf"))
            n_valid = valid.sum(-1)
            k_layer = self.layer_k.get(layer, self.k)
            kr = k_rows(torch.arange(offset + r0, offset + r1), k_layer, self.growth).to(q.device)  # [C]
            sparse = layer not in self.dense and kend > int(kr.min())
            kth = None
            if sparse:
                top = masked.topk(min(int(kr.max()), kend), dim=-1, sorted=True).values
                at = (kr.clamp(max=top.shape[-1]) - 1).view(1, 1, -1, 1).expand(b, hq, -1, 1)
                kth = top.gather(-1, at)[..., 0]
                self.collect(layer, r0, s, valid, n_valid, kth, kr)
            use = valid
            if self.topk and kth is not None:
                use = valid & ((masked >= kth[..., None]) | (n_valid <= kr.view(1, 1, -1))[..., None])
            p = torch.softmax(s.masked_fill(~use, float("-inf")), dim=-1)
            p = torch.nan_to_num(p, nan=0.0)  # rows without a valid key give zeros (docs/op.md)
            out[:, :, r0:r1] = torch.matmul(p, _expand_kv(v[:, :, :kend], hq).float())
        return out.to(q.dtype)


def _kth_collector(acc: _Accumulator):
    def collect(layer, r0, s, valid, n_valid, kth, kr):
        acc.add(layer, kth, n_valid > kr.view(1, 1, -1), r0)

    return collect


def _sdc_collector(acc: _Accumulator, theta: torch.Tensor):
    def collect(layer, r0, s, valid, n_valid, kth, kr):
        th = theta[layer, :, r0 : r0 + s.shape[-2]].to(s.device, s.dtype)[None, :, :, None]
        if not torch.isfinite(th).any():
            return
        pruned = valid & (s < th)
        n_pruned = pruned.sum(-1)
        mass = torch.exp(torch.where(pruned, s - th, float("-inf"))).sum(-1)
        acc.add(layer, mass / n_pruned.clamp(min=1), n_pruned > 0, r0)

    return collect


def _counter(progress: Progress | None, total: int) -> Callable[[str], None]:
    """One call per finished batch, reported as a fraction of ``total`` batches."""
    report = emitter(progress, "calibrate")
    done = [0]

    def step(message: str) -> None:
        done[0] += 1
        report(message, done[0] / max(total, 1))

    return step


def _run(model, tokens: torch.Tensor, batch_size: int, fn, step, label: str, device: torch.device) -> None:
    body = getattr(model, "base_model", model)  # no LM head: calibration needs attention scores only
    with torch.no_grad(), attention_mode(model, "dense", attention_fn=fn):
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device)
            body(input_ids=ids, attention_mask=torch.ones_like(ids))
            step(f"{label} {min(start + batch_size, tokens.shape[0])}/{tokens.shape[0]}")


def _check_args(loaded: LoadedModel, k, seq_len, num_samples, dense_layers, batch_size, aggregation, c) -> None:
    if aggregation not in AGGREGATIONS:
        raise TopThetaError(f"aggregation '{aggregation}' is unknown: use one of {', '.join(AGGREGATIONS)}")
    if not math.isfinite(c) or c < 0:
        raise TopThetaError(f"sigma_c must be a finite number >= 0 (got {c}): e.g. 0.1, the official code's")
    if k < 1 or num_samples < 1 or batch_size < 1 or seq_len < 2:
        raise TopThetaError(
            f"need k >= 1, num_samples >= 1, batch_size >= 1 and seq_len >= 2 (got k={k}, "
            f"num_samples={num_samples}, batch_size={batch_size}, seq_len={seq_len})"
        )
    if not 0 <= dense_layers <= loaded.num_layers:
        raise TopThetaError(
            f"dense_layers={dense_layers} is outside 0..{loaded.num_layers} (the model has {loaded.num_layers} layers)"
        )


def calibrate(
    model,
    data,
    *,
    k: int = 64,
    seq_len: int = 512,
    num_samples: int = 16,
    dense_layers: int = 2,
    batch_size: int = 1,
    aggregation: str = "mean",
    sigma_c: float = DEFAULT_SIGMA_C,
    calib_topk: bool = False,
    k_growth: str | None = None,
    layer_k: str | dict[int, int] | None = None,
    dense_heads: str | dict[int, list[int]] | None = None,
    device: str = "auto",
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: Progress | None = None,
) -> Thresholds:
    """Calibrate θ (the k-th largest valid score per layer/head/row, aggregated over samples) and ρ (SDC).

    model: LoadedModel, alias or path. data: file/folder path, "builtin:pydoc", "austen:NAME", list of texts,
    or a token tensor [N, S] (then S is the calibrated length). The first ``dense_layers`` layers stay dense
    (θ = -inf). ``aggregation``: "mean" over samples, or "mean+sigma" (mean + ``sigma_c``·σ, the official
    code's rule with c = 0.1). ``calib_topk``: later layers see top-k-sparsified attention (the paper's option)
    instead of dense. ``k_growth``: k per row grows with the row ("fraction:F": k(r) = max(k, ⌈F·(r+1)⌉),
    "power:A@R": max(k, k·((r+1)/R)^A); ``thresholds.k_rows``), so θ of row r is its k(r)-th largest score
    and the fit past the calibrated rows follows the same k(r) (``Thresholds.extended``). ρ is averaged over
    the samples in which the row pruned something (0 if it never did). ``layer_k``: k of single sparse layers
    instead of ``k`` ({layer: k} or "2+4+15=384,7=256", ``thresholds.parse_layer_k``): a model whose loss sits
    in a few layers keeps more keys there and fewer in the rest (docs/accuracy.md, Long context).
    ``dense_heads``: heads of sparse layers that stay dense (θ = -inf), {layer: [heads]} or "1:3+7"
    (``thresholds.parse_dense_heads``).
    Memory is bounded: each attention call is computed in chunks of query rows of at most ``chunk_elements``
    scores (no [S, S] matrix per layer); ``device`` "auto" runs on CUDA when torch has it.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    _check_args(loaded, k, seq_len, num_samples, dense_layers, batch_size, aggregation, float(sigma_c))
    if chunk_elements < 1:
        raise TopThetaError(f"chunk_elements must be >= 1 (got {chunk_elements})")
    growth = check_k_growth(k_growth)
    per_layer = _check_layer_k(parse_layer_k(layer_k), loaded.num_layers, dense_layers)
    heads_dense = _check_dense_heads(parse_dense_heads(dense_heads), loaded.num_layers, loaded.num_heads, dense_layers)
    dev = _device(device)
    tokens = as_token_tensor(data, loaded.tokenizer, seq_len=seq_len, num_samples=num_samples)
    n, rows = tokens.shape
    if loaded.max_positions and rows > loaded.max_positions:
        raise TopThetaError(
            f"seq_len {rows} exceeds the model's {loaded.max_positions} positions: use a smaller seq_len"
        )
    layers, heads = loaded.num_layers, loaded.num_heads
    dense = set(range(dense_layers))
    batches = -(-n // batch_size)

    step = _counter(progress, 2 * batches)
    acc = _Accumulator(layers, heads, rows)
    model_device = next(loaded.model.parameters()).device
    try:
        loaded.model.to(dev)
        kth_pass = _ChunkedPass(_kth_collector(acc), dense, k, calib_topk, chunk_elements, growth, per_layer)
        _run(loaded.model, tokens, batch_size, kth_pass, step, "θ pass", dev)
        neg = float("-inf")
        theta = acc.mean(neg) if aggregation == "mean" else acc.mean_plus_sigma(float(sigma_c), neg)
        theta[list(dense)] = neg
        for layer, hs in heads_dense.items():
            theta[layer, hs] = neg
        acc2 = _Accumulator(layers, heads, rows)
        sdc_pass = _ChunkedPass(_sdc_collector(acc2, theta), dense, k, calib_topk, chunk_elements, growth, per_layer)
        _run(loaded.model, tokens, batch_size, sdc_pass, step, "ρ pass", dev)
    finally:
        loaded.model.to(model_device)
    sdc = acc2.mean(0.0)

    meta = _meta(loaded, data, k=k, n=n, rows=rows, dense=sorted(dense))
    meta["aggregation"] = aggregation if aggregation == "mean" else f"mean+{float(sigma_c):g}sigma"
    meta["calib_topk"] = bool(calib_topk)
    meta["k_growth"] = growth
    if per_layer:
        meta["layer_k"] = {str(i): kk for i, kk in sorted(per_layer.items())}
    if heads_dense:
        meta["dense_heads"] = {str(i): hs for i, hs in heads_dense.items()}
    meta["calib_device"] = dev.type
    return Thresholds(theta, sdc, meta)


def _check_layer_k(layer_k: dict[int, int], layers: int, dense_layers: int) -> dict[int, int]:
    for i in sorted(layer_k):
        if i >= layers:
            raise TopThetaError(f"--layer-k names layer {i}, but the model has layers 0..{layers - 1}: drop it")
        if i < dense_layers:
            raise TopThetaError(
                f"--layer-k names layer {i}, which is dense (--dense-layers {dense_layers}): drop it, or lower "
                "--dense-layers"
            )
    return layer_k


def _check_dense_heads(dense_heads: dict[int, list[int]], layers: int, heads: int, dense_layers: int):
    for i, hs in dense_heads.items():
        if i >= layers:
            raise TopThetaError(f"--dense-heads names layer {i}, but the model has layers 0..{layers - 1}: drop it")
        if i < dense_layers:
            raise TopThetaError(
                f"--dense-heads names layer {i}, which is dense already (--dense-layers {dense_layers}): drop it"
            )
        if hs[-1] >= heads:
            raise TopThetaError(f"--dense-heads names head {hs[-1]} of layer {i}, but heads are 0..{heads - 1}")
    return dense_heads


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise TopThetaError(f"device '{device}' is unknown: use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise TopThetaError("device cuda was asked for but this torch has no CUDA device: use --device cpu or auto")
    return torch.device(device)


def _meta(loaded: LoadedModel, data, *, k: int, n: int, rows: int, dense: list[int]) -> dict:
    from .. import __version__

    if isinstance(data, torch.Tensor):
        source = f"token tensor {list(data.shape)}"
    elif isinstance(data, (list, tuple)):
        source = f"list of {len(data)} texts"
    else:
        source = str(data)
    return {
        "format_version": FORMAT_VERSION,
        "toptheta_version": __version__,
        "model": loaded.name,
        "model_type": loaded.model_type,
        "causal": loaded.causal,
        "k": int(k),
        "num_samples": int(n),
        "seq_len": int(rows),
        "dense_layers": dense,
        "num_layers": loaded.num_layers,
        "num_heads": loaded.num_heads,
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "max_positions": loaded.max_positions,
        # sliding-window and global layers are calibrated alike (each on the keys it sees); stats() reports both
        "sliding_window": int(loaded.architecture.sliding_window(loaded.config) or 0),
        "attention_kinds": loaded.architecture.attention_kinds(loaded.config),
        "calib_source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
