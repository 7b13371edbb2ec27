"""The KV-cache form of a rewritten graph: ``concat`` (as exported) or ``shared`` (one buffer per layer and kind).

Concat form (what the export and the rewrite give): every step the graph concatenates the past cache and the new
K/V into ``present.{i}.*``, so the whole cache is copied each step. Shared form (``ShareKvBuffer``): the caller
preallocates one buffer ``[B, Hkv, M, D]`` per layer and kind and binds it both as ``past_key_values.{i}.*`` and as
``present.{i}.*`` (onnxruntime IOBinding); TopThetaAttention writes the new rows in place at
``[past_sequence_length[b], past_sequence_length[b] + S)`` (docs/op.md, input 8) and nothing else is copied.
docs/graph.md has both signatures. ``GenaiSharedInputs`` gives a shared-form graph the inputs onnxruntime-genai
feeds with ``past_present_share_buffer`` (the mask of the tokens so far, no past lengths). ``AddShadowK`` (opt-in,
on a shared-form graph) adds the 4-bit shadow K pair
of docs/op.md ("Shadow K") per layer, a cache the op maintains and the CUDA decode kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from .._errors import TopThetaError
from . import names
from .variants import PAST_LENGTH_INPUT, op_nodes

__all__ = ["AddShadowK", "GenaiSharedInputs", "ShareKvBuffer", "kv_cache_form"]

_KEY_INPUT = {"key": 1, "value": 2}
_PAST_INPUT = {"key": 5, "value": 6}
_PRESENT_OUTPUT = {"key": 1, "value": 2}
_SHADOW_INPUT = {"key": 9, "range": 10}
_SHADOW_OUTPUT = {"key": 4, "range": 5}
_SHADOW_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_MASK_INPUT = 4
_POSITIONS_NAME = "toptheta.past_length"  # int64 [1]: max(past_sequence_length), where Shape(past)[2] was
_CONCAT_FIX = "keep the concat form (kv_cache='concat', --kv-cache concat)"


def kv_cache_form(graph: ir.Graph) -> str | None:
    """``shared`` (a ``past_sequence_length`` input), ``concat`` (``past_key_values.*`` inputs) or None (no cache)."""
    return names.kv_cache_form(v.name for v in graph.inputs)


@dataclass
class _Layer:
    """One layer's cache in the concat form: its past inputs, the Concats that build present, the op reading them."""

    index: int
    op: ir.Node
    past: dict[str, ir.Value]
    concat: dict[str, ir.Node]


def _node_label(node: ir.Node) -> str:
    return f"node '{node.name or '?'}' ({node.op_type})"


def _shape_range(node: ir.Node, rank: int) -> tuple[int, int]:
    """The [start, end) dimension range a Shape node reads (opset 15+ start/end attributes)."""

    def attr(name: str, default: int) -> int:
        a = node.attributes.get(name)
        v = default if a is None else int(a.value)
        return min(max(v + rank if v < 0 else v, 0), rank)

    return attr("start", 0), attr("end", rank)


