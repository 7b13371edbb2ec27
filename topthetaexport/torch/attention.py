"""Run a Hugging Face model with dense / Top-θ / top-k attention in PyTorch.

``attention_mode(model, mode, ...)`` registers one attention function with ``transformers.AttentionInterface``
(and a matching mask function that always builds an explicit boolean mask), switches the model to it for the
duration of the ``with`` block and restores the previous implementation afterwards. Every attention call goes
through ``topthetaexport.reference``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import TopThetaError
from . import reference

__all__ = ["attention_mode", "KeptRecorder", "attention_modules", "IMPL_NAME", "MODES"]

IMPL_NAME = "toptheta_torch"
MODES = ("dense", "toptheta", "topk")
_STATE_ATTR = "_toptheta_state"
_LAYER_ATTR = "_toptheta_layer"


@dataclass
class KeptRecorder:
    """Collects per-layer kept / valid element counts (rows with ``n_valid <= min_valid`` are skipped)."""

    min_valid: int = 0
    kept: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)

    def record(self, layer: int, kept: torch.Tensor, n_valid: torch.Tensor) -> None:
        """``kept`` and ``n_valid``: [B, Hq, Sq] counts of one attention call of ``layer``."""
        sel = n_valid > self.min_valid
        self.kept[layer] = self.kept.get(layer, 0.0) + float(kept[sel].double().sum())
        self.valid[layer] = self.valid.get(layer, 0.0) + float(n_valid[sel].double().sum())
        self.rows[layer] = self.rows.get(layer, 0) + int(sel.sum())

    def mean_kept(self, layers=None) -> float:
        """Mean kept elements per row over ``layers`` (default: all recorded)."""
        layers = sorted(self.rows) if layers is None else list(layers)
        rows = sum(self.rows.get(i, 0) for i in layers)
        return sum(self.kept.get(i, 0.0) for i in layers) / rows if rows else float("nan")

    def mean_valid(self, layers=None) -> float:
        layers = sorted(self.rows) if layers is None else list(layers)
        rows = sum(self.rows.get(i, 0) for i in layers)
        return sum(self.valid.get(i, 0.0) for i in layers) / rows if rows else float("nan")

    def kept_fraction(self, layers=None) -> float:
        layers = sorted(self.rows) if layers is None else list(layers)
        valid = sum(self.valid.get(i, 0.0) for i in layers)
        return sum(self.kept.get(i, 0.0) for i in layers) / valid if valid else float("nan")

    def per_layer(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": i,
                "mean_kept": self.kept[i] / self.rows[i] if self.rows[i] else float("nan"),
                "mean_valid": self.valid[i] / self.rows[i] if self.rows[i] else float("nan"),
            }
            for i in sorted(self.rows)
        ]


@dataclass
class _State:
    mode: str
    thresholds: Any = None
    comp_mode: int = 0
    k: int | None = None
    recorder: Any = None
    score_hook: Callable | None = None
    keep_masks: dict[int, torch.Tensor] | None = None
    attention_fn: Callable | None = None


# -- the registered functions --------------------------------------------------------------------------


def _mask_fn(*args, **kwargs):
    """Boolean [B, 1, Sq, Kv] mask, never skipped for causal models (the reference needs it explicit)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``IMPL_NAME``; returns ([B, Sq, Hq, Dv], None) like HF's."""
    state: _State | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise TopThetaError(
            f"attention implementation '{IMPL_NAME}' used outside topthetaexport.attention_mode: "
            "wrap the forward pass in 'with attention_mode(model, ...)'"
        )
    layer = getattr(module, _LAYER_ATTR)
    mask = attention_mask
    causal = bool(getattr(module, "is_causal", False)) and mask is None and query.shape[2] > 1
    # Gemma 2 caps its scores (softcap * tanh(s / softcap)); None for every other model
    softcap = kwargs.get("softcap") or None
    out, kept = _dispatch(state, layer, query, key, value, mask, scaling, causal, softcap)
    if state.recorder is not None:
        n_valid = _valid_counts(query, key, mask, causal)
        state.recorder.record(layer, n_valid if kept is None else kept, n_valid)
    return out.transpose(1, 2).contiguous(), None


