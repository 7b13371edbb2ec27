"""Variants of a rewritten Top-θ graph, as onnx-ir passes (no re-export, no re-rewrite).

* ``ExposeKept``: the 4th output (kept counts) of every TopThetaAttention node becomes a graph output
  ``toptheta.kept.{layer}`` (so do the kept counts of a top-k replacement).
* ``ExposeAttentionIO``: the op's Q, K, V, mask and output become graph outputs ``toptheta.io.{layer}.{slot}``.
* ``SetThresholds``: the θ / ρ initializers of every layer are replaced (one export serves a sweep over k),
  from a ``Thresholds`` or one θ value everywhere.
* ``DenseTwin``: every θ = ``-inf`` and ρ = 0, dense attention through the same operator.
* ``SetCompMode``: the ``comp_mode`` attribute of every node.
* ``Float32Interface``: bfloat16 graph inputs and outputs become float32 behind Cast nodes (numpy, and so the
  numpy runner, has no bfloat16), every value inside keeping its dtype.
* ``ReplaceWithTopK``: every TopThetaAttention node of a sparse layer is replaced by standard ONNX ops
  computing exact per-row top-k attention (the baseline Top-θ approximates): scores ``s = scale·q·kᵀ``, valid
  keys (causal, bottom-right aligned, and the mask), ``τ = k-th largest valid score of the row`` (``TopK``),
  keep valid ``s >= τ`` (ties at τ are all kept; rows with ``<= k`` valid keys keep every valid key), softmax
  over the kept scores, times V. Dense layers keep the operator (their θ is ``-inf``: dense attention).
  The replacement also outputs the row's kept count, like the operator's ``kept`` output.

``write_variant`` (eval) and ``prepare_variant`` (sessions) run these passes on a loaded model and save the
result next to the original, so external weight data still resolves.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from .._errors import TopThetaError
from ..thresholds import Thresholds
from . import names
from .layout import UnpackAttentionLayout

__all__ = [
    "KEPT_PREFIX",
    "DenseTwin",
    "ExposeAttentionIO",
    "ExposeKept",
    "Float32Interface",
    "ReplaceWithTopK",
    "SetCompMode",
    "SetThresholds",
    "op_nodes",
    "prepare_variant",
    "replace_with_topk",
    "topk_attention_numpy",
    "write_variant",
]

KEPT_PREFIX = names.KEPT_PREFIX
_THETA_INPUT, _MASK_INPUT, _SDC_INPUT, _KEPT_OUTPUT = 3, 4, 7, 3
PAST_LENGTH_INPUT = 8  # past_sequence_length: present on the op in the shared-buffer KV-cache form (kv_cache.py)
_NO_OP_FIX = "run 'topθ-export rewrite' on it first"


def op_nodes(graph: ir.Graph) -> list[tuple[int, ir.Node]]:
    """(layer, node) of every TopThetaAttention node; the layer comes from its θ initializer's name."""
    out: list[tuple[int, ir.Node]] = []
    for node in graph:
        if node.op_type == names.OP_TYPE and node.domain == names.DOMAIN:
            theta = node.inputs[_THETA_INPUT] if len(node.inputs) > _THETA_INPUT else None
            layer = names.layer_of_theta(theta.name or "") if theta is not None else None
            out.append((len(out) if layer is None else layer, node))
    return out


def is_shared_kv(node: ir.Node) -> bool:
    """Whether a TopThetaAttention node runs in the shared-buffer KV-cache form (it has input 8)."""
    return len(node.inputs) > PAST_LENGTH_INPUT and node.inputs[PAST_LENGTH_INPUT] is not None


def _require_ops(model: ir.Model) -> list[tuple[int, ir.Node]]:
    ops = op_nodes(model.graph)
    if not ops:
        raise TopThetaError(f"the model has no TopThetaAttention node: {_NO_OP_FIX}")
    return ops


def _expose(graph: ir.Graph, value: ir.Value) -> bool:
    if value.is_graph_output():
        return False
    graph.outputs.append(value)
    return True


def _kept_shape(node: ir.Node) -> ir.Shape | None:
    """``[B, Hq, Sq]``: the stated shape of the node's kept output, else from its query's shape."""
    if len(node.outputs) > _KEPT_OUTPUT and node.outputs[_KEPT_OUTPUT].shape is not None:
        return node.outputs[_KEPT_OUTPUT].shape
    q_shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if q_shape is None or len(q_shape) != 4:
        return None
    return ir.Shape([q_shape[0], q_shape[1], q_shape[2]])