class ShareKvBuffer(InPlacePass):
    """Turn a rewritten concat-form graph into the shared-buffer form (docs/graph.md, "KV cache forms").

    Per layer, TopThetaAttention takes the new K/V (the cache Concat's second input) as ``key``/``value``, the
    graph inputs ``past_key_values.{i}.*`` (now ``[batch, Hkv, max_sequence, D]``) as ``past_key``/``past_value``
    and the new input ``past_sequence_length`` (int32 ``[batch]``) as input 8; its outputs 1/2 become the graph
    outputs ``present.{i}.*`` and the Concats go. ``Shape(past)[2]`` (the positions' offset) becomes
    ``Cast(ReduceMax(past_sequence_length), int64)``; ``attention_mask`` spans ``max_sequence``. Anything else
    that reads the cache or its length is refused (one-line TopThetaError naming the node).
    """

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        ops = op_nodes(graph)
        if not ops:
            raise TopThetaError("the model has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
        form = kv_cache_form(graph)
        if form == "shared":
            raise TopThetaError("the model already has the shared-buffer KV cache: nothing to do")
        if form is None:
            raise TopThetaError(
                "the model has no KV cache (no past_key_values.* inputs), so there is no buffer to share: "
                "export the decoder with the cache (the default) or keep kv_cache='concat'"
            )
        pasts = {m.group(1, 2): v for v in graph.inputs if (m := names.PAST_RE.match(v.name or ""))}
        layers = [self._layer(int(i), pasts, ops) for i in sorted({int(i) for i, _ in pasts}, key=int)]
        for layer, node in ops:
            if not any(entry.op is node for entry in layers):
                raise TopThetaError(
                    f"layer {layer}: {_node_label(node)} reads no KV cache (its K/V are not a "
                    f"Concat(past_key_values.*, new)): {_CONCAT_FIX}"
                )
        mask_value = self._check_mask(graph, [entry.op for entry in layers])
        shape_users = self._check_past_readers(graph, layers)

        batch = layers[0].past["key"].shape[0] if layers[0].past["key"].shape is not None else "batch"
        past_len = ir.Value(
            name=names.PAST_SEQUENCE_LENGTH, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch])
        )
        at = next((k + 1 for k, v in enumerate(graph.inputs) if v.name == names.ATTENTION_MASK), 1)
        graph.inputs.insert(at, past_len)
        if shape_users:
            self._replace_positions(graph, past_len, shape_users)
        for entry in layers:
            self._share(graph, entry, past_len, batch)
        attention_mask = next(v for v in graph.inputs if v.name == names.ATTENTION_MASK)
        attention_mask.shape = ir.Shape([batch, names.MAX_SEQUENCE])
        if mask_value is not attention_mask:
            mask_value.shape = ir.Shape([batch, names.MAX_SEQUENCE])
        model.metadata_props[names.KV_CACHE_META] = "shared"
        return PassResult(model, True)

    # -- checks ------------------------------------------------------------------------------------------

    def _layer(self, index: int, pasts: dict, ops: list[tuple[int, ir.Node]]) -> _Layer:
        op_set = {id(node) for _, node in ops}
        past, concat, readers = {}, {}, {}
        for kind in names.KV_KINDS:
            value = pasts.get((str(index), kind))
            if value is None:
                raise TopThetaError(
                    f"the graph has no input {names.past_name(index, kind)} beside the other cache inputs: "
                    "re-export the model with topthetaexport.export_onnx"
                )
            concats = [n for n, _ in value.uses() if n.op_type == "Concat"]
            if len(concats) != 1:
                raise TopThetaError(
                    f"{value.name} feeds {len(concats)} Concat nodes, not the one cache Concat: {_CONCAT_FIX}"
                )
            node = concats[0]
            present = node.outputs[0]
            axis = node.attributes.get("axis")
            if list(node.inputs[:1]) != [value] or len(node.inputs) != 2 or axis is None or axis.value not in (2, -2):
                raise TopThetaError(
                    f"{_node_label(node)} is not Concat({value.name}, new) on the sequence axis 2: {_CONCAT_FIX}"
                )
            if not present.is_graph_output() or present.name != names.present_name(index, kind):
                raise TopThetaError(
                    f"{_node_label(node)} concatenates {value.name} but its output '{present.name}' is not the "
                    f"graph output {names.present_name(index, kind)}: {_CONCAT_FIX}"
                )
            users = list(present.uses())
            if len(users) != 1 or id(users[0][0]) not in op_set or users[0][1] != _KEY_INPUT[kind]:
                other = next((n for n, i in users if id(n) not in op_set or i != _KEY_INPUT[kind]), None)
                what = _node_label(other) if other is not None else "no TopThetaAttention node"
                raise TopThetaError(
                    f"{present.name} is read by {what}, not only by TopThetaAttention as its {kind}: the shared "
                    f"KV cache needs every layer to be a TopThetaAttention on its cache (not a top-k variant): "
                    f"{_CONCAT_FIX}"
                )
            past[kind], concat[kind], readers[kind] = value, node, users[0][0]
        op = readers["key"]
        if readers["value"] is not op:
            raise TopThetaError(
                f"layer {index}: present.{index}.key and .value are read by two different nodes: {_CONCAT_FIX}"
            )
        if any(i < len(op.inputs) and op.inputs[i] is not None for i in (5, 6, PAST_LENGTH_INPUT)):
            raise TopThetaError(f"layer {index}: {_node_label(op)} already has past inputs: {_CONCAT_FIX}")
        for i in _PRESENT_OUTPUT.values():
            if i < len(op.outputs) and (op.outputs[i].uses() or op.outputs[i].is_graph_output()):
                raise TopThetaError(f"layer {index}: {_node_label(op)} output {i} is already in use: {_CONCAT_FIX}")
        return _Layer(index, op, past, concat)

    def _check_mask(self, graph: ir.Graph, ops: list[ir.Node]) -> ir.Value:
        """The key-padding mask every op reads: ``attention_mask`` cast to bool (or itself, when bool); it and its
        source must feed nothing else, since both now span the buffer's capacity."""
        attention_mask = next((v for v in graph.inputs if v.name == names.ATTENTION_MASK), None)
        masks = {id(op.inputs[_MASK_INPUT]) if len(op.inputs) > _MASK_INPUT else 0 for op in ops}
        mask = ops[0].inputs[_MASK_INPUT] if len(ops[0].inputs) > _MASK_INPUT else None
        producer = None if mask is None else mask.producer()
        from_input = mask is not None and (
            mask is attention_mask
            or (producer is not None and producer.op_type == "Cast" and producer.inputs[0] is attention_mask)
        )
        if attention_mask is None or len(masks) != 1 or mask is None or not from_input:
            raise TopThetaError(
                "the attention layers do not all read the key-padding mask cast from attention_mask (a sliding "
                "window or a 4-D mask was kept by the rewrite), and the shared KV cache needs it to span the "
                f"buffer: {_CONCAT_FIX}"
            )
        op_ids = {id(op) for op in ops}
        for value in {id(mask): mask, id(attention_mask): attention_mask}.values():
            for node, index in value.uses():
                ok = (id(node) in op_ids and index == _MASK_INPUT) or (value is attention_mask and node is producer)
                # Shape(attention_mask)[0:1] is the batch size, which the shared form keeps (some exports read it)
                ok = ok or (
                    node.op_type == "Shape" and node.domain in ("", "ai.onnx") and _shape_range(node, 2)[1] <= 1
                )
                if not ok:
                    raise TopThetaError(
                        f"{_node_label(node)} reads {value.name}, which spans the whole buffer in the shared KV "
                        f"cache form: {_CONCAT_FIX}"
                    )
        return mask

    def _check_past_readers(self, graph: ir.Graph, layers: list[_Layer]) -> list[ir.Node]:
        """Shape nodes reading ``Shape(past)[2]`` (the past length: replaced); other Shape nodes of the batch, heads
        or head size stay (the buffer has the same); anything else is refused."""
        length_users: list[ir.Node] = []
        for entry in layers:
            for kind, value in entry.past.items():
                for node, _ in value.uses():
                    if node is entry.concat[kind]:
                        continue
                    if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                        start, end = _shape_range(node, 4)
                        if not start <= 2 < end:
                            continue
                        if (start, end) == (2, 3):
                            length_users.append(node)
                            continue
                    raise TopThetaError(
                        f"{_node_label(node)} reads {value.name} (beyond its batch, head and head-size dimensions), "
                        f"which the shared KV cache replaces by a buffer of another length: {_CONCAT_FIX}"
                    )
        return length_users

    # -- the edit --------------------------------------------------------------------------------------

    def _replace_positions(self, graph: ir.Graph, past_len: ir.Value, shape_nodes: list[ir.Node]) -> None:
        """``Shape(past)[2:3]`` (int64 [1], the past length P of the concat form) -> ``Cast(ReduceMax(P_b))``: the
        same value when every row has the same past length, as the concat form requires."""
        reduce = ir.Node(
            "",
            "ReduceMax",
            [past_len],
            attributes=[ir.AttrInt64("keepdims", 1)],
            num_outputs=1,
            name="toptheta/past_length_max",
        )
        reduce.outputs[0].name = "toptheta.past_length_max"
        reduce.outputs[0].dtype, reduce.outputs[0].shape = ir.DataType.INT32, ir.Shape([1])
        cast = ir.Node(
            "",
            "Cast",
            [reduce.outputs[0]],
            attributes=[ir.AttrInt64("to", ir.DataType.INT64)],
            num_outputs=1,
            name="toptheta/past_length",
        )
        positions = cast.outputs[0]
        positions.name, positions.dtype, positions.shape = _POSITIONS_NAME, ir.DataType.INT64, ir.Shape([1])
        graph.insert_before(graph.node(0), [reduce, cast])
        for node in shape_nodes:
            node.outputs[0].replace_all_uses_with(positions, replace_graph_outputs=True)
            graph.remove(node, safe=True)

    def _share(self, graph: ir.Graph, entry: _Layer, past_len: ir.Value, batch) -> None:
        op = entry.op
        if len(op.inputs) <= PAST_LENGTH_INPUT:
            op.resize_inputs(PAST_LENGTH_INPUT + 1)
        if len(op.outputs) <= max(_PRESENT_OUTPUT.values()):
            op.resize_outputs(max(_PRESENT_OUTPUT.values()) + 1)
        for kind in names.KV_KINDS:
            concat, past = entry.concat[kind], entry.past[kind]
            old = concat.outputs[0]
            op.replace_input_with(_KEY_INPUT[kind], concat.inputs[1])  # the new rows of this call
            op.replace_input_with(_PAST_INPUT[kind], past)
            shape = past.shape
            heads, dim = (shape[1], shape[3]) if shape is not None and len(shape) == 4 else (None, None)
            past.shape = ir.Shape([batch, heads, names.MAX_SEQUENCE, dim])
            present = op.outputs[_PRESENT_OUTPUT[kind]]
            present.dtype, present.shape = past.dtype, ir.Shape([batch, heads, names.MAX_SEQUENCE, dim])
            where = [k for k, v in enumerate(graph.outputs) if v is old]
            old.name = None  # free the graph output's name for the op's output
            present.name = names.present_name(entry.index, kind)
            for k in where:
                graph.outputs[k] = present
            graph.remove(concat, safe=True)
        op.replace_input_with(PAST_LENGTH_INPUT, past_len)


