"""Graph passes for device-resident decoding (``ort.device_generation``) and the end-to-end benchmark.

* ``LastTokenLogits``: the LM head runs on the last position only, ``logits`` becomes ``[B, 1, vocab]``. A
  prefill then neither computes nor returns ``[B, S, vocab]`` (10 GB at 32k tokens and a 152k vocabulary), and
  the output has the same shape in prefill and decode, so one preallocated buffer serves both.
* ``GreedyNextToken``: a graph output ``toptheta.next_token`` (int64 ``[B, 1]``), the argmax of the last position's
  logits (first index on ties, as ``numpy.argmax``): greedy decoding reads back B integers per step, not the logits.
* ``ThetaInput``: every layer's θ initializer is replaced by one float32 graph input ``toptheta.theta`` ``[Hq, R]``,
  so a benchmark can change θ between runs of one session (ρ stays an initializer).

Each pass marks the model (metadata ``toptheta.<pass>`` = ``1``) and does nothing when run again.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from .._errors import TopThetaError
from . import names
from .variants import op_nodes

__all__ = ["GreedyNextToken", "LastTokenLogits", "ThetaInput", "has_pass"]

_THETA_INPUT = 3
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Cast", "Tanh", "Identity"}  # between the LM head and `logits`
META_LAST_TOKEN = names.META_PREFIX + "last_token_logits"
META_NEXT_TOKEN = names.META_PREFIX + "next_token"
META_THETA_INPUT = names.META_PREFIX + "theta_input"


def has_pass(model: ir.Model, meta_key: str) -> bool:
    return model.metadata_props.get(meta_key) == "1"


def _int64(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    import numpy as np

    tensor = ir.tensor(np.array(values, np.int64), name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.shape, value.dtype = ir.Shape([len(values)]), ir.DataType.INT64
    graph.register_initializer(value)
    return value


def _logits(graph: ir.Graph) -> ir.Value:
    out = next((v for v in graph.outputs if v.name == names.LOGITS), None)
    if out is None:
        raise TopThetaError(
            "the model has no 'logits' output: export a decoder language model with topthetaexport.export_onnx"
        )
    return out


class LastTokenLogits(InPlacePass):
    """``logits`` of the last position only (``[B, 1, vocab]``): a ``Slice`` of the LM head's input."""

    def call(self, model: ir.Model) -> PassResult:
        if has_pass(model, META_LAST_TOKEN):
            return PassResult(model, False)
        graph = model.graph
        logits = _logits(graph)
        node = logits.producer()
        while node is not None and node.op_type in _ELEMENTWISE and node.domain in ("", "ai.onnx"):
            node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if node is None or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            found = "nothing" if node is None else node.op_type
            raise TopThetaError(
                f"the LM head producing 'logits' is not a MatMul (found {found}): last-token logits need the "
                "graph of topthetaexport.export_onnx"
            )
        hidden = node.inputs[0]
        last = ir.Node(
            "",
            "Slice",
            [hidden, _int64(graph, "toptheta.last/start", [-1]), _int64(graph, "toptheta.last/end", [2**62])]
            + [_int64(graph, "toptheta.last/axis", [1])],
            num_outputs=1,
            name="toptheta/last_position",
        )
        sliced = last.outputs[0]
        sliced.name, sliced.dtype = "toptheta.last_hidden", hidden.dtype
        if hidden.shape is not None and len(hidden.shape) == 3:
            sliced.shape = ir.Shape([hidden.shape[0], 1, hidden.shape[2]])
        graph.insert_before(node, last)
        node.replace_input_with(0, sliced)
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
        model.metadata_props[META_LAST_TOKEN] = "1"
        return PassResult(model, True)


class GreedyNextToken(InPlacePass):
    """Graph output ``toptheta.next_token`` (int64 ``[B, 1]``): argmax over the vocabulary at the last position."""

    def call(self, model: ir.Model) -> PassResult:
        if has_pass(model, META_NEXT_TOKEN):
            return PassResult(model, False)
        graph = model.graph
        logits = _logits(graph)
        last = ir.Node(
            "",
            "Slice",
            [logits, _int64(graph, "toptheta.next/start", [-1]), _int64(graph, "toptheta.next/end", [2**62])]
            + [_int64(graph, "toptheta.next/axis", [1])],
            num_outputs=1,
            name="toptheta/next_token_logits",
        )
        x = last.outputs[0]
        x.name, x.dtype = "toptheta.next_token_logits", logits.dtype
        nodes = [last]
        if logits.dtype not in (None, ir.DataType.FLOAT):  # ArgMax has no bfloat16 kernel everywhere
            cast = ir.Node(
                "", "Cast", [x], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name="toptheta/next_f32"
            )
            cast.outputs[0].name, cast.outputs[0].dtype = "toptheta.next_token_f32", ir.DataType.FLOAT
            nodes.append(cast)
            x = cast.outputs[0]
        argmax = ir.Node(
            "",
            "ArgMax",
            [x],
            attributes=[ir.AttrInt64("axis", 2), ir.AttrInt64("keepdims", 0), ir.AttrInt64("select_last_index", 0)],
            name="toptheta/next_token",
        )
        token = argmax.outputs[0]
        batch = logits.shape[0] if logits.shape is not None else "batch"
        token.name, token.dtype, token.shape = names.NEXT_TOKEN, ir.DataType.INT64, ir.Shape([batch, 1])
        nodes.append(argmax)
        graph.extend(nodes)
        graph.outputs.append(token)
        model.metadata_props[META_NEXT_TOKEN] = "1"
        return PassResult(model, True)


class ThetaInput(InPlacePass):
    """Every TopThetaAttention reads θ from one graph input ``toptheta.theta`` (float32 ``[Hq, R]``) instead of its
    ``toptheta.theta.{l}`` initializer; all layers must have the same ``[Hq, R]``."""

    def call(self, model: ir.Model) -> PassResult:
        if has_pass(model, META_THETA_INPUT):
            return PassResult(model, False)
        graph = model.graph
        ops = op_nodes(graph)
        if not ops:
            raise TopThetaError("the model has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
        shapes = {tuple(node.inputs[_THETA_INPUT].shape or ()) for _, node in ops}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise TopThetaError(
                f"the layers' thresholds have the shapes {sorted(shapes)}, not one [Hq, R]: one θ input cannot "
                "serve them; use SetThresholds instead"
            )
        theta = ir.Value(
            name=names.THETA_INPUT, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(next(iter(shapes))))
        )
        graph.inputs.append(theta)
        for _, node in ops:
            old = node.inputs[_THETA_INPUT]
            node.replace_input_with(_THETA_INPUT, theta)
            if old is not None and old.is_initializer() and not old.uses():
                graph.initializers.pop(old.name)
        model.metadata_props[META_THETA_INPUT] = "1"
        return PassResult(model, True)
