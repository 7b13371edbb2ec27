"""The attention forms of a dense export, as onnxscript rewrite rules onto ``ai.toptheta::TopThetaAttention``.

One rule class per way K/V reach the ONNX ``Attention`` node (docs/graph.md, "Rewrite rules"), tried in
this order: ``CachedGqaAttention``, ``GqaAttention``, ``CachedMhaAttention``, ``MhaAttention``. Every rule
replaces the node by TopThetaAttention with the layer's θ / ρ initializers; the mask and causality are one
decision for the whole graph (``MaskPlan``), applied the same way by every rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .._errors import TopThetaError
from ..thresholds import Thresholds
from . import names
from .layers import attention_layers

__all__ = [
    "RULE_CLASSES",
    "CachedGqaAttention",
    "CachedMhaAttention",
    "GqaAttention",
    "MaskPlan",
    "MatchedLayer",
    "MhaAttention",
    "RuleContext",
    "attention_rules",
    "const_ints",
    "unsupported_reason",
]

_FIX_THRESHOLDS = "use thresholds calibrated for this model"


@dataclass
class MaskPlan:
    """How every rewritten layer gets its mask: the shared key-padding mask, or (no ``shared``) its own mask."""

    shared: ir.Value | None = None  # bool [B, Ktot], cast once from the attention_mask input
    source: ir.Value | None = None  # that attention_mask input: a node mask built from it is replaced
    causal: bool = False  # the op's causal flag with the shared mask (bottom-right aligned)

    @classmethod
    def key_padding(cls, graph: ir.Graph, attention_mask: ir.Value, causal: bool) -> MaskPlan:
        """Share one bool ``[B, Ktot]`` mask cast from ``attention_mask`` (inserted first in ``graph``)."""
        if attention_mask.dtype == ir.DataType.BOOL:
            return cls(attention_mask, attention_mask, causal)
        cast = ir.Node(
            "",
            "Cast",
            [attention_mask],
            {"to": ir.AttrInt64("to", ir.DataType.BOOL)},
            num_outputs=1,
            name=names.MASK_NODE,
        )
        shared = cast.outputs[0]
        shared.name, shared.dtype, shared.shape = names.MASK_NAME, ir.DataType.BOOL, attention_mask.shape
        graph.insert_before(graph.node(0), cast)
        return cls(shared, attention_mask, causal)


@dataclass
class MatchedLayer:
    """What a rule did to one layer (one row of rewrite's report)."""

    layer: int
    name: str
    form: str
    num_heads: int
    num_kv_heads: int
    gqa_peeled: bool
    mask: str  # "key_padding" | "4d" | "none"
    causal: int

    def report(self, rows: int) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "name": self.name,
            "form": self.form,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "gqa_peeled": self.gqa_peeled,
            "mask": self.mask,
            "causal": self.causal,
            "rows": rows,
        }


@dataclass
class RuleContext:
    """What the rules share: thresholds, the node -> layer map, the mask plan; what they matched or refused."""

    thresholds: Thresholds
    layers: dict[ir.Node, tuple[int, str]]
    comp_mode: int = 0
    mask_plan: MaskPlan = field(default_factory=MaskPlan)
    matched: dict[int, MatchedLayer] = field(default_factory=dict)
    rejections: dict[ir.Node, list[str]] = field(default_factory=dict)

    @classmethod
    def for_graph(cls, graph: ir.Graph, thresholds: Thresholds, **kwargs: Any) -> RuleContext:
        return cls(thresholds, attention_layers(graph), **kwargs)

    def reject(self, rule: str, node: ir.Node, reason: str) -> pattern.MatchResult:
        self.rejections.setdefault(node, []).append(f"{rule}: {reason}")
        return pattern.MatchResult().fail(reason, node)

    def why_not(self, node: ir.Node) -> str:
        """Every rule's reason for refusing ``node``, on one line."""
        return "; ".join(self.rejections.get(node, [])) or "no rule's pattern matches its inputs"


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def unsupported_reason(node: ir.Node) -> str | None:
    """Why this Attention node cannot become a TopThetaAttention whatever its form, or None."""
    softcap = float(_attr(node, "softcap", 0.0))
    if not (math.isfinite(softcap) and softcap >= 0.0):
        return f"its softcap {softcap} is neither 0 nor a finite positive cap"
    if int(_attr(node, "qk_matmul_output_mode", 0)) != 0:
        return "it uses qk_matmul_output_mode"
    for out in node.outputs[1:]:
        if out is not None and (out.uses() or out.is_graph_output()):
            return f"its output '{out.name}' (not only Y) is used"
    if any(v is not None for v in node.inputs[4:]):
        return "it takes past_key/past_value/nonpad_kv_seqlen inputs"
    q = node.inputs[0]
    if q is None or q.shape is None or len(q.shape) != 4:
        return "its query is not a 4-D [B, H, S, D] tensor"
    if not isinstance(q.shape[1], int) or not isinstance(q.shape[3], int):
        return f"its query shape {q.shape} has no static head count/head size"
    return None


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The values of a constant integer tensor, flattened; None when ``value`` is not a constant."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _dim(value: ir.Value, axis: int) -> int:
    """A static dimension the rule's check has already proven to exist."""
    assert value.shape is not None
    return int(value.shape[axis])


