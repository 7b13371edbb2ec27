"""One GEMM for the projections that read the same activation (docs/graph.md, "Fusions"), as an onnx-ir pass.

A decoder layer multiplies its normalised input by W_q, W_k and W_v: three GEMMs of one row each per decode step,
two of them too small to reach the memory rate (K and V of a GQA model are a few hundred columns), plus a bias
``Add`` each where the model has biases (Qwen2). ``ConcatProjections`` replaces every such group, ``MatMul(x, W_i)``
(+ ``Add(·, b_i)``) with constant ``W_i`` ``[C, n_i]`` sharing ``x``, by
``Split(Add(MatMul(x, concat(W_i)), concat(b_i)), [n_i])``: one GEMM over the same bytes, one bias kernel and one
Split, the way onnxruntime-genai's model builder packs Q, K and V. The outputs and their values are the same (the
GEMM's columns are the old GEMMs' columns); the old weights go, so the model does not grow.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

__all__ = ["ConcatProjections"]


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The initializer's values; None for a non-constant or for weights not on disk (a graph written without its
    external data, as the e2e bench writes them: nothing to concatenate)."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    try:
        return np.asarray(value.const_value.numpy())
    except OSError:
        return None


def _bias_after(matmul: ir.Node, width: int) -> tuple[ir.Node, np.ndarray] | None:
    """(Add, bias) when the MatMul's only use is ``Add(y, b)`` with a constant ``b`` of ``width`` elements."""
    y = matmul.outputs[0]
    uses = list(y.uses())
    if y.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.inputs[0] is not y:
        return None
    bias = _const_array(add.inputs[1])
    if bias is None or bias.shape != (width,):
        return None
    return add, bias


class ConcatProjections(InPlacePass):
    """Every group of two or more ``MatMul(x, W_i)`` with constant 2-D ``W_i`` of one dtype and one ``C`` whose
    widths add up to at most ``max_width_ratio · C`` -> one ``MatMul`` + ``Split`` (module docstring). ``groups``:
    how many groups were fused.

    The width bound keeps Q/K/V (``(Hq + 2·Hkv)·D``: 3·C for multi-head attention, less with GQA) and leaves gate/up
    (``2 · intermediate``, 5-12 ``C``): the ``Split`` copies the GEMM's whole output once, which in a prefill of
    8k tokens is 0.6 GB per layer for Qwen2.5-1.5B's gate/up, and the H200 run with gate/up concatenated measured
    prefills 4-11 % slower (docs/benchmarks.md, fifth run) for no decode kernel saved (2 GEMMs -> 1 GEMM + Split).
    """

    def __init__(self, max_width_ratio: float = 3.0) -> None:
        super().__init__()
        self.max_width_ratio = float(max_width_ratio)
        self.groups = 0

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        by_input: dict[int, list[tuple[ir.Node, np.ndarray]]] = defaultdict(list)
        sources: dict[int, ir.Value] = {}
        unreadable: set[int] = set()  # inputs with a weight not on disk: the group is left whole
        for node in graph:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
                continue
            w = node.inputs[1]
            if w is None or not w.is_initializer() or node.outputs[0].is_graph_output():
                continue
            weight = _const_array(w)
            if weight is None:
                unreadable.add(id(node.inputs[0]))
            elif weight.ndim == 2:
                by_input[id(node.inputs[0])].append((node, weight))
                sources[id(node.inputs[0])] = node.inputs[0]
        self.groups = 0
        for key, members in by_input.items():
            if key in unreadable:
                continue
            first = members[0][1]
            members = [m for m in members if m[1].dtype == first.dtype and m[1].shape[0] == first.shape[0]]
            width = sum(int(w.shape[1]) for _, w in members)
            if len(members) >= 2 and width <= self.max_width_ratio * int(first.shape[0]):
                self._fuse(graph, sources[key], members)
                self.groups += 1
        return PassResult(model, self.groups > 0)

    def _fuse(self, graph: ir.Graph, x: ir.Value, members: list[tuple[ir.Node, np.ndarray]]) -> None:
        widths = [int(w.shape[1]) for _, w in members]
        biases = [_bias_after(node, n) for (node, _), n in zip(members, widths)]
        with_bias = all(b is not None for b in biases)
        first = members[0][0]
        tag = first.name or "projection"
        weight = ir.Value(
            name=f"{members[0][0].inputs[1].name}.concat",
            const_value=ir.tensor(np.concatenate([w for _, w in members], axis=1)),
        )
        graph.register_initializer(weight)
        new_nodes = [ir.Node("", "MatMul", [x, weight], name=f"{tag}/concat")]
        y = new_nodes[-1].outputs[0]
        if with_bias:
            bias = ir.Value(
                name=f"{weight.name}.bias",
                const_value=ir.tensor(np.concatenate([b[1] for b in biases if b is not None])),
            )
            graph.register_initializer(bias)
            new_nodes.append(ir.Node("", "Add", [y, bias], name=f"{tag}/concat_bias"))
            y = new_nodes[-1].outputs[0]
        sizes = ir.Value(name=f"{weight.name}.split", const_value=ir.tensor(np.array(widths, np.int64)))
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [y, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(members))
        split.name = f"{tag}/concat_split"
        new_nodes.append(split)
        graph.insert_before(first, new_nodes)
        dtype = x.dtype or weight.dtype
        for node in new_nodes:
            node.outputs[0].dtype = dtype
        for (node, _), found, part in zip(members, biases, split.outputs):
            bias_node = found[0] if with_bias and found is not None else None
            old = (bias_node or node).outputs[0]
            part.dtype, part.shape = old.dtype or dtype, old.shape
            old.replace_all_uses_with(part, replace_graph_outputs=True)
            for dead in (bias_node, node):
                if dead is not None:
                    constants = [v for v in dead.inputs[1:] if v is not None and v.is_initializer()]
                    graph.remove(dead, safe=True)
                    for value in constants:
                        if not value.uses() and value.name in graph.initializers:
                            graph.initializers.pop(value.name)
