"""Which transformer layer an ONNX ``Attention`` node belongs to, from the torch name scopes of the export."""

from __future__ import annotations

import ast
from typing import Any

from .._errors import TopThetaError
from ..architectures import LAYER_PATH_RE
from .names import SCOPES_KEY

__all__ = ["REEXPORT_FIX", "attention_layers", "attention_nodes", "layer_of", "name_for"]

REEXPORT_FIX = "re-export the model with topthetaexport.export_onnx (attn_implementation='sdpa', opset 23)"


def _scopes(node: Any) -> list[str]:
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []


def layer_of(node: Any) -> tuple[int | None, str]:
    """(layer index, module name) from the node's torch name scopes; (None, node name) if absent."""
    scopes = _scopes(node)
    module = scopes[-2] if len(scopes) >= 2 else (scopes[-1] if scopes else "")
    module = module.removeprefix("model.")  # the export wrapper's attribute name
    for scope in reversed(scopes):
        m = list(LAYER_PATH_RE.finditer(scope))
        if m:
            return int(m[-1].group(1)), module or (node.name or "?")
    return None, module or (node.name or "?")


def attention_nodes(graph: Any) -> list[Any]:
    """The standard ONNX ``Attention`` nodes of ``graph``, in graph order."""
    return [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


def attention_layers(graph: Any) -> dict[Any, tuple[int, str]]:
    """Attention node -> (layer, module name); a node without scopes takes its position among the nodes.

    Two nodes on one layer are a one-line TopThetaError (the export is not one the rewrite understands).
    """
    out: dict[Any, tuple[int, str]] = {}
    by_layer: dict[int, str] = {}
    for order, node in enumerate(attention_nodes(graph)):
        layer, name = layer_of(node)
        layer = order if layer is None else layer
        if layer in by_layer:
            raise TopThetaError(
                f"two attention blocks map to layer {layer} ({by_layer[layer]} and {name}): {REEXPORT_FIX}"
            )
        by_layer[layer] = name
        out[node] = (layer, name)
    return out


def name_for(pattern: str, layer: int, other: int) -> str:
    """The module name of layer ``other`` given ``pattern``, the module name of ``layer`` ('' if unknown)."""
    if not pattern:
        return ""
    return LAYER_PATH_RE.sub(lambda m: m.group(0).replace(f".{layer}", f".{other}", 1), pattern, count=1)