def _static_heads(value: ir.Value | None) -> int | None:
    shape = None if value is None else value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return int(shape[1])


def _gqa_problem(
    which: str, source: ir.Value, axes: ir.Value, grouped: ir.Value, expanded: ir.Value, num_heads: int
) -> str | None:
    """Why ``Reshape(Expand(Unsqueeze(source, axes)))`` is not the repeat of ``source``'s heads over groups."""
    if const_ints(axes) not in ([2], [-3]):
        return f"its {which} is unsqueezed on axes {const_ints(axes)}, not on axis 2 (the query-group axis)"
    hkv = _static_heads(source)
    if hkv is None or hkv <= 0 or num_heads % hkv:
        return f"its {which} source shape {source.shape} has no static head count dividing {num_heads}"
    gshape = grouped.shape
    if gshape is not None and len(gshape) == 5 and isinstance(gshape[2], int) and int(gshape[2]) * hkv != num_heads:
        return f"its {which} is expanded to {gshape[2]} groups of {hkv} heads, not {num_heads} query heads"
    if expanded.shape is not None and (len(expanded.shape) != 4 or expanded.shape[1] != num_heads):
        return f"its expanded {which} has shape {expanded.shape}, not {num_heads} heads"
    return None


def _cache_problem(which: str, present: ir.Value) -> str | None:
    """Why ``present`` is not a KV cache: Concat(past, new) on the sequence axis, a graph output."""
    concat = present.producer()
    axis = None if concat is None else _attr(concat, "axis", None)
    if axis not in (2, -2):
        return f"its {which} Concat is on axis {axis}, not on the sequence axis 2"
    if not present.is_graph_output():
        return f"its {which} Concat output '{present.name}' is not a graph output (not a KV cache)"
    return None


def _depends_on(value: ir.Value | None, target: ir.Value | None, limit: int = 2000) -> bool:
    """Whether ``target`` is an ancestor of ``value`` (bounded graph walk)."""
    seen: set[int] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is target:
            return True
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return False