class ExposeKept(InPlacePass):
    """Kept counts (int32 ``[B, Hq, Sq]``) of every TopThetaAttention node, and of every top-k replacement, as
    graph outputs ``toptheta.kept.{layer}``."""

    def call(self, model: ir.Model) -> PassResult:
        graph, modified = model.graph, False
        for layer, node in op_nodes(graph):
            if len(node.outputs) <= _KEPT_OUTPUT:
                node.resize_outputs(_KEPT_OUTPUT + 1)
                modified = True
            for unused in node.outputs[1:_KEPT_OUTPUT]:
                if not unused.name and not unused.uses():
                    unused.name = ""  # optional present_key/present_value: not produced
            kept = node.outputs[_KEPT_OUTPUT]
            if not kept.name:
                kept.name = names.kept_name(layer)
            kept.dtype, kept.shape = ir.DataType.INT32, kept.shape or _kept_shape(node)
            modified |= _expose(graph, kept)
        for node in graph:  # the kept counts of top-k replacements
            for out in node.outputs:
                if out.name and out.name.startswith(KEPT_PREFIX) and node.op_type != names.OP_TYPE:
                    modified |= _expose(graph, out)
        return PassResult(model, modified)


class ExposeAttentionIO(InPlacePass):
    """The op's Q, K, V, mask and output of every layer as graph outputs ``toptheta.io.{layer}.{q,k,v,mask,y}``
    (operator-level parity checks), each through an Identity so the names do not clash with the graph's.

    In the shared-buffer KV-cache form K, V and mask are the valid part of the buffers, rows
    ``[0, max(past_sequence_length) + Sq)`` of ``present`` and of the ``[B, M]`` mask: what the concat form
    exposes when every batch row has the same past length.
    """

    def call(self, model: ir.Model) -> PassResult:
        UnpackAttentionLayout()(model)  # these read the op's tensors heads first
        graph = model.graph
        ops = op_nodes(graph)
        for layer, node in ops:
            mask = node.inputs[_MASK_INPUT] if len(node.inputs) > _MASK_INPUT else None
            k, v, built = node.inputs[1], node.inputs[2], None
            if is_shared_kv(node):
                built, k, v, mask = _valid_rows(layer, node, mask)
                for value in built.initializers:
                    graph.register_initializer(value)
            sources = [("q", node.inputs[0]), ("k", k), ("v", v), ("mask", mask), ("y", node.outputs[0])]
            identities = [] if built is None else list(built.nodes)
            for slot, source in sources:
                if source is None:
                    continue
                identity = ir.Node("", "Identity", [source], num_outputs=1, name=f"toptheta/io.{layer}.{slot}")
                alias = identity.outputs[0]
                alias.name = names.io_name(layer, slot)
                alias.dtype = source.dtype
                alias.shape = source.shape
                identities.append(identity)
                graph.outputs.append(alias)
            graph.insert_after(node, identities)
        return PassResult(model, bool(ops))


def _valid_rows(layer: int, node: ir.Node, mask: ir.Value | None) -> tuple[_TopKBuilder, ir.Value, ir.Value, Any]:
    """(builder, K, V, mask) of a shared-form node cut to its ``max(P) + Sq`` valid rows."""
    n = _TopKBuilder(layer, prefix=f"toptheta/io.{layer}/")
    past_len = n("Cast", n("ReduceMax", node.inputs[PAST_LENGTH_INPUT], keepdims=1), to=ir.DataType.INT64)
    ktot = n("Add", past_len, n("Shape", node.inputs[0], start=2, end=3))  # [1]
    zero = n.ints("zero", 0)
    k = n("Slice", node.outputs[1], zero, ktot, n.ints("axis2", 2))
    v = n("Slice", node.outputs[2], zero, ktot, n.ints("axis2v", 2))
    valid = "toptheta_valid_rows"  # max(P) + Sq; a stated shape keeps the exposed outputs checker-clean
    for value, like in ((k, node.outputs[1]), (v, node.outputs[2])):
        value.dtype = like.dtype
        if like.shape is not None and len(like.shape) == 4:
            value.shape = ir.Shape([like.shape[0], like.shape[1], valid, like.shape[3]])
    if mask is not None:
        cut = n("Slice", mask, zero, ktot, n.ints("axis1", 1))
        cut.dtype = mask.dtype
        if mask.shape is not None and len(mask.shape) == 2:
            cut.shape = ir.Shape([mask.shape[0], valid])
        mask = cut
    return n, k, v, mask


