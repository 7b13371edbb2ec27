"""Attention as other exporters write it, as onnxscript rewrite rules onto ``ai.toptheta::TopThetaAttention``.

One rule class per foreign form (docs/graph.md, "Graphs made elsewhere"):

* ``DecomposedAttention``: ``MatMul → (Div|Mul) → (Add mask) → Softmax → MatMul``, including the torch SDPA
  decomposition that ``optimum-cli export onnx`` emits (``Mul(Q, √s)``, ``Mul(Kᵀ, √s)``, ``IsNaN``/``Where``
  after the Softmax), with the repeat_kv ``Unsqueeze → Expand → Reshape`` and the KV ``Concat`` before it;
* ``MicrosoftMultiHeadAttention`` / ``CachedMicrosoftMultiHeadAttention``: ``com.microsoft.MultiHeadAttention``;
* ``MicrosoftGroupQueryAttention``: ``com.microsoft.GroupQueryAttention`` (onnxruntime-genai's model builder),
  packed QKV, do_rotary and the seqlens_k / total_sequence_length KV cache included.

The rewritten graph keeps the foreign graph's inputs and outputs. The layer of each block comes from
``foreign_layers`` (node names, else graph order); θ / ρ are attached as in ``rules``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult  # in a rule class, its own ``pattern`` method shadows the module

from .._errors import TopThetaError
from ..architectures import LAYER_PATH_RE
from ..thresholds import Thresholds
from . import names
from .rules import MatchedLayer, RuleContext

__all__ = [
    "FOREIGN_RULE_CLASSES",
    "CachedMicrosoftMultiHeadAttention",
    "DecomposedAttention",
    "MicrosoftGroupQueryAttention",
    "MicrosoftMultiHeadAttention",
    "SharedMicrosoftGroupQueryAttention",
    "foreign_layers",
    "foreign_rules",
    "foreign_sites",
]

MS_DOMAIN = "com.microsoft"
_FIX_THRESHOLDS = "use thresholds calibrated (topθ-export calibrate) on the PyTorch model this graph was exported from"


# -- small graph helpers ----------------------------------------------------------------------------------


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a constant one-element tensor, else None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _static(value: ir.Value | None, axis: int, rank: int = 4) -> int | None:
    shape = None if value is None else value.shape
    if shape is None or len(shape) != rank or not isinstance(shape[axis], int):
        return None
    return int(shape[axis])


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = None if value is None else value.producer()
    domains = (domain,) if domain else ("", "ai.onnx")
    return node if node is not None and node.op_type == op_type and node.domain in domains else None


def _peel_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """``value`` without a ``Mul``/``Div`` by a constant scalar, and the factor that was applied."""
    factor = 1.0
    while True:
        node = value.producer()
        if node is None or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
            return value, factor
        a, b = node.inputs
        c = _scalar(b)
        if c is None and node.op_type == "Mul":
            a, c = b, _scalar(a)
        if c is None or a is None or c == 0.0:
            return value, factor
        factor *= c if node.op_type == "Mul" else 1.0 / c
        value = a


def _peel_repeat_kv(value: ir.Value) -> ir.Value:
    """The ``[B, Hkv, S, D]`` source of the repeat over the query group ``Reshape(Expand(Unsqueeze(x, 2)))``."""
    reshape = _producer(value, "Reshape")
    expand = _producer(reshape.inputs[0] if reshape else None, "Expand")
    unsqueeze = _producer(expand.inputs[0] if expand else None, "Unsqueeze")
    if unsqueeze is None or unsqueeze.inputs[0] is None:
        return value
    axes = _ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else list(_attr(unsqueeze, "axes", []))
    if axes not in ([2], [-3]):
        return value
    return unsqueeze.inputs[0]


# -- which nodes are attention blocks, and which layer each one is ---------------------------------------------


def _softmax_of_probs(probs: ir.Value | None) -> ir.Node | None:
    """The Softmax behind attention probabilities: ``Softmax`` itself or ``Where(IsNaN(p), 0, p)`` of it,
    through ``Cast`` nodes (eager attention's softmax in float32, cast back to the query's type)."""
    while (cast := _producer(probs, "Cast")) is not None:
        probs = cast.inputs[0]
    softmax = _producer(probs, "Softmax")
    if softmax is not None:
        return softmax
    where = _producer(probs, "Where")
    if where is None or _producer(where.inputs[0], "IsNaN") is None:
        return None
    return _producer(where.inputs[2], "Softmax")


def _is_site(node: ir.Node) -> bool:
    if node.domain == MS_DOMAIN:
        return node.op_type in ("GroupQueryAttention", "MultiHeadAttention")
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and _softmax_of_probs(node.inputs[0]) is not None


def foreign_sites(graph: ir.Graph) -> list[ir.Node]:
    """The attention blocks of a graph made elsewhere, in graph order: the ``probs @ V`` MatMul of each
    decomposed block, each ``com.microsoft`` MultiHeadAttention / GroupQueryAttention node."""
    return [n for n in graph if _is_site(n)]


def _layer_in_name(name: str) -> int | None:
    found = list(LAYER_PATH_RE.finditer(name.replace("/", ".")))
    return int(found[-1].group(1)) if found else None


def foreign_layers(graph: ir.Graph, thresholds: Thresholds) -> dict[ir.Node, tuple[int, str]]:
    """Attention block -> (layer, node name), by order and shapes.

    Layer numbers come from the node names (``/model/layers.3/...``) when every block has one, else from
    graph order. Two blocks on one layer, or a block count other than the thresholds' layer count, are a
    one-line TopThetaError; so is a head count that differs from the thresholds' (checked per layer by the rules).
    """
    sites = foreign_sites(graph)
    if not sites:
        return {}
    layers = [i for n in sites if (i := _layer_in_name(n.name or "")) is not None]
    if len(layers) != len(sites):  # not every block is named for its layer: graph order
        layers = list(range(len(sites)))
    seen: dict[int, str] = {}
    for node, layer in zip(sites, layers):
        if layer in seen:
            raise TopThetaError(
                f"the graph's attention blocks are ambiguous: {seen[layer]} and {node.name} both belong to "
                f"layer {layer}: pass a graph with one attention block per transformer layer"
            )
        seen[layer] = node.name or node.op_type
    if len(layers) == thresholds.num_layers and sorted(layers) != list(range(thresholds.num_layers)):
        raise TopThetaError(
            f"the graph's attention blocks are named for layers {sorted(layers)}, not 0..{len(layers) - 1}: "
            "pass a graph whose node names number the layers from 0, or whose names carry no layer numbers"
        )
    if sorted(layers) != list(range(thresholds.num_layers)):
        raise TopThetaError(
            f"the graph has {len(sites)} attention blocks (layers {sorted(layers)}) but the thresholds have "
            f"{thresholds.num_layers} layers: {_FIX_THRESHOLDS}"
        )
    return {node: (layer, node.name or node.op_type) for node, layer in zip(sites, layers)}


# -- the rules ----------------------------------------------------------------------------------------------


class _ForeignRule(pattern.RewriteRuleClassBase):
    """Shared emission of the TopThetaAttention node; a subclass states its pattern, check and how it wires
    the op's inputs. ``remove_nodes=False``: shared subgraphs (masks, rotary caches, KV Concats that are
    graph outputs) stay, and the dead-node pass removes what became unused."""

    def __init__(self, context: RuleContext) -> None:
        super().__init__(type(self).__name__, remove_nodes=False)
        self.context = context

    @classmethod
    def rule(cls, context: RuleContext) -> pattern.RewriteRule:
        return super().rule(context)

    def _layer(self, node: ir.Node) -> tuple[int, str] | None:
        return self.context.layers.get(node)

    def _reject(self, node: ir.Node, reason: str) -> pattern.MatchResult:
        return self.context.reject(self.name, node, reason)

    def _emit(
        self,
        op: Any,
        node: ir.Node,
        *,
        query: ir.Value,
        key: ir.Value,
        value: ir.Value,
        mask: ir.Value | None,
        scale: float,
        causal: int,
        num_heads: int,
        num_kv_heads: int,
        past_key: ir.Value | None = None,
        past_value: ir.Value | None = None,
        past_sequence_length: ir.Value | None = None,
        num_outputs: int = 1,
        mask_kind: str = "4d",
    ) -> Any:
        ctx = self.context
        layer, name = ctx.layers[node]
        theta, sdc = (t.numpy() for t in ctx.thresholds.layer(layer))
        if theta.ndim != 2 or theta.shape[0] != num_heads:
            raise TopThetaError(
                f"layer {layer} ({name}): thresholds have shape {list(theta.shape)} but the graph's attention "
                f"block has {num_heads} query heads (expected [{num_heads}, R]): {_FIX_THRESHOLDS}"
            )
        calibrated = ctx.thresholds.meta.get("num_kv_heads")
        if calibrated is not None and num_kv_heads and int(calibrated) != num_kv_heads:
            raise TopThetaError(
                f"layer {layer} ({name}): the graph has {num_kv_heads} kv heads but the thresholds were "
                f"calibrated with {calibrated}: {_FIX_THRESHOLDS}"
            )
        theta_v = op.initializer(ir.tensor(np.ascontiguousarray(theta, np.float32)), names.theta_name(layer))
        sdc_v = op.initializer(ir.tensor(np.ascontiguousarray(sdc, np.float32)), names.sdc_name(layer))
        inputs = [query, key, value, theta_v, mask, past_key, past_value, sdc_v, past_sequence_length]
        while inputs[-1] is None:  # optional inputs left out at the end
            inputs.pop()
        outs = op.op(
            names.OP_TYPE,
            *inputs,
            _domain=names.DOMAIN,
            _version=names.OP_VERSION,
            _outputs=num_outputs,
            _name=f"{names.ATTENTION_NODE_PREFIX}{layer}",
            scale=float(scale),
            causal=int(causal),
            num_heads=int(num_heads),
            num_kv_heads=int(num_kv_heads),
            comp_mode=int(ctx.comp_mode),
        )
        first = outs[0] if num_outputs > 1 else outs
        new = first.producer()
        new.metadata_props[names.LAYER_META] = str(layer)
        ctx.matched[layer] = MatchedLayer(
            layer, name, self.name, num_heads, num_kv_heads, num_kv_heads != num_heads, mask_kind, causal
        )
        return outs


@dataclass
class _Decomposed:
    query: ir.Value
    key: ir.Value  # [B, Hkv, Ktot, D]: before the repeat over the query group
    value: ir.Value
    mask: ir.Value | None
    scale: float
    num_heads: int
    num_kv_heads: int


class DecomposedAttention(_ForeignRule):
    """``probs @ V`` with ``probs = Softmax((Q·s₁) @ (Kᵀ·s₂) · s₃ + mask)`` (each scale optional, ``Div`` or
    ``Mul``), ``probs`` possibly guarded by ``Where(IsNaN(probs), 0, probs)``; K and V either at the query
    head count or repeated over the query group. The op reads the Hkv-head K/V (the ``present`` Concat when
    there is a KV cache, which stays a graph output), the mask as it is (causality is in it: ``causal=0``)
    and the product of the scales."""

    def __init__(self, context: RuleContext) -> None:
        super().__init__(context)
        self._parsed: dict[ir.Node, _Decomposed] = {}

    def pattern(self, op, probs, value):
        return op.MatMul(probs, value, _outputs=["attention_y"])

    def check(self, context: Any, attention_y: ir.Value, probs: ir.Value, value: ir.Value, **_: Any):
        node = attention_y.producer()
        assert node is not None
        if self._layer(node) is None:
            return pattern.MatchResult().fail("not an attention block", node)
        parsed = self._parse(probs, value)
        if isinstance(parsed, str):
            return self._reject(node, parsed)
        self._parsed[node] = parsed
        return pattern.MatchResult()

    def _parse(self, probs: ir.Value, value: ir.Value) -> _Decomposed | str:
        softmax = _softmax_of_probs(probs)
        assert softmax is not None  # foreign_sites chose this node for it
        if _attr(softmax, "axis", -1) not in (-1, 3):
            return f"its Softmax is on axis {_attr(softmax, 'axis', -1)}, not the key axis"
        scores, mask = softmax.inputs[0], None
        add = _producer(scores, "Add")
        if add is not None:
            for i in (0, 1):
                if _qk_matmul(_peel_scale(add.inputs[i])[0]) is not None:
                    scores, mask = add.inputs[i], add.inputs[1 - i]
                    break
            else:
                return "its Softmax input is an Add of no Q·Kᵀ MatMul"
        assert scores is not None
        raw, s3 = _peel_scale(scores)
        qk = _qk_matmul(raw)
        if qk is None:
            return "its Softmax does not read a Q·Kᵀ MatMul (through constant scales and a mask Add)"
        query, s1 = _peel_scale(qk.inputs[0])
        kt, s2 = _peel_scale(qk.inputs[1])
        transpose = _producer(kt, "Transpose")
        if transpose is None or list(_attr(transpose, "perm", [])) != [0, 1, 3, 2]:
            return "its K enters the score MatMul without a Transpose perm [0, 1, 3, 2]"
        key = _peel_repeat_kv(transpose.inputs[0])
        value = _peel_repeat_kv(value)
        num_heads = _static(probs, 1) or _static(transpose.inputs[0], 1) or _static(qk.outputs[0], 1)
        num_kv_heads = _static(key, 1)
        if num_heads is None or num_kv_heads is None or _static(value, 1) != num_kv_heads:
            return (
                f"its head counts are not static (query heads {num_heads}, key heads {num_kv_heads}, "
                f"value heads {_static(value, 1)})"
            )
        if num_heads % num_kv_heads:
            return f"its {num_kv_heads} kv heads do not divide its {num_heads} query heads"
        if mask is not None and mask.shape is not None and len(mask.shape) != 4:
            return f"its mask has shape {mask.shape}, not a 4-D [B|1, H|1, Sq, Ktot] mask"
        if query.shape is not None and len(query.shape) != 4:
            return f"its query has shape {query.shape}, not a 4-D [B, H, S, D] tensor"
        return _Decomposed(query, key, value, mask, s1 * s2 * s3, num_heads, num_kv_heads)

    def rewrite(self, op: Any, attention_y: ir.Value, **_: Any) -> Any:
        node = attention_y.producer()
        assert node is not None
        p = self._parsed.pop(node)
        return self._emit(
            op,
            node,
            query=p.query,
            key=p.key,
            value=p.value,
            mask=p.mask,
            scale=p.scale,
            causal=0,
            num_heads=p.num_heads,
            num_kv_heads=p.num_kv_heads,
            mask_kind="4d" if p.mask is not None else "none",
        )


def _qk_matmul(value: ir.Value | None) -> ir.Node | None:
    """The ``Q @ Kᵀ`` MatMul producing ``value`` (its second input a Transpose, possibly scaled), else None."""
    matmul = _producer(value, "MatMul")
    if matmul is None or matmul.inputs[1] is None:
        return None
    return matmul if _producer(_peel_scale(matmul.inputs[1])[0], "Transpose") is not None else None


# -- com.microsoft.MultiHeadAttention ---------------------------------------------------------------------


def _to_heads(op: Any, x: ir.Value, heads: int, head_dim: int) -> Any:
    """``[B, S, H·D]`` -> ``[B, H, S, D]``."""
    return op.Transpose(op.Reshape(x, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


def _from_heads(op: Any, y: ir.Value, heads: int, head_dim: int) -> Any:
    """``[B, H, S, D]`` -> ``[B, S, H·D]``."""
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, heads * head_dim]))


def _hidden(value: ir.Value | None) -> int | None:
    return _static(value, 2, rank=3)


class _MultiHeadAttention(_ForeignRule):
    """Shared by the two MultiHeadAttention forms: separate 3-D ``[B, S, H·D]`` Q/K/V, no bias, an optional
    key padding mask (``[B, Ktot]``, 1 = attend) or attention bias (``[B|1, H|1, Sq, Ktot]``)."""

    cached = False

    def check(self, context: Any, attention_y: ir.Value, **b: Any) -> pattern.MatchResult:
        node = attention_y.producer()
        assert node is not None
        if self._layer(node) is None:
            return pattern.MatchResult().fail("not an attention block", node)
        why = self._problem(node, b)
        return self._reject(node, why) if why else pattern.MatchResult()

    def _problem(self, node: ir.Node, b: dict[str, Any]) -> str | None:
        inputs = list(node.inputs) + [None] * 10
        if inputs[3] is not None:
            return "it has a bias input (fold it into the projections first)"
        if any(v is not None for v in inputs[8:10]):
            return "it takes past_sequence_length / cache_indirection (DecoderMaskedMultiHeadAttention form)"
        for out in node.outputs[3:]:
            if out is not None and (out.uses() or out.is_graph_output()):
                return "its qk output is used"
        if (inputs[6] is None) == self.cached:
            return "it has past inputs" if not self.cached else "it has no past inputs"
        if self.cached and (len(node.outputs) < 3 or node.outputs[1] is None or node.outputs[2] is None):
            return "it takes a past but returns no present"
        heads = int(_attr(node, "num_heads", 0))
        for which in ("query", "key", "value"):
            hidden = _hidden(b[which])
            if hidden is None or heads <= 0 or hidden % heads:
                return f"its {which} is not a 3-D [B, S, H·D] tensor with a static H·D divisible by {heads} heads"
        mask = inputs[4]
        if mask is not None and (mask.shape is None or len(mask.shape) != 2):
            return f"its key_padding_mask has shape {mask.shape}; only a 2-D [B, Ktot] mask is supported"
        bias = inputs[5]
        if bias is not None and (bias.shape is None or len(bias.shape) != 4):
            return f"its attention_bias has shape {bias.shape}, not 4-D"
        if mask is not None and bias is not None:
            return "it has both a key_padding_mask and an attention_bias"
        return None

    def rewrite(self, op: Any, attention_y: ir.Value, query: ir.Value, key: ir.Value, value: ir.Value, **_: Any):
        node = attention_y.producer()
        assert node is not None
        inputs = list(node.inputs) + [None] * 10
        heads = int(_attr(node, "num_heads", 0))
        head_dim = int(_hidden(query) or 0) // heads
        mask, bias = inputs[4], inputs[5]
        if mask is not None:
            mask = op.Cast(mask, to=ir.DataType.BOOL)
        elif bias is not None:
            mask = bias
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        outs = self._emit(
            op,
            node,
            query=_to_heads(op, query, heads, head_dim),
            key=_to_heads(op, key, heads, int(_hidden(key) or 0) // heads),
            value=_to_heads(op, value, heads, int(_hidden(value) or 0) // heads),
            mask=mask,
            scale=scale,
            causal=int(_attr(node, "unidirectional", 0)),
            num_heads=heads,
            num_kv_heads=heads,
            past_key=inputs[6],
            past_value=inputs[7],
            num_outputs=3 if self.cached else 1,
            mask_kind="key_padding" if inputs[4] is not None else ("4d" if bias is not None else "none"),
        )
        if not self.cached:
            return _from_heads(op, outs, heads, head_dim)
        y, present_key, present_value = outs
        return _from_heads(op, y, heads, head_dim), present_key, present_value


class MicrosoftMultiHeadAttention(_MultiHeadAttention):
    """``com.microsoft.MultiHeadAttention`` without a KV cache (one output)."""

    def pattern(self, op, query, key, value):
        return op.MultiHeadAttention(
            query, key, value, _domain=MS_DOMAIN, _allow_other_inputs=True, _outputs=["attention_y"]
        )


class CachedMicrosoftMultiHeadAttention(_MultiHeadAttention):
    """``com.microsoft.MultiHeadAttention`` with past_key/past_value: the op's concat-form KV cache produces
    the node's present outputs (``[B, H, P + S, D]``), so the graph's outputs stay as they were."""

    cached = True

    def pattern(self, op, query, key, value):
        return op.MultiHeadAttention(
            query,
            key,
            value,
            _domain=MS_DOMAIN,
            _allow_other_inputs=True,
            _outputs=["attention_y", "present_key", "present_value"],
        )


# -- com.microsoft.GroupQueryAttention --------------------------------------------------------------------


class MicrosoftGroupQueryAttention(_ForeignRule):
    """``com.microsoft.GroupQueryAttention``: Q/K/V ``[B, S, H·D]`` (or packed QKV in ``query``), the KV cache
    as past/present ``[B, Hkv, *, D]`` with ``seqlens_k`` (int32 ``[B]``, total length - 1 per row) and
    ``total_sequence_length`` (int32 scalar). With ``do_rotary`` the rotation is inserted before the op
    (``com.microsoft.RotaryEmbedding`` at GroupQueryAttention's positions). Keys past ``seqlens_k`` are masked
    (a bool ``[B, Ktot]`` key padding mask), ``causal=1``.

    ``shared=False``: the concat form (present = ``[past ; new]``). ``shared=True``: the op's shared-buffer form,
    with ``past_sequence_length = seqlens_k + 1 - S`` (0 for a first prompt, ``total_sequence_length == S``), so
    past and present can be bound to one buffer as GroupQueryAttention's ``past_present_share_buffer``.
    """

    shared = False

    def pattern(self, op, query, past_key, past_value, seqlens_k, total_sequence_length):
        return op.GroupQueryAttention(
            query,
            pattern.Var("key", can_match_none=True),  # None: packed QKV in query
            pattern.Var("value", can_match_none=True),
            past_key,
            past_value,
            seqlens_k,
            total_sequence_length,
            _domain=MS_DOMAIN,
            _allow_other_inputs=True,
            _outputs=["attention_y", "present_key", "present_value"],
        )

    def check(self, context: Any, attention_y: ir.Value, **b: Any) -> MatchResult:
        node = attention_y.producer()
        assert node is not None
        if self._layer(node) is None:
            return MatchResult().fail("not an attention block", node)
        why = self._problem(node)
        return self._reject(node, why) if why else pattern.MatchResult()

    def _problem(self, node: ir.Node) -> str | None:
        inputs = list(node.inputs) + [None] * 12
        if int(_attr(node, "local_window_size", -1)) != -1:
            return "it uses a local (sliding) window"
        if float(_attr(node, "softcap", 0.0)) != 0.0:
            return "it uses softcap"
        if int(_attr(node, "smooth_softmax", 0)) != 0:
            return "it uses smooth_softmax"
        if any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[3:]):
            return "its output_qk is used"
        if any(v is not None for v in inputs[9:12]):
            return "it takes position_ids / attention_bias / head_sink inputs"
        if inputs[3] is None or inputs[4] is None:
            return "it has no past_key/past_value (no KV cache)"
        if int(_attr(node, "do_rotary", 0)) and (inputs[7] is None or inputs[8] is None):
            return "it rotates (do_rotary) but has no cos/sin caches"
        heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        head_dim = _gqa_head_dim(node)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads or not head_dim:
            return f"its heads ({heads} on {kv_heads} kv heads, head size {head_dim}) are not static and grouped"
        if inputs[1] is not None and _hidden(inputs[1]) != kv_heads * head_dim:
            return f"its key has width {_hidden(inputs[1])}, not {kv_heads}·{head_dim}"
        return None

    def rewrite(self, op: Any, attention_y: ir.Value, **_: Any) -> Any:
        node = attention_y.producer()
        assert node is not None
        q, k, v, past_key, past_value, seqlens_k, total = list(node.inputs)[:7]
        cos, sin = (list(node.inputs) + [None] * 9)[7:9]
        heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        head_dim = int(_gqa_head_dim(node) or 0)
        if k is None:  # packed QKV
            q, k, v = op.Split(
                q,
                op.Constant(value_ints=[heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]),
                axis=-1,
                _outputs=3,
            )
        seq = op.Shape(q, start=1, end=2)  # int64 [1]
        total_1d = op.Reshape(total, op.Constant(value_ints=[1]))
        first_prompt = op.Equal(op.Cast(total_1d, to=ir.DataType.INT64), seq)
        # rows already in the cache per batch row (GroupQueryAttention's past_seqlen): 0 for a first prompt
        past_rows = op.Where(
            first_prompt,
            op.Constant(value_int=0),
            op.Sub(op.Cast(seqlens_k, to=ir.DataType.INT64), op.Sub(seq, op.Constant(value_ints=[1]))),
        )
        if int(_attr(node, "do_rotary", 0)):
            steps = op.Range(op.Constant(value_int=0), op.Squeeze(seq), op.Constant(value_int=1))
            positions = op.Add(
                op.Unsqueeze(past_rows, op.Constant(value_ints=[1])), op.Unsqueeze(steps, op.Constant(value_ints=[0]))
            )
            half = _static(cos, 1, rank=2)  # cos_cache [max_position, rotary_dim / 2]: partial rotary when < D
            rotary = dict(
                _domain=MS_DOMAIN,
                interleaved=int(_attr(node, "rotary_interleaved", 0)),
                rotary_embedding_dim=2 * half if half and 2 * half < head_dim else 0,
            )
            q = op.RotaryEmbedding(q, positions, cos, sin, num_heads=heads, **rotary)
            k = op.RotaryEmbedding(k, positions, cos, sin, num_heads=kv_heads, **rotary)
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        # keys 0..seqlens_k[b] are valid; the key axis is the op's Ktot (concat) or the buffer's M (shared)
        keys = op.Shape(past_key, start=2, end=3) if self.shared else op.Add(op.Shape(past_key, start=2, end=3), seq)
        key_index = op.Range(op.Constant(value_int=0), op.Squeeze(keys), op.Constant(value_int=1))
        mask = op.Less(
            op.Unsqueeze(key_index, op.Constant(value_ints=[0])),
            op.Unsqueeze(
                op.Add(op.Cast(seqlens_k, to=ir.DataType.INT64), op.Constant(value_int=1)), op.Constant(value_ints=[1])
            ),
        )
        y, present_key, present_value = self._emit(
            op,
            node,
            query=_to_heads(op, q, heads, head_dim),
            key=_to_heads(op, k, kv_heads, head_dim),
            value=_to_heads(op, v, kv_heads, head_dim),
            mask=mask,
            scale=scale,
            causal=1,
            num_heads=heads,
            num_kv_heads=kv_heads,
            past_key=past_key,
            past_value=past_value,
            past_sequence_length=op.Cast(past_rows, to=ir.DataType.INT32) if self.shared else None,
            num_outputs=3,
            mask_kind="key_padding",
        )
        return _from_heads(op, y, heads, head_dim), present_key, present_value


def _gqa_head_dim(node: ir.Node) -> int | None:
    """Head size of a GroupQueryAttention node from its query width (packed: ``(Hq + 2·Hkv)·D``)."""
    heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
    width = _hidden(node.inputs[0])
    groups = heads if node.inputs[1] is not None else heads + 2 * kv_heads
    if width is None or groups <= 0 or width % groups:
        return None
    return width // groups


class SharedMicrosoftGroupQueryAttention(MicrosoftGroupQueryAttention):
    """GroupQueryAttention onto the op's shared-buffer KV form (``rewrite(..., kv_cache="shared")``)."""

    shared = True


FOREIGN_RULE_CLASSES: tuple[type[_ForeignRule], ...] = (
    DecomposedAttention,
    CachedMicrosoftMultiHeadAttention,
    MicrosoftMultiHeadAttention,
    MicrosoftGroupQueryAttention,
)


def foreign_rules(context: RuleContext, *, kv_cache: str = "concat") -> pattern.RewriteRuleSet:
    """Every foreign form's rule; ``kv_cache="shared"`` maps GroupQueryAttention onto the shared-buffer form."""
    gqa = SharedMicrosoftGroupQueryAttention if kv_cache == "shared" else MicrosoftGroupQueryAttention
    classes = [gqa if cls is MicrosoftGroupQueryAttention else cls for cls in FOREIGN_RULE_CLASSES]
    return pattern.RewriteRuleSet([cls.rule(context) for cls in classes])