class _AttentionRule(pattern.RewriteRuleClassBase):
    """Shared check / rewrite; a subclass states its K/V pattern, what it requires of it, and what the op reads.

    ``remove_nodes=False``: the cache Concat feeds a graph output and the mask subgraph is shared by all layers,
    so the matched producers stay and the rule set's dead-node pass removes what became unused.
    """

    gqa = False  # whether the form repeats K/V over the query group (the op then reads the Hkv-head source)

    def __init__(self, context: RuleContext) -> None:
        super().__init__(type(self).__name__, remove_nodes=False)
        self.context = context

    @classmethod
    def rule(cls, context: RuleContext) -> pattern.RewriteRule:
        return super().rule(context)

    def form_problem(self, num_heads: int, **bindings: Any) -> str | None:
        raise NotImplementedError

    def kv(self, **bindings: Any) -> tuple[ir.Value, ir.Value]:
        """The K and V the TopThetaAttention node reads."""
        raise NotImplementedError

    def _mask_problem(self, mask: ir.Value | None) -> str | None:
        plan = self.context.mask_plan
        if mask is None or (plan.shared is not None and _depends_on(mask, plan.source)):
            return None
        if mask.shape is not None and len(mask.shape) != 4:
            # the op reads a 2-D mask as [B, Ktot] key padding; ONNX Attention's 2-D mask is [Sq, Ktot]
            return f"its mask has shape {mask.shape}, not a 4-D [B|1, H|1, Sq, Ktot] mask"
        if mask.dtype is not None and mask.dtype != ir.DataType.BOOL and not mask.dtype.is_floating_point():
            return f"its mask has type {mask.dtype}, neither bool nor an additive float"
        return None

    def check(self, context: Any, **bindings: Any) -> pattern.MatchResult:
        attention_y, query, mask = bindings.pop("attention_y"), bindings.pop("query"), bindings.pop("mask", None)
        node = attention_y.producer()
        assert node is not None
        if node not in self.context.layers:
            return self.context.reject(self.name, node, "it is not one of the graph's attention blocks")
        why = unsupported_reason(node)
        if why is None:
            why = self.form_problem(_dim(query, 1), **bindings) or self._mask_problem(mask)
        if why:
            return self.context.reject(self.name, node, why)
        return pattern.MatchResult()

    def rewrite(
        self, op: Any, attention_y: ir.Value, query: ir.Value, mask: ir.Value | None = None, **bindings: Any
    ) -> ir.Value:
        node = attention_y.producer()
        assert node is not None
        ctx = self.context
        layer, name = ctx.layers[node]
        num_heads, head_dim = _dim(query, 1), _dim(query, 3)
        key, value = self.kv(**bindings)
        num_kv_heads = _static_heads(key) or 0  # 0: the op takes it from K
        theta, sdc = (t.numpy() for t in ctx.thresholds.layer(layer))
        self._check_thresholds(layer, name, theta, num_heads, num_kv_heads)
        plan = ctx.mask_plan
        if plan.shared is not None and (mask is None or _depends_on(mask, plan.source)):
            mask, mask_kind, causal = plan.shared, "key_padding", int(plan.causal)
        else:
            mask_kind, causal = ("4d" if mask is not None else "none"), int(_attr(node, "is_causal", 0))
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        # Gemma 2's logit cap: only written when set, so other graphs keep the attributes they had
        softcap = {"softcap": float(_attr(node, "softcap", 0.0))} if float(_attr(node, "softcap", 0.0)) else {}
        theta_v = op.initializer(ir.tensor(np.ascontiguousarray(theta, np.float32)), names.theta_name(layer))
        # ρ is always attached (a few KB per layer) so that a deployment can switch comp_mode without
        # re-exporting; with comp_mode 0 the operator ignores it.
        sdc_v = op.initializer(ir.tensor(np.ascontiguousarray(sdc, np.float32)), names.sdc_name(layer))
        y = op.op(
            names.OP_TYPE,
            query,
            key,
            value,
            theta_v,
            mask,
            None,
            None,
            sdc_v,
            _domain=names.DOMAIN,
            _version=names.OP_VERSION,
            _name=f"{names.ATTENTION_NODE_PREFIX}{layer}",
            scale=scale,
            causal=causal,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            comp_mode=int(ctx.comp_mode),
            **softcap,
        )
        new = y.producer()
        new.metadata_props.update(node.metadata_props)
        new.metadata_props[names.LAYER_META] = str(layer)
        ctx.matched[layer] = MatchedLayer(
            layer, name, self.name, num_heads, num_kv_heads, self.gqa and num_kv_heads != num_heads, mask_kind, causal
        )
        return y

    def _check_thresholds(self, layer: int, name: str, theta: np.ndarray, num_heads: int, num_kv_heads: int) -> None:
        if theta.ndim != 2 or theta.shape[0] != num_heads:
            raise TopThetaError(
                f"layer {layer} ({name}): thresholds have shape {list(theta.shape)} but the "
                f"attention node has {num_heads} query heads (expected [{num_heads}, R]): "
                f"{_FIX_THRESHOLDS}"
            )
        calibrated = self.context.thresholds.meta.get("num_kv_heads")
        if self.gqa and calibrated is not None and int(calibrated) != num_kv_heads:
            raise TopThetaError(
                f"layer {layer} ({name}): the graph has {num_kv_heads} kv heads but the "
                f"thresholds were calibrated with {calibrated}: {_FIX_THRESHOLDS}"
            )


def _mask_var() -> Any:
    return pattern.Var("mask", can_match_none=True)


def _repeated_over_group(op: Any, source: Any, axes: Any, which: str) -> Any:
    """The GQA repeat of K or V over the query group: ``Reshape(Expand(Unsqueeze(source, axes)))``."""
    grouped = op.Expand(op.Unsqueeze(source, axes), pattern.ANY_VALUE, _outputs=[f"{which}_grouped"])
    return op.Reshape(grouped, pattern.ANY_VALUE, _outputs=[f"{which}_expanded"])