def _set_initializer(value: ir.Value | None, array: np.ndarray) -> bool:
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    value.const_value = ir.tensor(np.ascontiguousarray(array, np.float32), name=value.name)
    value.shape = ir.Shape(array.shape)
    return True


class SetThresholds(InPlacePass):
    """Replace every layer's θ (and ρ) initializers: from ``thresholds``, or θ = ``theta_fill`` everywhere
    (ρ then stays, unless ``sdc_fill`` is given)."""

    def __init__(
        self, thresholds: Thresholds | None = None, *, theta_fill: float | None = None, sdc_fill: float | None = None
    ) -> None:
        super().__init__()
        if (thresholds is None) == (theta_fill is None):
            raise TopThetaError("SetThresholds needs either thresholds or theta_fill: pass exactly one")
        if theta_fill is not None and math.isnan(theta_fill):
            raise TopThetaError("theta_fill is NaN, which keeps nothing: pass a number or -inf (dense)")
        if thresholds is not None:
            thresholds.check_values()
        self.thresholds, self.theta_fill, self.sdc_fill = thresholds, theta_fill, sdc_fill

    def call(self, model: ir.Model) -> PassResult:
        ops = _require_ops(model)
        th = self.thresholds
        if th is not None and th.num_layers != len(ops):
            raise TopThetaError(
                f"thresholds have {th.num_layers} layers but the model has {len(ops)} attention "
                "blocks: calibrate thresholds for this model"
            )
        modified = False
        for layer, node in ops:
            theta_v = node.inputs[_THETA_INPUT]
            sdc_v = node.inputs[_SDC_INPUT] if len(node.inputs) > _SDC_INPUT else None
            if th is not None:
                theta, sdc = (t.numpy() for t in th.layer(layer))
                modified |= _set_initializer(theta_v, theta) | _set_initializer(sdc_v, sdc)
                continue
            shape = tuple(theta_v.shape) if theta_v is not None and theta_v.shape is not None else ()
            modified |= _set_initializer(theta_v, np.full(shape, self.theta_fill, np.float32))
            if self.sdc_fill is not None and sdc_v is not None and sdc_v.shape is not None:
                modified |= _set_initializer(sdc_v, np.full(tuple(sdc_v.shape), self.sdc_fill, np.float32))
        return PassResult(model, modified)


class DenseTwin(SetThresholds):
    """Every θ = ``-inf`` (every valid key kept) and ρ = 0: exactly dense attention through the same operator."""

    def __init__(self) -> None:
        super().__init__(theta_fill=float("-inf"), sdc_fill=0.0)


class SetCompMode(InPlacePass):
    """Set the ``comp_mode`` attribute (0 none, 1 SDC, 2 SDC + V-mean) of every TopThetaAttention node."""

    def __init__(self, comp_mode: int) -> None:
        super().__init__()
        if comp_mode not in (0, 1, 2):
            raise TopThetaError(f"comp_mode must be 0, 1 or 2 (got {comp_mode})")
        self.comp_mode = int(comp_mode)

    def call(self, model: ir.Model) -> PassResult:
        ops = _require_ops(model)
        for _, node in ops:
            node.attributes["comp_mode"] = ir.AttrInt64("comp_mode", self.comp_mode)
        return PassResult(model, True)


