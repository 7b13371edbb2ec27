"""The architecture registry: everything the stages need to know about a model family, one entry each.

Adding a decoder whose attention goes through transformers' ``sdpa`` attention interface is one entry here:
loading (models.py), calibration hooks (torch/attention.py), export metadata (onnx/exporter.py) and the
layer mapping of the rewrite (onnx/rewriter.py) all read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import TopThetaError


def _no_window(cfg: Any) -> int:
    return 0


def _config_window(cfg: Any) -> int:
    """The window of the sliding layers (0: every layer is global).

    Mistral/Qwen2/Qwen3 configs carry ``sliding_window`` even when it is off (``use_sliding_window``); Gemma 2/3
    and Qwen mix sliding and global layers through ``layer_types``; Phi-3 slides on every layer when it is set.
    """
    window = getattr(cfg, "sliding_window", None) or 0
    if getattr(cfg, "use_sliding_window", True) is False:
        return 0
    layer_types = getattr(cfg, "layer_types", None) or []
    if layer_types and all(t == "full_attention" for t in layer_types):
        return 0
    return int(window)


@dataclass(frozen=True)
class Architecture:
    """One model family (a transformers ``model_type``)."""

    model_type: str
    # decoder LM with causal self-attention (AutoModelForCausalLM), else an encoder (AutoModel)
    causal: bool
    # attribute holding the list of transformer blocks, as it appears in module paths ("model.layers.3")
    layers_attr: str
    sliding_window: Callable[[Any], int] = _no_window
    # what the plain PyTorch model runs with: "sdpa", or "eager" where transformers' sdpa path does not apply
    # (Gemma 2 caps its attention logits, which sdpa refuses); those export through onnx/softcap.py
    attn_implementation: str = "sdpa"

    def attention_kinds(self, cfg: Any) -> list[str]:
        """``"sliding"`` or ``"global"`` for every layer: Gemma 2/3 and Qwen mix both (``layer_types``),
        Mistral and Phi-3 slide on every layer when their window is set."""
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        if not self.sliding_window(cfg):
            return ["global"] * layers
        types = list(getattr(cfg, "layer_types", None) or [])
        if len(types) == layers:
            return ["sliding" if t == "sliding_attention" else "global" for t in types]
        return ["sliding"] * layers

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.causal else "AutoModel"


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", causal=True, layers_attr="layers"),
        Architecture("qwen2", causal=True, layers_attr="layers", sliding_window=_config_window),
        Architecture("mistral", causal=True, layers_attr="layers", sliding_window=_config_window),
        Architecture("qwen3", causal=True, layers_attr="layers", sliding_window=_config_window),
        Architecture("phi3", causal=True, layers_attr="layers", sliding_window=_config_window),
        Architecture(
            "gemma2", causal=True, layers_attr="layers", sliding_window=_config_window, attn_implementation="eager"
        ),
        Architecture("gemma3_text", causal=True, layers_attr="layers", sliding_window=_config_window),
        Architecture("gpt_neox", causal=True, layers_attr="layers"),
        Architecture("gpt2", causal=True, layers_attr="h"),
        Architecture("bert", causal=False, layers_attr="layer"),
    )
}

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# A block index inside a module path or an exporter name scope, for every registered layout.
LAYER_PATH_RE = re.compile(
    r"(?:^|\.)(?:" + "|".join(sorted({re.escape(a.layers_attr) for a in ARCHITECTURES.values()})) + r")\.(\d+)(?:\.|$)"
)


def architecture(model_type: Any, where: str) -> Architecture:
    """The registry entry of ``model_type``; a one-line error naming the supported ones otherwise."""
    arch = ARCHITECTURES.get(str(model_type)) if model_type is not None else None
    if arch is None:
        raise TopThetaError(
            f"unsupported architecture '{model_type}' in {where}: supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return arch