class CachedGqaAttention(_AttentionRule):
    """Decoder with a KV cache and fewer kv heads: ``Concat(past, new)`` (the ``present`` output) repeated over
    the query group by ``Unsqueeze(axis 2) → Expand → Reshape``. The op reads the ``present`` tensors."""

    gqa = True

    def pattern(self, op, query, past_key, new_key, past_value, new_value, key_axes, value_axes):
        present_key = op.Concat(past_key, new_key, _outputs=["present_key"])
        present_value = op.Concat(past_value, new_value, _outputs=["present_value"])
        key = _repeated_over_group(op, present_key, key_axes, "key")
        value = _repeated_over_group(op, present_value, value_axes, "value")
        return op.Attention(query, key, value, _mask_var(), _outputs=["attention_y"])

    def form_problem(self, num_heads: int, **b: Any) -> str | None:
        return (
            _cache_problem("key", b["present_key"])
            or _cache_problem("value", b["present_value"])
            or _gqa_pair_problem(b["present_key"], b["present_value"], num_heads, b)
        )

    def kv(self, **b: Any) -> tuple[ir.Value, ir.Value]:
        return b["present_key"], b["present_value"]


class GqaAttention(_AttentionRule):
    """Fewer kv heads, no cache (or a cache the previous rule refused): K/V ``[B,Hkv,S,D]`` repeated over the
    query group by ``Unsqueeze(axis 2) → Expand → Reshape``. The op reads the Hkv-head sources."""

    gqa = True

    def pattern(self, op, query, key_source, value_source, key_axes, value_axes):
        key = _repeated_over_group(op, key_source, key_axes, "key")
        value = _repeated_over_group(op, value_source, value_axes, "value")
        return op.Attention(query, key, value, _mask_var(), _outputs=["attention_y"])

    def form_problem(self, num_heads: int, **b: Any) -> str | None:
        return _gqa_pair_problem(b["key_source"], b["value_source"], num_heads, b)

    def kv(self, **b: Any) -> tuple[ir.Value, ir.Value]:
        return b["key_source"], b["value_source"]


def _gqa_pair_problem(key: ir.Value, value: ir.Value, num_heads: int, b: dict[str, Any]) -> str | None:
    problem = _gqa_problem("key", key, b["key_axes"], b["key_grouped"], b["key_expanded"], num_heads) or _gqa_problem(
        "value", value, b["value_axes"], b["value_grouped"], b["value_expanded"], num_heads
    )
    if problem is None and _static_heads(key) != _static_heads(value):
        problem = f"its key and value have {_static_heads(key)} and {_static_heads(value)} kv heads"
    return problem


class CachedMhaAttention(_AttentionRule):
    """Decoder with a KV cache, K/V read at their own head count: ``Concat(past, new)`` (the ``present``
    output) straight into Attention (gpt2)."""

    def pattern(self, op, query, past_key, new_key, past_value, new_value):
        key = op.Concat(past_key, new_key, _outputs=["present_key"])
        value = op.Concat(past_value, new_value, _outputs=["present_value"])
        return op.Attention(query, key, value, _mask_var(), _outputs=["attention_y"])

    def form_problem(self, num_heads: int, **b: Any) -> str | None:
        return (
            _cache_problem("key", b["present_key"])
            or _cache_problem("value", b["present_value"])
            or _direct_kv_problem(b["present_key"], b["present_value"], num_heads)
        )

    def kv(self, **b: Any) -> tuple[ir.Value, ir.Value]:
        return b["present_key"], b["present_value"]


class MhaAttention(_AttentionRule):
    """K/V straight into Attention at their own head count (encoders, caches the rules above refused)."""

    def pattern(self, op, query, key, value):
        return op.Attention(query, key, value, _mask_var(), _outputs=["attention_y"])

    def form_problem(self, num_heads: int, **b: Any) -> str | None:
        return _direct_kv_problem(b["key"], b["value"], num_heads)

    def kv(self, **b: Any) -> tuple[ir.Value, ir.Value]:
        return b["key"], b["value"]


def _direct_kv_problem(key: ir.Value, value: ir.Value, num_heads: int) -> str | None:
    for which, v in (("key", key), ("value", value)):
        if v.shape is not None and len(v.shape) != 4:
            return f"its {which} has shape {v.shape}, not a 4-D [B, H, S, D] tensor"
        heads = _static_heads(v)
        if heads is not None and (heads <= 0 or num_heads % heads):
            return f"its {which} has {heads} heads, which do not divide the {num_heads} query heads"
    return None


RULE_CLASSES: tuple[type[_AttentionRule], ...] = (CachedGqaAttention, GqaAttention, CachedMhaAttention, MhaAttention)


def attention_rules(context: RuleContext) -> pattern.RewriteRuleSet:
    """Every form's rule, most specific first (a node takes the first rule whose check accepts it)."""
    return pattern.RewriteRuleSet([cls.rule(context) for cls in RULE_CLASSES])