class Float32Interface(InPlacePass):
    """Every bfloat16 graph input and output, except those named in ``keep``, becomes float32 at the graph's
    edge: an input feeds a Cast to bfloat16 that takes over its uses, an output is a Cast to float32 of the value
    that was the output. The graph computes exactly what it did (bfloat16 to float32 and back is lossless), and a
    caller can feed and read it with numpy. ``keep``: names that stay bfloat16, e.g. the shared-buffer KV cache,
    whose past input and present output are one device buffer."""

    def __init__(self, keep: Iterable[str] = ()) -> None:
        super().__init__()
        self.keep = set(keep)

    def _is_edge(self, value: ir.Value) -> bool:
        return value.dtype == ir.DataType.BFLOAT16 and value.name not in self.keep

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        inputs = [v for v in graph.inputs if self._is_edge(v) and not v.is_graph_output()]
        casts: list[ir.Node] = []
        for value in inputs:
            uses = list(value.uses())
            cast = _cast(value, ir.DataType.BFLOAT16, f"{value.name}/bfloat16", node_name=value.name)
            for user, index in uses:
                user.replace_input_with(index, cast.outputs[0])
            value.dtype = ir.DataType.FLOAT
            casts.append(cast)
        if casts:
            graph.insert_before(graph.node(0), casts)
        # an output that is also an input keeps its name (it would rename the input)
        outputs = [(i, v) for i, v in enumerate(graph.outputs) if self._is_edge(v) and not v.is_graph_input()]
        for index, value in outputs:
            name = value.name or ""
            value.name = f"{name}/bfloat16"
            cast = _cast(value, ir.DataType.FLOAT, name, node_name=name)
            graph.append(cast)
            graph.outputs[index] = cast.outputs[0]
        return PassResult(model, bool(inputs or outputs))


def _cast(value: ir.Value, to: ir.DataType, out_name: str, *, node_name: str | None) -> ir.Node:
    """A Cast of ``value`` to ``to`` whose output ``out_name`` keeps the value's shape (not yet in a graph)."""
    cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", to)], num_outputs=1)
    cast.name = f"toptheta/float32_interface/{node_name}"
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = out_name, to, value.shape
    return cast


# -- top-k ---------------------------------------------------------------------------------------------


def _mask_kind(mask: ir.Value) -> tuple[bool, int]:
    """(is bool, rank) of the op's mask input from what the graph states; an unstated rank is taken as 4.

    The rewrite gives the op either the shared ``[B, Ktot]`` key-padding mask (``attention_mask`` cast to
    bool) or the exported 4-D mask.
    """
    dtype = mask.dtype
    producer = mask.producer()
    if dtype is None and producer is not None and producer.op_type == "Cast":
        to = producer.attributes.get("to")
        dtype = ir.DataType(to.value) if to is not None else None
    rank = len(mask.shape) if mask.shape is not None else None
    if mask.name in (names.MASK_NAME, names.ATTENTION_MASK):
        rank = 2
    return dtype in (None, ir.DataType.BOOL), (rank if rank in (2, 4) else 4)


class _TopKBuilder:
    """Nodes and constant initializers of one layer's top-k replacement, named under ``toptheta/topk.{l}/``."""

    def __init__(self, layer: int, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{names.TOPK_NODE_PREFIX}{layer}/"
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def const(self, name: str, array: Any) -> ir.Value:
        tensor = ir.tensor(np.asarray(array), name=self.prefix + name)
        value = ir.Value(name=tensor.name, const_value=tensor)
        value.shape, value.dtype = ir.Shape(list(tensor.shape)), tensor.dtype
        self.initializers.append(value)
        return value

    def ints(self, name: str, *values: int) -> ir.Value:
        return self.const(name, np.array(values, np.int64))

    def node(self, op: str, inputs: Sequence[ir.Value | None], num_outputs: int = 1, **attrs: Any) -> list[ir.Value]:
        index = len(self.nodes)
        node = ir.Node(
            "",
            op,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs),
            num_outputs=num_outputs,
            name=f"{self.prefix}{op}{index}",
        )
        for j, out in enumerate(node.outputs):
            out.name = f"{self.prefix}{op.lower()}{index}" + (f"_{j}" if j else "")
        self.nodes.append(node)
        return list(node.outputs)

    def __call__(self, op: str, *inputs: ir.Value | None, **attrs: Any) -> ir.Value:
        return self.node(op, inputs, **attrs)[0]


