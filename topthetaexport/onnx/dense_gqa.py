"""The dense comparison graph: every TopThetaAttention of a shared-form graph as ``com.microsoft.GroupQueryAttention``.

``DenseGqa`` turns the shared-buffer KV-cache form of a rewritten model (``ShareKvBuffer``, docs/graph.md) into the
best dense graph onnxruntime offers for it, the one onnxruntime-genai's model builder emits: grouped-query attention
over the same preallocated ``[B, Hkv, M, D]`` buffers, bound as both past and present (``past_present_share_buffer``).
Same weights, same inputs and outputs, so one driver (``ort.device_generation``) runs both graphs.

Per node, with Q/K already rotated (``do_rotary = 0``):

* ``query`` / ``key`` / ``value``: the op's Q ``[B, Hq, S, D]`` and new K/V ``[B, Hkv, S, D]`` transposed and
  reshaped to ``[B, S, H*D]``; ``past_key`` / ``past_value``: the buffers; outputs 1, 2: ``present.{i}.*``;
* ``seqlens_k = past_sequence_length + S - 1`` (int32 ``[B]``, on the device: ``S - 1`` comes from a ``Range``
  whose CPU-side scalars are shapes, so no host copy enters the graph and ORT CUDA graphs can capture it);
* ``total_sequence_length`` (int32 scalar, a CPU input of GQA): ``M`` (``Shape(past_key)[2]``) for a one-token
  step and ``S`` for a multi-token call. GroupQueryAttention refuses ``S > 1`` at batch > 1 unless
  ``total_sequence_length == S`` ("first prompt"), and then attends over the S new keys only, so a multi-token
  call must start from an empty cache (P = 0, a prefill); one-token steps read ``seqlens_k`` rows of the buffer;
* ``scale``, ``num_heads``, ``kv_num_heads`` from the node; the output is reshaped and transposed back to the op's
  ``[B, Hq, S, D]``.

GroupQueryAttention is always causal (bottom-right aligned, like the op) and takes no key-padding mask: the graph
ignores ``attention_mask`` (unpadded batches; the e2e bench feeds those). Refused (one line each): a node with
``causal = 0``, a 4-D mask, a concat-form node (no input 8), ``D != Dv``, the ``kept`` output in use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .._errors import TopThetaError
from . import names
from .layout import UnpackAttentionLayout
from .variants import PAST_LENGTH_INPUT, is_shared_kv, op_nodes

__all__ = ["GQA_DOMAIN", "DenseGqa"]

GQA_DOMAIN = "com.microsoft"
_MASK_INPUT, _KEPT_OUTPUT = 4, 3
_SHARED_FIX = "make the shared-buffer form first (ShareKvBuffer, rewrite(..., kv_cache='shared'))"


class _Nodes:
    """Nodes and int64 constants added in front of one op, named under ``prefix``."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix
        self.nodes: list[ir.Node] = []

    def ints(self, name: str, *values: int, scalar: bool = False) -> ir.Value:
        array = np.array(values[0] if scalar else list(values), np.int64)
        tensor = ir.tensor(array, name=self.prefix + name)
        value = ir.Value(name=tensor.name, const_value=tensor)
        value.shape, value.dtype = ir.Shape(list(array.shape)), ir.DataType.INT64
        self.graph.register_initializer(value)
        return value

    def __call__(self, op: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1, **attrs: Any):
        node = ir.Node(
            domain,
            op,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs),
            num_outputs=outputs,
            name=f"{self.prefix}{op}{len(self.nodes)}",
        )
        for j, out in enumerate(node.outputs):
            out.name = f"{self.prefix}{op.lower()}{len(self.nodes)}" + (f"_{j}" if j else "")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)


def _static(shape: ir.Shape | None, axis: int) -> int | None:
    if shape is None or len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