def _dispatch(state: _State, layer, q, k, v, mask, scale, causal, softcap=None):
    if state.score_hook is not None:
        s, valid = reference.valid_and_scores(q, k, scale=scale, causal=causal, attn_mask=mask, softcap=softcap)
        state.score_hook(layer, s, valid)
    if state.attention_fn is not None:
        extra = {"softcap": softcap} if softcap else {}
        return state.attention_fn(layer, q, k, v, mask, scale, causal, **extra), None
    if state.mode == "dense":
        if softcap:  # torch SDPA has no softcap
            return reference.dense_attention(q, k, v, scale=scale, causal=causal, attn_mask=mask, softcap=softcap), None
        return _sdpa_dense(q, k, v, mask, scale, causal), None
    if state.mode == "topk":
        return reference.topk_attention(
            q, k, v, state.k, scale=scale, causal=causal, attn_mask=mask, return_kept=True, softcap=softcap
        )
    theta, sdc = state.thresholds.layer(layer)
    keep = None
    if state.keep_masks is not None:
        keep = state.keep_masks.get(layer)
        if keep is None:  # a silently unpinned layer would pass for a pinned one
            raise TopThetaError(f"keep_masks has no mask for layer {layer}: pass one for every attention layer")
        if keep.shape[-2:] != (q.shape[2], k.shape[2]):
            raise TopThetaError(
                f"keep mask of layer {layer} is {list(keep.shape)} but the call has {q.shape[2]} "
                f"queries and {k.shape[2]} keys: pin masks from a run on the same input"
            )
    return reference.toptheta_attention(
        q,
        k,
        v,
        theta,
        scale=scale,
        causal=causal,
        attn_mask=mask,
        sdc=sdc,
        comp_mode=state.comp_mode,
        return_kept=True,
        keep_mask=keep,
        softcap=softcap,
    )


def _sdpa_dense(q, k, v, mask, scale, causal) -> torch.Tensor:
    """Dense masked softmax attention through torch SDPA; rows without a valid key give zeros (docs/op.md)."""
    import torch.nn.functional as F

    if mask is not None and mask.dtype != torch.bool:
        limit = -65504.0 if mask.dtype == torch.float16 else -1e30
        mask = torch.where(mask > limit, mask.to(q.dtype), float("-inf"))
    if causal:  # bottom-right aligned (SDPA's is_causal is top-left)
        sq, ktot = q.shape[2], k.shape[2]
        tri = torch.ones(sq, ktot, dtype=torch.bool, device=q.device).tril(ktot - sq)
        mask = tri if mask is None else (mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, -math.inf))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if mask is not None:
        empty = ~(mask if mask.dtype == torch.bool else torch.isfinite(mask)).any(-1, keepdim=True)
        if empty.any():
            out = out.masked_fill(empty, 0.0)
    return out


def _valid_counts(q, k, mask, causal) -> torch.Tensor:
    b, hq, sq, _ = q.shape
    ktot = k.shape[2]
    if mask is None:
        r = torch.arange(sq, device=q.device) + (ktot - sq)
        n = (r + 1).clamp(max=ktot) if causal else torch.full((sq,), ktot, device=q.device)
        return n.expand(b, hq, sq)
    if mask.dtype != torch.bool:
        limit = -65504.0 if mask.dtype == torch.float16 else -1e30
        mask = mask > limit
    return mask.sum(-1).expand(b, hq, sq)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, _attention_fn)
    AttentionMaskInterface.register(IMPL_NAME, _mask_fn)