def _topk_subgraph(layer: int, node: ir.Node, k: int) -> tuple[_TopKBuilder, ir.Value, ir.Value]:
    """(builder, output, kept counts) computing exact top-k attention in place of ``node``."""
    n = _TopKBuilder(layer)
    q, key, v = node.inputs[0], node.inputs[1], node.inputs[2]
    mask = node.inputs[_MASK_INPUT] if len(node.inputs) > _MASK_INPUT else None
    causal = int(node.attributes["causal"].value) if "causal" in node.attributes else 0
    scale = float(node.attributes["scale"].value) if "scale" in node.attributes else 0.0
    softcap = float(node.attributes["softcap"].value) if "softcap" in node.attributes else 0.0

    shp_q, shp_k = n("Shape", q), n("Shape", key)
    hq = n("Slice", shp_q, n.ints("s1", 1), n.ints("e2", 2))
    hkv = n("Slice", shp_k, n.ints("s1b", 1), n.ints("e2b", 2))
    zero_i, neg1 = n.ints("zero", 0), n.ints("m1", -1)
    grouped = n("Concat", zero_i, hkv, neg1, zero_i, axis=0)  # [B, Hkv, G*Sq, D]
    per_head = n("Concat", zero_i, hq, neg1, zero_i, axis=0)  # [B, Hq, Sq, *]
    # scores [B, Hq, Sq, Ktot]; GQA: query head h reads kv head h // G, so [B,Hq,Sq,D] -> [B,Hkv,G*Sq,D]
    s = n("Reshape", n("MatMul", n("Reshape", q, grouped), n("Transpose", key, perm=[0, 1, 3, 2])), per_head)
    if scale == 0.0:
        d = n("Slice", shp_q, n.ints("s3", 3), n.ints("e4", 4))
        s = n("Mul", s, n("Reciprocal", n("Sqrt", n("CastLike", d, s))))
    else:
        s = n("Mul", s, n("CastLike", n.const("scale", np.array(scale, np.float32)), s))
    if softcap:  # Gemma 2: softcap · tanh(s / softcap), before the mask as in the op
        cap = n("CastLike", n.const("softcap", np.array(softcap, np.float32)), s)
        s = n("Mul", n("Tanh", n("Div", s, cap)), cap)
    neg_inf = n("CastLike", n.const("neginf", np.array(-np.inf, np.float32)), s)
    valid = None
    if mask is not None:
        is_bool, rank = _mask_kind(mask)
        m = mask
        if not is_bool:  # additive float mask: added to the scores, values <= -1e30 exclude
            s = n("Add", s, n("CastLike", mask, s))
            m = n("Greater", mask, n("CastLike", n.const("lim", np.array(-1e30, np.float32)), mask))
        valid = n("Unsqueeze", m, n.ints("ax12", 1, 2)) if rank == 2 else m  # [B, Ktot] -> [B, 1, 1, Ktot]
    if causal:
        ktot = n("Squeeze", n("Slice", shp_k, n.ints("s2", 2), n.ints("e3", 3)))
        sq = n("Squeeze", n("Slice", shp_q, n.ints("s2b", 2), n.ints("e3b", 3)))
        one = n.const("o1", np.array(1, np.int64))
        rows = n("Unsqueeze", n("Range", n("Sub", ktot, sq), ktot, one), n.ints("one", 1))  # [Sq, 1]
        cols = n("Range", n.const("z0", np.array(0, np.int64)), ktot, one)  # [Ktot]
        causal_ok = n("LessOrEqual", cols, rows)  # [Sq, Ktot], bottom-right aligned
        valid = causal_ok if valid is None else n("And", valid, causal_ok)
    if valid is None:
        valid = n("Not", n("IsNaN", s))
    masked = n("Where", valid, s, neg_inf)  # [B, Hq, Sq, Ktot]
    ktot_1 = n("Slice", n("Shape", masked), n.ints("sl", 3), n.ints("el", 4))
    top, _ = n.node(
        "TopK", [masked, n("Min", n.ints("k", int(k)), ktot_1)], num_outputs=2, axis=-1, largest=1, sorted=1
    )
    tau = n("ReduceMin", top, neg1, keepdims=1)  # the k-th largest valid score
    keep = n("And", valid, n("GreaterOrEqual", s, tau))
    zk = n("Where", keep, s, neg_inf)
    mx = n("ReduceMax", zk, neg1, keepdims=1)
    mx = n("Where", n("IsInf", mx), n("CastLike", n.const("zf", np.array(0.0, np.float32)), s), mx)
    e = n("Exp", n("Sub", zk, mx))
    den = n("Max", n("ReduceSum", e, neg1, keepdims=1), n("CastLike", n.const("tiny", np.array(1e-30, np.float32)), s))
    probs = n("Div", e, den)  # rows with nothing kept: 0
    y = n("Reshape", n("MatMul", n("Reshape", probs, grouped), v), per_head)  # via [B, Hkv, G*Sq, Dv]
    kept = n("ReduceSum", n("Cast", keep, to=ir.DataType.INT32), neg1, keepdims=0)
    return n, y, kept


