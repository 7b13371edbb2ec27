"""Export of attention with logit softcapping (Gemma 2) as one ONNX ``Attention`` node with ``softcap``.

transformers' ``sdpa`` attention refuses ``softcap`` (Gemma 2 models declare no sdpa support and run eager,
whose matmul / tanh / softmax chain the rewrite cannot match). During the export such a model runs with the
attention function registered here as ``SOFTCAP_IMPL``: K/V repeated over the query group exactly like the
sdpa path (``repeat_kv``, so the rewrite rules see the same pattern), then one opaque torch op that the
exporter translates to opset-23 ``Attention(Q, K, V, mask, scale=, softcap=)``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SOFTCAP_IMPL", "register", "translation_table"]

SOFTCAP_IMPL = "toptheta_softcap_export"


@torch.library.custom_op("toptheta_export::softcap_attention", mutates_args=())
def softcap_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """[B, H, Sq, Dv] = softmax(mask(softcap · tanh(scale · Q Kᵀ / softcap))) V (K/V already at H heads)."""
    from ..torch.reference import dense_attention

    return dense_attention(query, key, value, scale=scale, attn_mask=mask, softcap=softcap)


@softcap_attention.register_fake
def _(query, key, value, mask, scale, softcap):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _onnx_softcap_attention(query, key, value, mask, scale: float, softcap: float):
    from onnxscript.onnx_opset import opset23 as op23

    y, _, _, _ = op23.Attention(query, key, value, attn_mask=mask, scale=scale, softcap=softcap)
    return y


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` entry of ``torch.onnx.export`` for the op above."""
    return {torch.ops.toptheta_export.softcap_attention.default: _onnx_softcap_attention}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if attention_mask is None:  # never the case with the mask function below, kept for safety
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
    scale = float(scaling) if scaling else query.shape[-1] ** -0.5
    out = softcap_attention(query, key, value, attention_mask, scale, float(softcap or 0.0))
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """An explicit bool [B, 1, Sq, Kv] mask, as the sdpa path builds it (never skipped for causal models)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SOFTCAP_IMPL, _attention)
    AttentionMaskInterface.register(SOFTCAP_IMPL, _mask)
