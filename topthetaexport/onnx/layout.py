"""The layout of TopThetaAttention's query, key, value and output (docs/op.md, "Layouts"), as onnx-ir passes.

The rewrite gives the op heads first, ``[B, H, S, D]``, as the export's attention had them, so every layer keeps the
``Reshape`` + ``Transpose`` into heads of Q, K and V and the ``Transpose`` + ``Reshape`` back of the output. The op
also reads the packed layout ``[B, S, H·D]`` (onnxruntime GroupQueryAttention's), which is what the projections
produce, so:

* ``PackAttentionLayout``: ``TopThetaAttention(Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3]), ...)`` for Q, K
  and V, whose output only goes through ``Reshape(Transpose(y, [0, 2, 1, 3]), [B, S, H·Dv])``, becomes
  ``TopThetaAttention(x_q, x_k, x_v, ...)`` with that output ``[B, S, H·Dv]``: four copy kernels fewer per layer on
  CUDA (at S = 1 each moves only a size-1 axis, but it is still a kernel of its own per step). The heads come from
  the node's θ (``[Hq, R]``) and its cache (``[B, Hkv, *, D]``) and are written as ``num_heads`` /
  ``num_kv_heads``, which the op needs to split a packed tensor. Nodes with another form around them stay as
  they are.
* ``UnpackAttentionLayout``: the inverse (``Reshape`` + ``Transpose`` in, ``Transpose`` + ``Reshape`` out), for the
  passes that read the op's tensors heads first (the top-k baseline, the exposed Q/K/V, the GQA twin).

Packed nodes carry the node metadata ``toptheta.layout = packed``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .._errors import TopThetaError
from . import names
from .rules import const_ints

__all__ = ["LAYOUT_META", "PackAttentionLayout", "UnpackAttentionLayout", "head_dims", "is_packed"]

LAYOUT_META = names.META_PREFIX + "layout"
_HEADS_PERM = [0, 2, 1, 3]
_THETA_INPUT, _PAST_KEY_INPUT, _PAST_VALUE_INPUT = 3, 5, 6


def is_packed(node: ir.Node) -> bool:
    """Whether a TopThetaAttention node reads and writes the packed layout ``[B, S, H·D]``."""
    return node.metadata_props.get(LAYOUT_META) == "packed"


def _op_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == names.OP_TYPE and n.domain == names.DOMAIN]


def _static_dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def head_dims(node: ir.Node) -> tuple[int, int, int, int] | None:
    """(Hq, Hkv, D, Dv) from the node's attributes, θ ``[Hq, R]`` and cache ``[B, Hkv, *, D]``; None if unknown."""
    hq = node.attributes.get_int("num_heads", 0) or _static_dim(node.inputs[_THETA_INPUT], 0)
    inputs = list(node.inputs) + [None] * 8
    past_k, past_v = inputs[_PAST_KEY_INPUT], inputs[_PAST_VALUE_INPUT]
    hkv = node.attributes.get_int("num_kv_heads", 0) or _static_dim(past_k, 1)
    d, dv = _static_dim(past_k, 3), _static_dim(past_v, 3)
    if not (hq and hkv and d and dv):
        return None
    return int(hq), int(hkv), int(d), int(dv)


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _shape_tail(value: ir.Value | None) -> list[int]:
    """The constant trailing entries of a Reshape target: all of a constant, or the constant inputs that end a
    ``Concat`` (torch's exporter builds ``[B, S, H, D]`` from the runtime B and S and constant H and D)."""
    whole = const_ints(value)
    if whole is not None:
        return whole
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
        return []
    tail: list[int] = []
    for part in reversed(list(concat.inputs)):
        ints = const_ints(part)
        if ints is None:
            break
        tail = ints + tail
    return tail


def _split_source(value: ir.Value | None, heads: int, dim: int) -> ir.Value | None:
    """x of ``value = Transpose(Reshape(x, [*, *, heads, dim]), [0, 2, 1, 3])`` with x ``[B, S, heads·dim]``."""
    transpose = value.producer() if value is not None else None
    if _perm(transpose) != _HEADS_PERM or transpose is None:
        return None
    reshape = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return None
    x = reshape.inputs[0]
    tail = _shape_tail(reshape.inputs[1])
    split_shape = reshape.outputs[0].shape
    by_target = len(tail) >= 2 and (tail[-2:] in ([heads, dim], [-1, dim], [heads, -1]))
    by_shape = split_shape is not None and len(split_shape) == 4 and list(split_shape)[2:] == [heads, dim]
    if x is None or not (by_target or by_shape):
        return None
    if x.shape is not None and (len(x.shape) != 3 or _static_dim(x, 2) not in (None, heads * dim)):
        return None
    return x