class ReplaceWithTopK(InPlacePass):
    """Replace the TopThetaAttention node of every layer not in ``dense_layers`` by exact top-k attention in
    standard ONNX ops; the replaced nodes' θ / ρ initializers are dropped. ``replaced``: the layers replaced."""

    def __init__(self, k: int, dense_layers: Iterable[int] = ()) -> None:
        super().__init__()
        if int(k) < 1:
            raise TopThetaError(f"top-k needs k >= 1 (got {k}): pass a positive k")
        self.k, self.dense = int(k), {int(i) for i in dense_layers}
        self.replaced: list[int] = []

    def call(self, model: ir.Model) -> PassResult:
        UnpackAttentionLayout()(model)  # these read the op's tensors heads first
        graph = model.graph
        self.replaced = []
        for layer, node in _require_ops(model):
            if layer in self.dense:
                continue
            if is_shared_kv(node):  # its K/V are this call's rows only; the cache is in the op's buffers
                raise TopThetaError(
                    f"layer {layer}: the top-k replacement needs the concat-form KV cache, this model has the "
                    "shared-buffer form: rewrite it with kv_cache='concat' (--kv-cache concat)"
                )
            built, y, kept = _topk_subgraph(layer, node, self.k)
            for value in built.initializers:
                graph.register_initializer(value)
            graph.insert_after(node, built.nodes)
            old_y = node.outputs[0]
            y.shape = old_y.shape
            y.dtype = old_y.dtype
            old_y.replace_all_uses_with(y, replace_graph_outputs=True)
            y.name, old_y.name = old_y.name, None
            old_kept = node.outputs[_KEPT_OUTPUT] if len(node.outputs) > _KEPT_OUTPUT else None
            kept.dtype, kept.shape = ir.DataType.INT32, _kept_shape(node)
            if old_kept is not None and old_kept.name:
                old_kept.replace_all_uses_with(kept, replace_graph_outputs=True)
                kept.name, old_kept.name = old_kept.name, None
            else:
                kept.name = names.kept_name(layer)
            constants = [node.inputs[i] for i in (_THETA_INPUT, _SDC_INPUT) if i < len(node.inputs)]
            graph.remove(node, safe=True)
            for value in constants:
                if value is not None and value.is_initializer() and not value.uses() and value.name:
                    graph.initializers.pop(value.name)
            self.replaced.append(layer)
        return PassResult(model, bool(self.replaced))


def replace_with_topk(model: Any, k: int, dense_layers: Iterable[int]) -> list[int]:
    """In place: ``ReplaceWithTopK`` on an ``onnx_ir.Model`` or an ``onnx.ModelProto``; returns the replaced layers."""
    topk = ReplaceWithTopK(k, dense_layers)
    if isinstance(model, ir.Model):
        topk(model)
        return topk.replaced
    ir_model = ir.serde.deserialize_model(model)
    topk(ir_model)
    model.CopyFrom(ir.serde.serialize_model(ir_model))
    return topk.replaced


# -- loading and saving ---------------------------------------------------------------------------------


def _load(model_path: Path) -> ir.Model:
    if not model_path.is_file():
        raise TopThetaError(f"ONNX model {model_path} does not exist: run 'topθ-export export' first")
    try:
        return ir.load(model_path)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes the one-line error
        raise TopThetaError(
            f"{model_path} is not a valid ONNX model ({str(e).splitlines()[0][:200]}): re-export it"
        ) from None


def _save_next_to(model: ir.Model, model_path: Path) -> Path:
    """Save beside ``model_path`` (external weights keep their relative location); the caller deletes it."""
    fd, tmp = tempfile.mkstemp(prefix=".variant-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        ir.save(model, tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_variant(
    model_path: str | os.PathLike[str],
    *,
    kind: str = "toptheta",
    k: int | None = None,
    dense_layers: Iterable[int] = (),
    thresholds: Thresholds | None = None,
    comp_mode: int | None = None,
) -> Path:
    """A variant of the Top-θ model at ``model_path``, saved next to it (the caller deletes it).

    ``kind``: ``toptheta`` (θ/ρ from ``thresholds`` when given), ``topk`` (exact top-k with ``k`` in every
    layer not in ``dense_layers``) or ``dense`` (every θ = -inf). ``comp_mode`` overrides the compensation
    mode of the remaining operators. Kept counts are always exposed.
    """
    if kind not in ("toptheta", "topk", "dense"):
        raise TopThetaError(f"unknown variant '{kind}': use toptheta, topk or dense")
    passes: list[InPlacePass] = []
    if comp_mode is not None:
        passes.append(SetCompMode(comp_mode))
    if kind == "topk":
        if k is None:
            raise TopThetaError("the top-k variant needs k: pass k")
        passes.append(ReplaceWithTopK(int(k), dense_layers))
    if kind == "dense":
        passes.insert(0, DenseTwin())
    elif thresholds is not None:
        passes.insert(0, SetThresholds(thresholds))
    path = Path(model_path)
    model = _load(path)
    _require_ops_in(model, path)
    for p in [*passes, ExposeKept()]:
        p(model)
    return _save_next_to(model, path)


