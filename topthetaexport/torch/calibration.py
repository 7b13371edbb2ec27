"""Calibrate Top-θ thresholds θ and SDC constants ρ in PyTorch (docs/op.md, "Calibration")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import torch

from .._errors import TopThetaError
from ..data import as_token_tensor
from ..models import LoadedModel, load_model
from ..progress import Progress, emitter
from ..thresholds import FORMAT_VERSION, Thresholds
from .attention import attention_mode

__all__ = ["calibrate"]


class _Accumulator:
    """Running sums and counts per (layer, head, row) in float64."""

    def __init__(self, layers: int, heads: int, rows: int):
        self.sum = torch.zeros(layers, heads, rows, dtype=torch.float64)
        self.cnt = torch.zeros(layers, heads, rows, dtype=torch.float64)

    def add(self, layer: int, values: torch.Tensor, ok: torch.Tensor) -> None:
        """values, ok: [B, H, S]; only entries with ``ok`` count."""
        rows = values.shape[-1]
        self.sum[layer, :, :rows] += torch.where(ok, values.double(), 0.0).sum(0)
        self.cnt[layer, :, :rows] += ok.sum(0).double()

    def mean(self, empty: float) -> torch.Tensor:
        return torch.where(self.cnt > 0, self.sum / self.cnt.clamp(min=1), empty).float()


def _kth_hook(acc: _Accumulator, k: int, dense: set[int]):
    def hook(layer, s, valid):
        if layer in dense or s.shape[-1] <= k:
            return
        n_valid = valid.sum(-1)
        kth = s.masked_fill(~valid, float("-inf")).topk(k, dim=-1, sorted=True).values[..., -1]
        acc.add(layer, kth, n_valid > k)

    return hook


def _sdc_hook(acc: _Accumulator, theta: torch.Tensor):
    def hook(layer, s, valid):
        rows = s.shape[-2]
        th = theta[layer, :, :rows].to(s.dtype)[None, :, :, None]
        if not torch.isfinite(th).any():
            return
        pruned = valid & (s < th)
        n_pruned = pruned.sum(-1)
        mass = torch.exp(torch.where(pruned, s - th, float("-inf"))).sum(-1)
        acc.add(layer, mass / n_pruned.clamp(min=1), n_pruned > 0)

    return hook


def _counter(progress: Progress | None, total: int) -> Callable[[str], None]:
    """One call per finished batch, reported as a fraction of ``total`` batches."""
    report = emitter(progress, "calibrate")
    done = [0]

    def step(message: str) -> None:
        done[0] += 1
        report(message, done[0] / max(total, 1))

    return step


def _run(model, tokens: torch.Tensor, batch_size: int, hook, step, label: str) -> None:
    body = getattr(model, "base_model", model)  # no LM head: calibration needs attention scores only
    with torch.no_grad(), attention_mode(model, "dense", score_hook=hook):
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size]
            body(input_ids=ids, attention_mask=torch.ones_like(ids))
            step(f"{label} {min(start + batch_size, tokens.shape[0])}/{tokens.shape[0]}")


def _check_args(loaded: LoadedModel, k, seq_len, num_samples, dense_layers, batch_size) -> None:
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
    progress: Progress | None = None,
) -> Thresholds:
    """Calibrate θ (mean k-th largest valid score per layer/head/row) and ρ (SDC) on ``data``.

    model: LoadedModel, alias or path. data: file/folder path, "builtin:pydoc", list of texts, or a token
    tensor [N, S] (then S is the calibrated length). The first ``dense_layers`` layers stay dense (θ = -inf).
    ρ is averaged over the samples in which the row pruned something (0 if it never did).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    _check_args(loaded, k, seq_len, num_samples, dense_layers, batch_size)
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
    _run(loaded.model, tokens, batch_size, _kth_hook(acc, k, dense), step, "θ pass")
    theta = acc.mean(float("-inf"))
    theta[list(dense)] = float("-inf")
    acc2 = _Accumulator(layers, heads, rows)
    _run(loaded.model, tokens, batch_size, _sdc_hook(acc2, theta), step, "ρ pass")
    sdc = acc2.mean(0.0)

    return Thresholds(theta, sdc, _meta(loaded, data, k=k, n=n, rows=rows, dense=sorted(dense)))


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
        "calib_source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