def _merge_target(y: ir.Value, heads: int, dim: int) -> ir.Value | None:
    """v of ``v = Reshape(Transpose(y, [0, 2, 1, 3]), [*, *, heads·dim])`` when that is y's only use."""
    uses = list(y.uses())
    if y.is_graph_output() or len(uses) != 1:
        return None
    transpose = uses[0].node
    if _perm(transpose) != _HEADS_PERM or len(list(transpose.outputs[0].uses())) != 1:
        return None
    reshape = next(iter(transpose.outputs[0].uses())).node
    if (
        reshape.op_type != "Reshape"
        or reshape.domain not in ("", "ai.onnx")
        or reshape.inputs[0] is not transpose.outputs[0]
    ):
        return None
    tail, merged = _shape_tail(reshape.inputs[1]), reshape.outputs[0]
    by_target = len(tail) >= 1 and tail[-1] in (heads * dim, -1)
    by_shape = merged.shape is not None and len(merged.shape) == 3 and _static_dim(merged, 2) == heads * dim
    return merged if by_target or by_shape else None


class PackAttentionLayout(InPlacePass):
    """Heads-first TopThetaAttention nodes between the export's head split and merge -> packed (module docstring).
    ``packed``: how many nodes changed."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = 0

    def call(self, model: ir.Model) -> PassResult:
        self.packed = 0
        for node in _op_nodes(model.graph):
            heads = head_dims(node)
            if is_packed(node) or heads is None:
                continue
            hq, hkv, d, dv = heads
            sources = [
                _split_source(node.inputs[0], hq, d),
                _split_source(node.inputs[1], hkv, d),
                _split_source(node.inputs[2], hkv, dv),
            ]
            merged = _merge_target(node.outputs[0], hq, dv)
            if merged is None or any(s is None for s in sources):
                continue
            for index, source in enumerate(sources):
                node.replace_input_with(index, source)
            y = node.outputs[0]
            y.shape = ir.Shape([merged.shape[0], merged.shape[1], hq * dv]) if merged.shape is not None else None
            merged.replace_all_uses_with(y, replace_graph_outputs=True)
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", hq)
            node.attributes["num_kv_heads"] = ir.AttrInt64("num_kv_heads", hkv)
            node.metadata_props[LAYOUT_META] = "packed"
            self.packed += 1
        if self.packed:
            RemoveUnusedNodesPass()(model)
        return PassResult(model, self.packed > 0)


class UnpackAttentionLayout(InPlacePass):
    """Packed TopThetaAttention nodes -> heads first, with a ``Reshape`` + ``Transpose`` in front of Q, K and V and
    a ``Transpose`` + ``Reshape`` after the output (the inverse of ``PackAttentionLayout``)."""

    def call(self, model: ir.Model) -> PassResult:
        graph, changed = model.graph, False
        for node in _op_nodes(graph):
            if not is_packed(node):
                continue
            hq = node.attributes.get_int("num_heads", 0)
            hkv = node.attributes.get_int("num_kv_heads", 0)
            if not (hq and hkv):
                raise TopThetaError(
                    f"TopThetaAttention node '{node.name}' is packed but has no num_heads/num_kv_heads: rewrite "
                    "the model again"
                )
            tag = node.name or "toptheta"
            added: list[ir.Node] = []
            # Q, K, V and the output share the op's type T; values a fusion made (a Split's outputs) may carry none.
            dtype = next((v.dtype for v in (*node.inputs[:3], *node.outputs[:3]) if v is not None and v.dtype), None)

            def const(name: str, values: list[int], tag: str = tag) -> ir.Value:
                value = ir.Value(name=f"{tag}/unpack.{name}", const_value=ir.tensor(np.array(values, np.int64)))
                graph.register_initializer(value)
                return value

            for index, (slot, heads) in enumerate((("q", hq), ("k", hkv), ("v", hkv))):
                x = node.inputs[index]
                if x is None:
                    continue
                split = ir.Node(
                    "", "Reshape", [x, const(f"{slot}_shape", [0, 0, heads, -1])], name=f"{tag}/unpack.{slot}"
                )
                trans = ir.Node("", "Transpose", [split.outputs[0]], attributes=[ir.AttrInt64s("perm", _HEADS_PERM)])
                trans.name = f"{tag}/unpack.{slot}_heads"
                split.outputs[0].dtype = trans.outputs[0].dtype = x.dtype or dtype
                added += [split, trans]
                node.replace_input_with(index, trans.outputs[0])
            graph.insert_before(node, added)
            y = node.outputs[0]
            uses = list(y.uses())
            back = ir.Node(
                "", "Transpose", [y], attributes=[ir.AttrInt64s("perm", _HEADS_PERM)], name=f"{tag}/unpack.y"
            )
            merge = ir.Node(
                "", "Reshape", [back.outputs[0], const("y_shape", [0, 0, -1])], name=f"{tag}/unpack.y_merge"
            )
            merged = merge.outputs[0]
            back.outputs[0].dtype = y.dtype or dtype
            merged.dtype, merged.shape = y.dtype or dtype, y.shape
            for user, index in uses:
                user.replace_input_with(index, merged)
            for i, out in enumerate(graph.outputs):
                if out is y:
                    graph.outputs[i] = merged
                    merged.name, y.name = y.name, None
            y.shape = None
            graph.insert_after(node, [back, merge])
            del node.metadata_props[LAYOUT_META]
            changed = True
        return PassResult(model, changed)