def _require_ops_in(model: ir.Model, path: Path) -> None:
    if not op_nodes(model.graph):
        raise TopThetaError(f"{path} has no TopThetaAttention node: {_NO_OP_FIX}")


def prepare_variant(
    model_path: str | os.PathLike[str],
    *,
    expose_kept: bool = True,
    expose_io: bool = False,
    theta_fill: float | None = None,
    comp_mode: int | None = None,
    float32_interface: bool = False,
) -> Path:
    """A modified copy of a Top-θ model for a session, saved next to it (the caller deletes it).

    ``expose_kept``: ``ExposeKept``. ``expose_io``: ``ExposeAttentionIO``. ``theta_fill``: every threshold
    replaced by this value (``-inf`` gives dense attention through the same operator). ``comp_mode``: overrides
    the compensation mode of every node. ``float32_interface``: ``Float32Interface`` last, so exposed values are
    float32 too; a shared-buffer KV cache (and its shadow K) keeps its dtype, its buffers being bound directly.
    """
    passes: list[InPlacePass] = []
    if theta_fill is not None:
        passes.append(SetThresholds(theta_fill=theta_fill))
    if comp_mode is not None:
        passes.append(SetCompMode(comp_mode))
    if expose_kept:
        passes.append(ExposeKept())
    if expose_io:
        passes.append(ExposeAttentionIO())
    path = Path(model_path)
    model = _load(path)
    if passes:  # they act on the TopThetaAttention nodes; a dense graph may still want the float32 interface
        _require_ops_in(model, path)
    if float32_interface:
        passes.append(Float32Interface(keep=_shared_cache_names(model.graph)))
    for p in passes:
        p(model)
    return _save_next_to(model, path)


def _shared_cache_names(graph: ir.Graph) -> set[str]:
    """The past inputs and present outputs (KV and shadow K) of a shared-buffer graph; empty for other forms."""
    inputs = [v.name or "" for v in graph.inputs]
    if names.kv_cache_form(inputs) != "shared":
        return set()
    cache = (names.PAST_PREFIX, names.PAST_SHADOW_PREFIX, names.PRESENT_PREFIX, names.PRESENT_SHADOW_PREFIX)
    return {n for n in [*inputs, *(v.name or "" for v in graph.outputs)] if n.startswith(cache)}


def topk_attention_numpy(
    q: Any, k: Any, v: Any, kk: int, *, scale: float | None = None, causal: bool = False, key_padding: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy top-k attention (the definition above), for tests: (output, kept counts)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, sq, d = q.shape
    hkv, ktot = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = scale or 1.0 / math.sqrt(d)
    kx, vx = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, kx) * scale
    valid = np.ones((b, 1, sq, ktot), bool)
    if causal:
        rows = np.arange(ktot - sq, ktot)[:, None]
        valid &= (np.arange(ktot)[None, :] <= rows)[None, None]
    if key_padding is not None:
        valid = valid & np.asarray(key_padding, bool)[:, None, None, :]
    valid = np.broadcast_to(valid, s.shape)
    masked = np.where(valid, s, -np.inf)
    kth = -np.sort(-masked, axis=-1)[..., min(kk, ktot) - 1 : min(kk, ktot)]
    keep = valid & (s >= kth)
    z = np.where(keep, s, -np.inf)
    mx = z.max(-1, keepdims=True)
    mx = np.where(np.isinf(mx), 0.0, mx)
    e = np.where(keep, np.exp(z - mx), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.maximum(den, 1e-300)
    return np.einsum("bhij,bhjd->bhid", p, vx), keep.sum(-1).astype(np.int32)
