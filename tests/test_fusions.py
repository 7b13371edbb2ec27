"""The onnxruntime fusions outside attention (topthetaexport.onnx.fusions.FuseForOrt) on a tiny Qwen2 decoder.

Real export (float32 and float16), real rewrite (shared-buffer KV cache, θ keeping about half the keys), real
onnxruntime CPU sessions (which run RotaryEmbedding and SkipSimplifiedLayerNormalization in float16 too): the
fused graph gives the unfused graph's logits over a prefill and decode steps, the TopThetaAttention nodes are the
same, and every layer loses the nodes the fusions claim (docs/graph.md, "Fusions"). In float32 torch's exporter
already writes rotary as ONNX RotaryEmbedding; in float16 the Casts of cos/sin hide it, and FuseForOrt finds it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from conftest import TINY_POSITIONS, make_tokens, save_tiny_model
from test_export_rewrite import thresholds_for

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.onnx import names
from topthetaexport.onnx.decoding import GreedyNextToken, LastTokenLogits
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.fusions import FuseForOrt, fused, rotary_caches
from topthetaexport.onnx.layout import PackAttentionLayout, UnpackAttentionLayout, is_packed
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.variants import op_nodes
from topthetaexport.options import resolve_fusions
from topthetaexport.ort.device_generation import DeviceSession

STEPS = 4
# (nodes saved per layer, once, rotary fusions per layer) by dtype. Per layer: the two residual Adds go into
# SkipSimplifiedLayerNormalization; float16: rotary of Q and of K, 7 nodes each (Slice, Slice, Neg, Concat, Mul,
# Mul, Add) -> 1, and once the cos/sin computation (Unsqueeze, Cast, Mul, Concat, Cos, Sin, 2 Casts, 2 Unsqueezes).
# float16 also packs the op (layout.PackAttentionLayout): Reshape + Transpose of Q, K and V, Transpose + Reshape of
# the output, 8 nodes per layer, and once the 2 nodes that compute their target shapes. float32 keeps ONNX
# RotaryEmbedding on [B, H, S, D] between the split and the op.
# Both: Q/K/V (MatMul + bias Add each) -> one MatMul, one Add and a Split (3 fewer); gate/up stay (too wide).
SAVED = {"float32": (2 + 3, 0, 0), "float16": (2 + 2 * 6 + 8 + 3, 10 + 2, 2)}
TOLERANCE = {"float32": 2e-5, "float16": 2e-3}  # of the largest logit


@pytest.fixture(scope="module", params=["float32", "float16"])
def graphs(request, tiny_models_dir, tmp_path_factory):
    import torch

    dtype = request.param
    loaded = load_model(save_tiny_model("qwen2", tiny_models_dir))
    root = tmp_path_factory.mktemp(f"fusions-{dtype}")
    dense = export_onnx(loaded, root / "dense.onnx", dtype=dtype)
    g = torch.Generator().manual_seed(5)
    th = thresholds_for(loaded, torch.randn(loaded.num_layers, loaded.num_heads, 8, generator=g) * 0.3)
    th.meta["max_positions"] = TINY_POSITIONS  # as the pipeline records it: the rotary caches' rows
    for kind, fusions in (("plain", "off"), ("fused", "on")):
        rewrite(dense, th, root / f"{kind}.onnx", kv_cache="shared", fusions=fusions)
        model = ir.load(root / f"{kind}.onnx")
        LastTokenLogits()(model)
        GreedyNextToken()(model)
        ir.save(model, root / f"{kind}.onnx")
    return {
        "plain": root / "plain.onnx",
        "fused": root / "fused.onnx",
        "layers": loaded.num_layers,
        "dtype": dtype,
        "dense": dense,
        "thresholds": th,
    }


def _ops(path) -> Counter:
    return Counter(node.op_type for node in ir.load(path).graph)


def test_every_layer_loses_the_fused_nodes(graphs):
    plain, fused_ops, layers = _ops(graphs["plain"]), _ops(graphs["fused"]), graphs["layers"]
    per_layer, once, rotary = SAVED[graphs["dtype"]]
    assert sum(plain.values()) - sum(fused_ops.values()) == per_layer * layers + once
    assert fused_ops["RotaryEmbedding"] == 2 * layers and fused_ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert fused_ops["RMSNormalization"] == 1  # layer 0's input norm has no residual before it: left as it was
    assert fused_ops["SimplifiedLayerNormalization"] == fused_ops["Neg"] == 0
    assert fused_ops["Cos"] == (0 if rotary else plain["Cos"])  # float32: ONNX RotaryEmbedding reads cos/sin
    assert fused_ops["TopThetaAttention"] == plain["TopThetaAttention"] == layers
    assert fused(ir.load(graphs["fused"])) == {
        "simplified_layer_norm": 2 * layers + 1,
        "skip_simplified_layer_norm": 2 * layers,
        "rotary_embedding": rotary * layers,
        "rotary_before_transpose": rotary * layers,
        "packed_attention": (layers if rotary else 0),
        "concat_projections": layers,
    }


def test_toptheta_nodes_survive_untouched(graphs):
    def ops(path):
        return [
            (layer, node.name, node.domain, [v.name for v in node.inputs[3:] if v is not None], dict(node.attributes))
            for layer, node in op_nodes(ir.load(path).graph)
        ]

    heads = ("num_heads", "num_kv_heads")
    before, after = ops(graphs["plain"]), ops(graphs["fused"])
    assert [(a[:4], {k: v.value for k, v in a[4].items() if k not in heads}) for a in after] == [
        (b[:4], {k: v.value for k, v in b[4].items() if k not in heads}) for b in before
    ]
    for _, node in op_nodes(ir.load(graphs["fused"]).graph):  # Q and K: rotated, then at most split into heads
        for value in node.inputs[:2]:
            producer = value.producer()
            while producer.op_type in ("Transpose", "Reshape"):
                producer = producer.inputs[0].producer()
            assert producer.op_type == "RotaryEmbedding", node.name


def test_fused_graph_gives_the_same_logits_on_the_cpu(graphs):
    ids = make_tokens(2, 9, seed=3).numpy()
    results = {}
    for kind in ("plain", "fused"):
        gen = DeviceSession(graphs[kind], device="cpu").generator(2, ids.shape[1] + STEPS)
        step = gen.prefill(ids)
        logits, tokens = [gen.logits.read().astype(np.float32)], [step.tokens.copy()]
        for _ in range(STEPS - 1):
            step = gen.decode(step.tokens)
            logits.append(gen.logits.read().astype(np.float32))
            tokens.append(step.tokens.copy())
        results[kind] = (np.stack(logits), np.stack(tokens))
    np.testing.assert_array_equal(results["fused"][1], results["plain"][1])
    scale = float(np.abs(results["plain"][0]).max())
    assert scale > 0.1
    np.testing.assert_allclose(
        results["fused"][0], results["plain"][0], atol=TOLERANCE[graphs["dtype"]] * scale, rtol=0
    )


def test_float16_op_reads_and_writes_the_projections_packed(graphs):
    """Packed layout (docs/op.md, "Layouts"): Q and K straight from RotaryEmbedding, V from its projection, the
    output straight into o_proj, all [B, S, H·D]; no Transpose is left in the graph."""
    if graphs["dtype"] != "float16":
        pytest.skip("float32 keeps ONNX RotaryEmbedding on [B, H, S, D]: the op stays heads first")
    model = ir.load(graphs["fused"])
    loaded_heads = graphs["thresholds"].theta.shape[1]
    for _, node in op_nodes(model.graph):
        assert is_packed(node) and node.attributes.get_int("num_heads") == loaded_heads
        assert [v.producer().op_type for v in node.inputs[:2]] == ["RotaryEmbedding", "RotaryEmbedding"]
        assert node.inputs[2].producer().op_type == "Split"  # of the Q/K/V GEMM (ConcatProjections)
        assert [use.node.op_type for use in node.outputs[0].uses()] == ["MatMul"]
    assert _ops(graphs["fused"])["Transpose"] == 0
    from topthetaexport.onnx.summary import format_summary, summarize

    summary = summarize(graphs["fused"])
    assert {n["layout"] for n in summary["toptheta_nodes"]} == {"packed"}  # what `inspect` prints per layer
    assert ", packed, θ" in format_summary(summary)


def test_unpacking_gives_the_heads_first_graph_and_the_same_logits(graphs, tmp_path):
    """UnpackAttentionLayout (what the top-k baseline and the exposed-IO passes run first) is the inverse: heads
    first again, bit-identical logits on the CPU."""
    if graphs["dtype"] != "float16":
        pytest.skip("nothing packed in float32")
    model = ir.load(graphs["fused"])
    assert UnpackAttentionLayout()(model).modified
    assert not any(is_packed(node) for _, node in op_nodes(model.graph))
    ir.save(model, tmp_path / "unpacked.onnx")
    ids = make_tokens(2, 9, seed=4).numpy()
    outs = []
    for path in (graphs["fused"], tmp_path / "unpacked.onnx"):
        gen = DeviceSession(path, device="cpu").generator(2, ids.shape[1] + 2)
        step = gen.prefill(ids)
        step = gen.decode(step.tokens)
        outs.append(gen.logits.read())
    np.testing.assert_array_equal(outs[1], outs[0])
    again = ir.load(tmp_path / "unpacked.onnx")
    layout = PackAttentionLayout()
    layout(again)
    assert layout.packed == graphs["layers"]


def test_exposed_io_of_a_packed_graph_is_typed(graphs, tmp_path):
    """ExposeAttentionIO on a packed graph (a pipeline output fused for CUDA): Q, K, V and the output come back
    heads first with the op's dtype, also where a fusion's Split made the value untyped, so the graph saves."""
    if graphs["dtype"] != "float16":
        pytest.skip("nothing packed in float32")
    from topthetaexport.onnx.variants import ExposeAttentionIO

    model = ir.load(graphs["fused"])
    for _, node in op_nodes(model.graph):
        for value in (node.inputs[0], node.inputs[2]):
            value.type, value.shape = None, None  # as ConcatProjections' Split leaves them
    ExposeAttentionIO()(model)
    exposed = [v for v in model.graph.outputs if (v.name or "").startswith(names.IO_PREFIX)]
    assert len(exposed) == 5 * graphs["layers"]
    assert {v.dtype for v in exposed if not v.name.endswith(".mask")} == {ir.DataType.FLOAT16}
    ir.save(model, tmp_path / "exposed.onnx")  # an untyped graph output does not serialise


def test_rotary_caches_cover_the_model_positions_and_the_generator_stays_inside(graphs):
    """The caches have the model's positions plus a margin (a full context decodes a token or two more); the rows are
    in the metadata, and a generator that would read past them (onnxruntime does not check) is refused."""
    if graphs["dtype"] == "float32":
        pytest.skip("float32 keeps ONNX RotaryEmbedding, which computes cos/sin in the graph")
    from topthetaexport.onnx.fusions import ROTARY_MARGIN, ROTARY_ROWS_META

    model = ir.load(graphs["fused"])
    rows = TINY_POSITIONS + ROTARY_MARGIN
    assert model.metadata_props[ROTARY_ROWS_META] == str(rows)
    assert {model.graph.initializers[n].const_value.shape[0] for n in rotary_caches(model)} == {rows}
    session = DeviceSession(graphs["fused"], device="cpu")
    assert session.max_positions == rows
    session.generator(1, rows)
    with pytest.raises(TopThetaError, match=f"max length {rows + 1} is past the {rows} positions .* --max-context"):
        session.generator(1, rows + 1)


def test_fuse_runs_once_and_checks_its_argument(graphs):
    model = ir.load(graphs["fused"])
    assert not FuseForOrt(TINY_POSITIONS)(model).modified
    with pytest.raises(TopThetaError, match="max_positions 0 is not positive"):
        FuseForOrt(0)


def test_weightless_bench_graphs_compute_the_rotary_caches_again(graphs, tmp_path):
    """The e2e bench writes graphs without weights; the rotary caches come back from their inverse frequencies."""
    from topthetaexport.ort import e2e

    model = ir.load(graphs["fused"])
    caches = rotary_caches(model)
    if graphs["dtype"] == "float32":  # the exporter's own RotaryEmbedding computes cos/sin in the graph
        assert caches == {}
        return
    assert sorted(caches) == ["toptheta.rotary.0.cos_cache", "toptheta.rotary.0.sin_cache"]
    expected = {name: model.graph.initializers[name].const_value.numpy().copy() for name in caches}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(e2e, "STRIP_BYTES", 1024)  # the tiny caches are [256, 8] float16
        e2e._write_graphs({k: ir.load(graphs["fused"]) for k in e2e.GRAPHS}, tmp_path, {"name": "t"}, keep_data=False)
    work = tmp_path / "work"
    manifest = e2e.materialize(tmp_path, work, device="cpu", log=lambda m: None)
    entries = {e["name"]: e for e in manifest["weights"]}
    assert {entries[n]["kind"] for n in caches} == {"rotary_cos", "rotary_sin"}
    assert all(entries[n]["gather_only"] for n in caches)  # read row by row: not streamed weight bytes
    again = ir.load(work / e2e.GRAPHS["toptheta"])
    for name, table in expected.items():
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(), table)


def test_auto_fuses_float16_and_bfloat16_on_cuda_only():
    assert [resolve_fusions("auto", d, cuda=True) for d in ("float32", "float16", "bfloat16")] == ["off", "on", "on"]
    assert resolve_fusions("auto", "float16", cuda=False) == "off"
    assert (
        resolve_fusions("on", "float32", cuda=False) == "on" and resolve_fusions("off", "float16", cuda=True) == "off"
    )
    with pytest.raises(TopThetaError, match="unknown fusions mode 'yes' \\(--fusions\\): use auto, on or off"):
        resolve_fusions("yes", "float16", cuda=True)


def test_rewrite_with_fusions_needs_the_rotary_length(graphs, tmp_path):
    th = graphs["thresholds"]
    del th.meta["max_positions"]
    try:
        with pytest.raises(TopThetaError, match="need the model's maximum position .* --max-context N") as err:
            rewrite(graphs["dense"], th, tmp_path / "m.onnx", fusions="on")
        assert "\n" not in str(err.value)
        with pytest.raises(TopThetaError, match="unknown fusions mode 'auto' \\(--fusions\\): use on or off"):
            rewrite(graphs["dense"], th, tmp_path / "m.onnx", fusions="auto")
    finally:
        th.meta["max_positions"] = TINY_POSITIONS


def _projections_model(bias: bool) -> ir.Model:
    """x [2, 3, 8] -> MatMul by W_q [8, 8], W_k [8, 4], W_v [8, 4] (+ biases): three graph outputs through Relu."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    inits, nodes, outputs = [], [], []
    for name, n in (("q", 8), ("k", 4), ("v", 4)):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, n)).astype(np.float32), f"W_{name}"))
        nodes.append(helper.make_node("MatMul", ["x", f"W_{name}"], [f"{name}_mm"]))
        last = f"{name}_mm"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b_{name}"))
            nodes.append(helper.make_node("Add", [last, f"b_{name}"], [f"{name}_b"]))
            last = f"{name}_b"
        nodes.append(helper.make_node("Relu", [last], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    graph = helper.make_graph(nodes, "projections", [x], outputs, inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_concat_projections_gives_the_same_outputs(bias):
    """Q/K/V-like MatMuls on one input become one MatMul (+ one Add) and a Split; the outputs are those of the three
    GEMMs (the same columns), and the old weights are gone."""
    import onnxruntime as ort

    from topthetaexport.onnx.projections import ConcatProjections

    def run(model):
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)})

    want = run(_projections_model(bias))
    model = _projections_model(bias)
    fuse = ConcatProjections()
    assert fuse(model).modified and fuse.groups == 1
    ops = Counter(n.op_type for n in model.graph)
    assert ops == Counter({"MatMul": 1, "Split": 1, "Relu": 3, **({"Add": 1} if bias else {})})
    made = {"W_q.concat", "W_q.concat.split"} | ({"W_q.concat.bias"} if bias else set())
    assert set(model.graph.initializers) == made  # the three weights (and biases) are gone
    for got, expected in zip(run(model), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    wide = _projections_model(bias)  # 16 columns from 8: wider than 1.5 x C, left as it is
    assert not ConcatProjections(max_width_ratio=1.5)(wide).modified


def test_concat_form_fused_then_shared_packs_on_a_second_pass(graphs, tmp_path):
    """A graph fused in the concat form (the op reads the Concat of past and new K/V: nothing to pack) and given the
    shared cache afterwards (bench/e2e.py prepare --from a CPU output folder) packs when FuseForOrt runs again."""
    if graphs["dtype"] != "float16":
        pytest.skip("nothing packed in float32")
    from topthetaexport.onnx.kv_cache import ShareKvBuffer

    rewrite(graphs["dense"], graphs["thresholds"], tmp_path / "concat.onnx", kv_cache="concat", fusions="on")
    model = ir.load(tmp_path / "concat.onnx")
    assert fused(model)["packed_attention"] == 0
    ShareKvBuffer()(model)
    assert FuseForOrt(TINY_POSITIONS)(model).modified
    assert fused(model)["packed_attention"] == graphs["layers"]
    assert all(is_packed(node) for _, node in op_nodes(model.graph))
    assert not FuseForOrt(TINY_POSITIONS)(model).modified


def _angles_as_matmul(model: ir.Model) -> int:
    """Rewrite the rotary angles ``Mul(Cast(Unsqueeze(position_ids, 2)), inv_freq)`` of torch's export into the
    form transformers before 5.2x writes: ``Transpose(MatMul(Expand(inv_freq [1, D/2, 1]), Cast(Unsqueeze(pos,
    1))), [0, 2, 1])``. Returns how many products were rewritten."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Mul" or node.inputs[1].const_value is None or node.inputs[1].const_value.numpy().ndim != 1:
            continue
        cast = node.inputs[0].producer()
        if cast is None or cast.op_type != "Cast" or cast.inputs[0].producer().op_type != "Unsqueeze":
            continue
        positions = cast.inputs[0].producer().inputs[0]
        freqs = node.inputs[1].const_value.numpy().astype(np.float32)
        column = ir.Value(name=f"inv_freq_column_{count}", const_value=ir.tensor(freqs.reshape(1, -1, 1)))
        column.shape, column.dtype = ir.Shape([1, freqs.size, 1]), ir.DataType.FLOAT
        model.graph.register_initializer(column)
        ones = ir.Value(name=f"expand_ones_{count}", const_value=ir.tensor(np.ones(3, np.int64)))
        ones.shape, ones.dtype = ir.Shape([3]), ir.DataType.INT64
        model.graph.register_initializer(ones)
        axis = ir.Value(name=f"axis_one_{count}", const_value=ir.tensor(np.array([1], np.int64)))
        axis.shape, axis.dtype = ir.Shape([1]), ir.DataType.INT64
        model.graph.register_initializer(axis)
        expand = ir.node("Expand", [column, ones])
        unsq = ir.node("Unsqueeze", [positions, axis])
        to_float = ir.node("Cast", [unsq.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        matmul = ir.node("MatMul", [expand.outputs[0], to_float.outputs[0]])
        transpose = ir.node("Transpose", [matmul.outputs[0]], attributes={"perm": [0, 2, 1]})
        model.graph.insert_before(node, [expand, unsq, to_float, matmul, transpose])
        node.outputs[0].replace_all_uses_with(transpose.outputs[0])
        model.graph.remove(node, safe=True)
        count += 1
    return count


def test_rotary_angles_as_matmul_fuse_too(graphs, tmp_path):
    """transformers 5.17's rotary (a MatMul of the inverse frequencies and the positions, then a Transpose) fuses
    like 5.2x's broadcast Mul (RotaryCosSinCacheMatMul), and the fused graph gives the unfused one's logits."""
    if graphs["dtype"] != "float16":
        pytest.skip("float32 exports write ONNX RotaryEmbedding already")
    model = ir.load(graphs["dense"])
    assert _angles_as_matmul(model) == 1  # one angle computation, shared by the layers
    assert not any(n.op_type == "Mul" and n.inputs[1].const_value is not None for n in model.graph if n.inputs[1:])
    dense = tmp_path / "dense-matmul.onnx"
    ir.save(model, dense)
    layers = graphs["layers"]
    for kind, fusions in (("plain", "off"), ("fused", "on")):
        rewrite(dense, graphs["thresholds"], tmp_path / f"{kind}.onnx", kv_cache="shared", fusions=fusions)
        out = ir.load(tmp_path / f"{kind}.onnx")
        LastTokenLogits()(out)
        ir.save(out, tmp_path / f"{kind}.onnx")
    counts = fused(ir.load(tmp_path / "fused.onnx"))
    assert counts is not None and counts["rotary_embedding"] == 2 * layers and counts["packed_attention"] == layers
    ids = make_tokens(2, 9, seed=4).numpy()
    logits = {}
    for kind in ("plain", "fused"):
        gen = DeviceSession(tmp_path / f"{kind}.onnx", device="cpu").generator(2, ids.shape[1] + 2)
        step = gen.prefill(ids)
        first = gen.logits.read().astype(np.float32)
        gen.decode(step.tokens)
        logits[kind] = np.stack([first, gen.logits.read().astype(np.float32)])
    scale = float(np.abs(logits["plain"]).max())
    np.testing.assert_allclose(logits["fused"], logits["plain"], atol=TOLERANCE["float16"] * scale, rtol=0)