class AddShadowK(InPlacePass):
    """Add the shadow K pair (docs/op.md, "Shadow K") to every layer of a shared-buffer graph: graph inputs
    ``past_shadow.{i}.key`` (uint8 ``[batch, Hkv, max_sequence, D/2]``) and ``past_shadow.{i}.range`` (the cache's
    type, ``[batch, Hkv, shadow_blocks, 2, D]``) as the op's inputs 9 and 10, its outputs 4 and 5 as the graph outputs
    ``present_shadow.{i}.*``. The caller binds each pair to one zero-filled buffer, as the K/V cache. It changes no
    result: the op keeps the same keys with or without it. Run again, it does nothing."""

    def call(self, model: ir.Model) -> PassResult:
        if model.metadata_props.get(names.SHADOW_META) == "1":
            return PassResult(model, False)
        graph = model.graph
        ops = op_nodes(graph)
        if not ops:
            raise TopThetaError("the model has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
        if kv_cache_form(graph) != "shared":
            raise TopThetaError(
                "the shadow K lives in the shared-buffer KV cache, and this graph has the concat form (or no cache): "
                "rewrite with kv_cache='shared' (--kv-cache shared)"
            )
        for layer, node in ops:
            self._add(graph, layer, node)
        model.metadata_props[names.SHADOW_META] = "1"
        return PassResult(model, True)

    def _add(self, graph: ir.Graph, layer: int, op: ir.Node) -> None:
        past = op.inputs[_PAST_INPUT["key"]] if len(op.inputs) > PAST_LENGTH_INPUT else None
        if past is None or op.inputs[PAST_LENGTH_INPUT] is None:
            raise TopThetaError(f"layer {layer}: {_node_label(op)} is not in the shared-buffer form: {_CONCAT_FIX}")
        shape = past.shape
        dim = shape[3] if shape is not None and len(shape) == 4 else None
        if past.dtype not in _SHADOW_TYPES or not isinstance(dim, int) or dim % 32:
            raise TopThetaError(
                f"layer {layer}: the shadow K needs a float16 or bfloat16 cache with a static head size that is a "
                f"multiple of 32, and {past.name} is {past.dtype} {shape}: export in float16 / bfloat16, or leave "
                "the shadow K out"
            )
        batch, heads = shape[0], shape[1]
        shapes = {
            "key": (ir.DataType.UINT8, ir.Shape([batch, heads, names.MAX_SEQUENCE, dim // 2])),
            "range": (past.dtype, ir.Shape([batch, heads, names.SHADOW_BLOCKS, 2, dim])),
        }
        op.resize_inputs(max(len(op.inputs), _SHADOW_INPUT["range"] + 1))
        op.resize_outputs(max(len(op.outputs), _SHADOW_OUTPUT["range"] + 1))
        for out in op.outputs[: _SHADOW_OUTPUT["key"]]:
            if out.name is None and not out.uses():
                out.name = ""  # an optional output left out (kept), written as ONNX's empty name
        for kind in names.SHADOW_KINDS:
            dtype, vshape = shapes[kind]
            value = ir.Value(name=names.past_shadow_name(layer, kind), type=ir.TensorType(dtype), shape=vshape)
            graph.inputs.append(value)
            op.replace_input_with(_SHADOW_INPUT[kind], value)
            out = op.outputs[_SHADOW_OUTPUT[kind]]
            out.name, out.dtype, out.shape = names.present_shadow_name(layer, kind), dtype, vshape
            graph.outputs.append(out)


class GenaiSharedInputs(InPlacePass):
    """Give a shared-buffer graph the inputs onnxruntime-genai feeds it with ``past_present_share_buffer: true``
    (measured with genai 0.18: the buffers ``[batch, Hkv, max_length, D]`` bound as past and present, and
    ``attention_mask`` ``[batch, T]`` over the T tokens so far, the new S included; no past lengths).

    ``attention_mask`` becomes that ``[batch, total_sequence_length]`` input, zero-padded in the graph to the
    buffer's capacity (``Shape(past_key_values.0.key)[2]``) for the op, and ``past_sequence_length`` is no longer an
    input: every row's is ``T - S`` (genai keeps the rows of a batch at one length; a left-padded row's padding is
    masked). The rest of the graph is unchanged; the file is written beside the model as ``model.genai.onnx``."""

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        if model.metadata_props.get(names.GENAI_INPUTS_META) == "1":
            return PassResult(model, False)
        if kv_cache_form(graph) != "shared":
            raise TopThetaError(
                "onnxruntime-genai's shared buffer needs a graph in the shared-buffer KV-cache form, and this one has "
                "the concat form (or no cache): rewrite with kv_cache='shared' (--kv-cache shared), or use the "
                "concat form with past_present_share_buffer false"
            )
        inputs = {v.name: v for v in graph.inputs}
        mask, past_len, ids = (
            inputs.get(n) for n in (names.ATTENTION_MASK, names.PAST_SEQUENCE_LENGTH, names.INPUT_IDS)
        )
        first_past = inputs.get(names.past_name(0, "key"))
        if mask is None or ids is None or first_past is None or past_len is None:
            raise TopThetaError(
                "the shared-form graph has no attention_mask, input_ids or past_key_values.0.key input, which "
                "onnxruntime-genai feeds: re-export the decoder with topthetaexport.export_onnx"
            )
        batch = mask.shape[0] if mask.shape is not None else "batch"
        total = ir.Value(name=names.ATTENTION_MASK, type=mask.type, shape=ir.Shape([batch, "total_sequence_length"]))
        mask.name = "toptheta.attention_mask_full"
        nodes: list[ir.Node] = []

        def add(op: str, args: list[ir.Value | None], out: str, dtype: ir.DataType, shape: list, **attrs) -> ir.Value:
            attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
            node = ir.Node("", op, args, attributes=attributes, num_outputs=1, name=f"toptheta/genai/{out}")
            value = node.outputs[0]
            value.name, value.dtype, value.shape = f"toptheta.genai.{out}", dtype, ir.Shape(shape)
            nodes.append(node)
            return value

        def const(name: str, array: np.ndarray) -> ir.Value:
            value = ir.Value(name=f"toptheta.genai.{name}", const_value=ir.tensor(array, name=f"toptheta.genai.{name}"))
            graph.register_initializer(value)
            return value

        i64 = ir.DataType.INT64
        capacity = add("Shape", [first_past], "capacity", i64, [1], start=2, end=3)
        so_far = add("Shape", [total], "total_length", i64, [1], start=1, end=2)
        new = add("Shape", [ids], "new_length", i64, [1], start=1, end=2)
        rows = add("Shape", [ids], "batch", i64, [1], start=0, end=1)
        pad_end = add("Sub", [capacity, so_far], "pad_end", i64, [1])
        pads = add("Concat", [const("pads_begin", np.zeros(3, np.int64)), pad_end], "pads", i64, [4], axis=0)
        zero = const("mask_zero", np.zeros((), dtype=mask.dtype.numpy()))
        full = add("Pad", [total, pads, zero], "attention_mask_full", mask.dtype, [batch, names.MAX_SEQUENCE])
        past = add("Sub", [so_far, new], "past_length", i64, [1])
        past_rows = add("Expand", [past, rows], "past_lengths", i64, [batch])
        lengths = add("Cast", [past_rows], "past_sequence_length", ir.DataType.INT32, [batch], to=ir.DataType.INT32)

        mask.replace_all_uses_with(full)
        past_len.replace_all_uses_with(lengths)
        at = graph.inputs.index(mask)
        graph.inputs.remove(mask)
        graph.inputs.insert(at, total)
        graph.inputs.remove(past_len)
        graph.insert_before(graph.node(0), nodes)
        model.metadata_props[names.GENAI_INPUTS_META] = "1"
        return PassResult(model, True)