class DenseGqa(InPlacePass):
    """Replace every TopThetaAttention node of a shared-form graph by ``com.microsoft.GroupQueryAttention`` on the
    same buffers (module docstring); θ/ρ initializers and the key-padding mask cast go with the nodes."""

    def call(self, model: ir.Model) -> PassResult:
        UnpackAttentionLayout()(model)  # the pairs of Transposes it adds cancel in onnxruntime
        graph = model.graph
        ops = op_nodes(graph)
        if not ops:
            raise TopThetaError("the model has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
        for layer, node in ops:
            self._check(layer, node)
        first = ops[0][1]
        shared = _Nodes(graph, "toptheta/gqa/")
        past_len = first.inputs[PAST_LENGTH_INPUT]
        s = shared("Squeeze", shared("Shape", first.inputs[0], start=2, end=3))  # S, int64 scalar (CPU)
        m = shared("Squeeze", shared("Shape", first.inputs[5], start=2, end=3))  # M, the buffer's capacity
        one = shared.ints("one", 1, scalar=True)
        s_minus_1 = shared("Range", shared("Sub", s, one), s, one)  # [S - 1] on the device (Range: CPU scalars in)
        seqlens = shared("Add", past_len, shared("Cast", s_minus_1, to=ir.DataType.INT32))  # int32 [B]
        seqlens.name = "toptheta.gqa.seqlens_k"
        total = shared("Cast", shared("Where", shared("Equal", s, one), m, s), to=ir.DataType.INT32)
        total.name = "toptheta.gqa.total_sequence_length"
        graph.insert_before(first, shared.nodes)
        for layer, node in ops:
            self._replace(graph, layer, node, seqlens, total)
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)  # θ / ρ of the replaced nodes
        RemoveUnusedNodesPass()(model)
        model.opset_imports[GQA_DOMAIN] = 1
        model.opset_imports.pop(names.DOMAIN, None)
        model.metadata_props[names.META_PREFIX + "attention"] = f"{GQA_DOMAIN}.GroupQueryAttention"
        return PassResult(model, True)

    def _check(self, layer: int, node: ir.Node) -> None:
        where = f"layer {layer} ({node.name or node.op_type})"
        if not is_shared_kv(node):
            raise TopThetaError(f"{where} has the concat-form KV cache (no past_sequence_length): {_SHARED_FIX}")
        if int(_attr(node, "causal", 0)) != 1:
            raise TopThetaError(
                f"{where} is not causal, and GroupQueryAttention always is: only decoders have a dense GQA twin"
            )
        mask = node.inputs[_MASK_INPUT] if len(node.inputs) > _MASK_INPUT else None
        if mask is not None and mask.shape is not None and len(mask.shape) != 2:
            raise TopThetaError(
                f"{where} reads a {len(mask.shape)}-D mask (a sliding window?), which GroupQueryAttention cannot "
                "take: rewrite a model whose layers read the [B, M] key-padding mask"
            )
        kept = node.outputs[_KEPT_OUTPUT] if len(node.outputs) > _KEPT_OUTPUT else None
        if kept is not None and (kept.uses() or kept.is_graph_output()):
            raise TopThetaError(f"{where}: its kept counts are in use, GroupQueryAttention has none: drop ExposeKept")
        d, dv = _static(node.inputs[0].shape, 3), _static(node.inputs[2].shape, 3)
        if d is not None and dv is not None and d != dv:
            raise TopThetaError(f"{where} has head size {d} for Q/K but {dv} for V: GroupQueryAttention needs one")

    def _replace(self, graph: ir.Graph, layer: int, node: ir.Node, seqlens: ir.Value, total: ir.Value) -> None:
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        hq = int(_attr(node, "num_heads", 0)) or _static(q.shape, 1)
        hkv = int(_attr(node, "num_kv_heads", 0)) or _static(k.shape, 1)
        d = _static(q.shape, 3) or _static(node.inputs[5].shape, 3)
        if not hq or not hkv or not d:
            raise TopThetaError(
                f"layer {layer}: the number of heads or the head size of {node.name or 'the op'} is not known "
                "from its attributes or shapes: re-export the model (static heads) and rewrite it again"
            )
        n = _Nodes(graph, f"toptheta/gqa.{layer}/")

        def bsh(x: ir.Value, heads: int) -> ir.Value:  # [B, H, S, D] -> [B, S, H*D]
            return n("Reshape", n("Transpose", x, perm=[0, 2, 1, 3]), n.ints(f"bsh{heads}_{len(n.nodes)}", 0, 0, -1))

        y, present_k, present_v = n(
            "GroupQueryAttention",
            bsh(q, hq),
            bsh(k, hkv),
            bsh(v, hkv),
            node.inputs[5],
            node.inputs[6],
            seqlens,
            total,
            domain=GQA_DOMAIN,
            outputs=3,
            num_heads=hq,
            kv_num_heads=hkv,
            scale=float(_attr(node, "scale", 0.0)),
            softcap=float(_attr(node, "softcap", 0.0)),
            do_rotary=0,
        )
        y4 = n("Transpose", n("Reshape", y, n.ints("bhsd", 0, 0, hq, d)), perm=[0, 2, 1, 3])
        old_y = node.outputs[0]
        y4.dtype, y4.shape = old_y.dtype, old_y.shape
        y.dtype = old_y.dtype
        graph.insert_before(node, n.nodes)
        old_y.replace_all_uses_with(y4, replace_graph_outputs=True)
        for old, new in ((node.outputs[1], present_k), (node.outputs[2], present_v)):
            new.dtype, new.shape = old.dtype, old.shape
            at = [i for i, out in enumerate(graph.outputs) if out is old]
            name, old.name = old.name, None
            new.name = name
            for i in at:
                graph.outputs[i] = new
        graph.remove(node, safe=True)