# -- switching a model ---------------------------------------------------------------------------------


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, module) of every self-attention module that calls the attention interface."""
    found = []
    for _, mod in model.named_modules():
        if (
            hasattr(mod, "scaling")
            and hasattr(mod, "layer_idx")
            and hasattr(mod, "config")
            and type(mod).__name__.endswith("Attention")
            and not getattr(mod, "is_cross_attention", False)
        ):
            found.append(mod)
    out = []
    for i, mod in enumerate(found):
        idx = mod.layer_idx if isinstance(mod.layer_idx, int) else i
        out.append((idx, mod))
    return out


def _unwrap(model):
    return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model


@contextlib.contextmanager
def attention_mode(
    model,
    mode: str,
    *,
    thresholds=None,
    comp_mode: int = 0,
    k: int | None = None,
    recorder=None,
    score_hook: Callable | None = None,
    keep_masks: dict[int, torch.Tensor] | None = None,
    attention_fn: Callable | None = None,
) -> Iterator[None]:
    """Run ``model`` (nn.Module or LoadedModel) with ``mode`` attention inside the ``with`` block.

    mode: "dense" (exact masked softmax, through torch SDPA), "toptheta" (reference Top-θ; needs
    ``thresholds``; ``comp_mode`` 0/1/2), "topk" (needs ``k``). ``recorder.record(layer, kept, n_valid)``
    receives per-call counts [B, Hq, Sq]. ``score_hook(layer, scores, valid)`` sees the scaled, masked scores
    (used by calibration). ``keep_masks`` ("toptheta" only): layer -> bool [B, Hq, Sq, Ktot] keep decisions
    used instead of ``s >= θ`` (pinned to another runtime's decisions for parity; every layer needs one).
    ``attention_fn(layer, q, k, v, mask, scale, causal)`` ("dense" only; with ``softcap=`` too for models that
    cap their scores, Gemma 2): computes the attention output [B, Hq, Sq, Dv] itself (calibration: chunked over
    query rows, so that no [Sq, Ktot] score matrix is held). Scores are softcapped where the model caps them.
    """
    if mode not in MODES:
        raise TopThetaError(f"unknown attention mode '{mode}': use one of {', '.join(MODES)}")
    if mode == "toptheta" and thresholds is None:
        raise TopThetaError("attention mode 'toptheta' needs thresholds: run calibrate first")
    if mode == "topk" and (k is None or int(k) < 1):
        raise TopThetaError("attention mode 'topk' needs k >= 1")
    if keep_masks is not None and mode != "toptheta":
        raise TopThetaError(f"keep_masks pin Top-θ keep decisions: use them with mode 'toptheta', not '{mode}'")
    if attention_fn is not None and mode != "dense":
        raise TopThetaError(f"attention_fn replaces dense attention: use it with mode 'dense', not '{mode}'")
    if comp_mode not in (0, 1, 2):
        raise TopThetaError(f"comp_mode must be 0 (none), 1 (SDC) or 2 (SDC + VMC), got {comp_mode}")
    net = _unwrap(model)
    mods = attention_modules(net)
    if not mods:
        raise TopThetaError(f"no attention modules found in {type(net).__name__}: unsupported architecture")
    if mode == "toptheta":
        _check_thresholds(net, mods, thresholds)
    _register()
    state = _State(
        mode, thresholds, comp_mode, None if k is None else int(k), recorder, score_hook, keep_masks, attention_fn
    )
    previous = net.config._attn_implementation
    saved = [(mod, getattr(mod, _STATE_ATTR, None)) for _, mod in mods]  # allows nesting
    for idx, mod in mods:
        setattr(mod, _STATE_ATTR, state)
        setattr(mod, _LAYER_ATTR, idx)
    try:
        net.set_attn_implementation(IMPL_NAME)
        yield
    finally:
        net.set_attn_implementation(previous or "sdpa")
        for mod, old in saved:
            if old is not None:
                setattr(mod, _STATE_ATTR, old)
            else:
                for attr in (_STATE_ATTR, _LAYER_ATTR):
                    if hasattr(mod, attr):
                        delattr(mod, attr)


def _check_thresholds(net, mods, thresholds) -> None:
    n_layers = max(i for i, _ in mods) + 1
    heads = getattr(net.config, "num_attention_heads", thresholds.num_heads)
    for what, mine, theirs in (("layers", thresholds.num_layers, n_layers), ("heads", thresholds.num_heads, heads)):
        if mine != theirs:
            raise TopThetaError(
                f"thresholds have {mine} {what} but the model has {theirs}: calibrate thresholds for this model"
            )
