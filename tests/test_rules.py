"""The rewrite rules (topthetaexport.onnx.rules) and the variant passes (topthetaexport.onnx.variants), one form
at a time on small hand-built graphs, run in real onnxruntime sessions against topthetaexport.torch.reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from topthetaexport._errors import TopThetaError
from topthetaexport.onnx import names
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.rules import (
    CachedGqaAttention,
    CachedMhaAttention,
    GqaAttention,
    MaskPlan,
    MhaAttention,
    RuleContext,
    attention_rules,
)
from topthetaexport.onnx.variants import (
    DenseTwin,
    ExposeAttentionIO,
    ExposeKept,
    ReplaceWithTopK,
    SetCompMode,
    SetThresholds,
)
from topthetaexport.ort import library as runtime
from topthetaexport.thresholds import TENSORS_FILE, Thresholds
from topthetaexport.torch.reference import dense_attention, topk_attention, toptheta_attention

B, HQ, D, S, P, ROWS = 2, 4, 8, 3, 4, 3
T = P + S
TOL = 2e-5


@dataclass
class Graph:
    model: ir.Model
    feeds: dict[str, np.ndarray]
    attention: ir.Node
    causal: bool
    mask: np.ndarray | None  # what the reference gets as attn_mask
    hkv: int


def _value(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.tensor(array).dtype
    graph.register_initializer(value)
    return value


def _node(
    graph: ir.Graph,
    op: str,
    inputs: list,
    shape: list | None = None,
    dtype=ir.DataType.FLOAT,
    name: str | None = None,
    **attrs,
) -> ir.Value:
    node = ir.Node("", op, inputs, attributes=ir.convenience.convert_attributes(attrs), num_outputs=1)
    graph.append(node)
    out = node.outputs[0]
    out.name = name or f"{op.lower()}_{len(graph)}"
    if shape is not None:
        out.shape, out.dtype = ir.Shape(shape), dtype
    return out


def build(
    *, cache: bool, hkv: int, mask: str | None, unsqueeze_axis: int = 2, present_output: bool = True, seed: int = 0
) -> Graph:
    """One ONNX Attention node in a form the exporter emits.

    ``cache``: K/V are Concat(past, new) on axis 2, the present outputs. ``hkv < HQ``: K/V repeated over the
    query group by Unsqueeze -> Expand -> Reshape. ``mask``: None, 'bool' (4-D causal ∧ padding), 'additive'
    (4-D float), 'key_padding' (4-D built from an int64 attention_mask input) or 'rank2' ([Sq, Ktot]).
    """
    rng = np.random.default_rng(seed)
    sq, ktot = S, (T if cache else S)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 23}, name="one_attention")
    q = _value("query", ir.DataType.FLOAT, [B, HQ, sq, D])
    graph.inputs.append(q)
    feeds = {"query": rng.standard_normal((B, HQ, sq, D)).astype(np.float32)}
    kv = []
    for kind in names.KV_KINDS:
        new = _value(f"new_{kind}", ir.DataType.FLOAT, [B, hkv, sq, D])
        graph.inputs.append(new)
        feeds[new.name] = rng.standard_normal((B, hkv, sq, D)).astype(np.float32)
        source = new
        if cache:
            past = _value(names.past_name(0, kind), ir.DataType.FLOAT, [B, hkv, P, D])
            graph.inputs.append(past)
            feeds[past.name] = rng.standard_normal((B, hkv, P, D)).astype(np.float32)
            source = _node(
                graph,
                "Concat",
                [past, new],
                [B, hkv, ktot, D],
                axis=2,
                name=names.present_name(0, kind) if present_output else f"cat_{kind}",
            )
            if present_output:
                graph.outputs.append(source)
        if hkv != HQ:
            axes = _const(graph, f"axes_{kind}", np.array([unsqueeze_axis], np.int64))
            grouped_shape = [B, hkv, HQ // hkv, ktot, D]
            unsq_shape = [B, hkv, 1, ktot, D] if unsqueeze_axis == 2 else [B, 1, hkv, ktot, D]
            u = _node(graph, "Unsqueeze", [source, axes], unsq_shape)
            e = _node(
                graph,
                "Expand",
                [u, _const(graph, f"expand_{kind}", np.array(grouped_shape, np.int64))],
                grouped_shape if unsqueeze_axis == 2 else None,
            )
            source = _node(
                graph, "Reshape", [e, _const(graph, f"reshape_{kind}", np.array([B, HQ, ktot, D]))], [B, HQ, ktot, D]
            )
        kv.append(source)
    pad = np.ones((B, ktot), bool)
    pad[1, :2] = False  # row 1 is left-padded
    causal_ok = np.arange(ktot)[None, :] <= np.arange(ktot - sq, ktot)[:, None]  # bottom-right aligned
    ref_mask: np.ndarray | None = None
    mask_v = None
    causal = mask in ("bool", "key_padding")
    if mask == "bool":
        ref_mask = pad[:, None, None, :] & causal_ok[None, None]
        mask_v = _value("mask", ir.DataType.BOOL, [B, 1, sq, ktot])
        feeds["mask"] = ref_mask
    elif mask == "additive":
        ref_mask = rng.uniform(-2, 0, (B, 1, sq, ktot)).astype(np.float32)
        ref_mask[1, ..., :2] = -np.inf
        mask_v = _value("mask", ir.DataType.FLOAT, [B, 1, sq, ktot])
        feeds["mask"] = ref_mask
    elif mask == "rank2":
        mask_v = _value("mask", ir.DataType.BOOL, [sq, ktot])
        feeds["mask"] = causal_ok
    elif mask == "key_padding":  # what the exporter does: attention_mask -> bool, unsqueezed, and the causal mask
        am = _value(names.ATTENTION_MASK, ir.DataType.INT64, [B, ktot])
        graph.inputs.append(am)
        feeds[am.name] = pad.astype(np.int64)
        as_bool = _node(graph, "Cast", [am], [B, ktot], ir.DataType.BOOL, to=ir.DataType.BOOL)
        padding = _node(
            graph,
            "Unsqueeze",
            [as_bool, _const(graph, "axes_mask", np.array([1, 2], np.int64))],
            [B, 1, 1, ktot],
            ir.DataType.BOOL,
        )
        mask_v = _node(
            graph,
            "And",
            [padding, _const(graph, "causal_ok", causal_ok[None, None])],
            [B, 1, sq, ktot],
            ir.DataType.BOOL,
        )
        ref_mask = pad[:, None, None, :] & causal_ok[None, None]
        causal = False  # the reference gets the full 4-D mask; the op gets key padding + causal=1
    if mask_v is not None and mask_v.producer() is None:
        graph.inputs.append(mask_v)
    attn = ir.Node(
        "",
        "Attention",
        [q, kv[0], kv[1], mask_v],
        num_outputs=1,
        name="attention",
        attributes=ir.convenience.convert_attributes({"scale": D**-0.5, "is_causal": 0}),
        metadata_props={names.SCOPES_KEY: "['model.model.layers.0', 'model.model.layers.0.self_attn', 'sdpa']"},
    )
    graph.append(attn)
    y = attn.outputs[0]
    y.name, y.shape, y.dtype = "y", ir.Shape([B, HQ, sq, D]), ir.DataType.FLOAT
    graph.outputs.insert(0, y)
    return Graph(ir.Model(graph, ir_version=10), feeds, attn, causal, ref_mask, hkv)


def thresholds(seed: int = 0, *, layers: int = 1, hkv: int = 2) -> Thresholds:
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(layers, HQ, ROWS, generator=g) * 0.6 - 0.3  # keeps about half of N(0, 1) scores
    theta[0, 0, 0] = float("-inf")  # one dense (head, row): valid
    sdc = torch.rand(layers, HQ, ROWS, generator=g) * 0.5
    return Thresholds(theta, sdc, {"causal": True, "k": 4, "num_kv_heads": hkv})


def context(g: Graph, th: Thresholds, comp_mode: int = 0, plan: MaskPlan | None = None) -> RuleContext:
    return RuleContext.for_graph(g.model.graph, th, comp_mode=comp_mode, mask_plan=plan or MaskPlan())


def run(model: ir.Model, feeds: dict[str, np.ndarray], tmp_path: Path, outputs: list[str] | None = None):
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    ir.save(model, path)
    sess = runtime.session(path, device="cpu")
    wanted = {i.name for i in sess.get_inputs()}
    names_out = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names_out, sess.run(names_out, {k: v for k, v in feeds.items() if k in wanted})))


def reference(g: Graph, th: Thresholds, comp_mode: int = 0, *, causal: bool | None = None, softcap=None):
    f = {
        k: torch.from_numpy(np.ascontiguousarray(v)).double()
        for k, v in g.feeds.items()
        if k.startswith(("query", "new_", "past_"))
    }
    k, v = f["new_key"], f["new_value"]
    if names.past_name(0, "key") in f:
        k = torch.cat([f[names.past_name(0, "key")], k], dim=2)
        v = torch.cat([f[names.past_name(0, "value")], v], dim=2)
    mask = None if g.mask is None else torch.from_numpy(g.mask)
    mask = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    theta, sdc = th.layer(0)
    out, kept = toptheta_attention(
        f["query"],
        k,
        v,
        theta.double(),
        scale=D**-0.5,
        causal=g.causal if causal is None else causal,
        attn_mask=mask,
        sdc=sdc.double(),
        comp_mode=comp_mode,
        return_kept=True,
        softcap=softcap,
    )
    return out.numpy(), kept.numpy(), (f["query"], k, v, mask)


def only_op(model: ir.Model) -> ir.Node:
    ops = [n for n in model.graph if n.domain == names.DOMAIN]
    assert [n.op_type for n in ops] == [names.OP_TYPE]
    assert not [n for n in model.graph if n.op_type == "Attention"]
    return ops[0]


# -- one test per rule ---------------------------------------------------------------------------------


def test_cached_gqa_rule_reads_present_and_matches_reference(tmp_path):
    g = build(cache=True, hkv=2, mask="bool")
    th = thresholds(1)
    ctx = context(g, th, comp_mode=1)
    assert CachedGqaAttention.rule(ctx).apply_to_model(g.model) == 1
    op = only_op(g.model)
    assert [v.name for v in op.inputs[1:3]] == [names.present_name(0, "key"), names.present_name(0, "value")]
    assert op.attributes["num_kv_heads"].value == 2 and op.attributes["num_heads"].value == HQ
    assert op.inputs[3].name == names.theta_name(0) and op.inputs[7].name == names.sdc_name(0)
    assert not [n for n in g.model.graph if n.op_type in ("Expand", "Unsqueeze")]  # the expansion is dead
    m = ctx.matched[0]
    assert (m.form, m.gqa_peeled, m.mask, m.name) == ("CachedGqaAttention", True, "4d", "model.layers.0.self_attn")
    got = run(g.model, g.feeds, tmp_path)
    ref, _, _ = reference(g, th, comp_mode=1)
    np.testing.assert_allclose(got["y"], ref, atol=TOL)
    dense, _, _ = reference(g, Thresholds(torch.full((1, HQ, ROWS), float("-inf")), torch.zeros(1, HQ, ROWS)))
    assert np.abs(got["y"] - dense).max() > 1e-2  # θ really prunes


def test_gqa_rule_without_cache_with_key_padding_plan(tmp_path):
    g = build(cache=False, hkv=2, mask="key_padding")
    th = thresholds(2)
    am = next(v for v in g.model.graph.inputs if v.name == names.ATTENTION_MASK)
    ctx = context(g, th, plan=MaskPlan.key_padding(g.model.graph, am, causal=True))
    assert GqaAttention.rule(ctx).apply_to_model(g.model) == 1
    op = only_op(g.model)
    assert [v.name for v in op.inputs[1:3]] == ["new_key", "new_value"]
    assert op.inputs[4].name == names.MASK_NAME and op.attributes["causal"].value == 1
    assert not [n for n in g.model.graph if n.op_type == "And"]  # the 4-D mask subgraph is dead
    assert (ctx.matched[0].mask, ctx.matched[0].causal) == ("key_padding", 1)
    got = run(g.model, g.feeds, tmp_path)
    np.testing.assert_allclose(got["y"], reference(g, th)[0], atol=TOL)


def test_cached_mha_rule_additive_mask(tmp_path):
    g = build(cache=True, hkv=HQ, mask="additive")
    th = thresholds(3, hkv=HQ)
    ctx = context(g, th, comp_mode=2)
    assert CachedMhaAttention.rule(ctx).apply_to_model(g.model) == 1
    op = only_op(g.model)
    assert op.inputs[1].name == names.present_name(0, "key") and op.inputs[4].name == "mask"
    assert (ctx.matched[0].form, ctx.matched[0].gqa_peeled, ctx.matched[0].causal) == ("CachedMhaAttention", False, 0)
    got = run(g.model, g.feeds, tmp_path)
    np.testing.assert_allclose(got["y"], reference(g, th, comp_mode=2)[0], atol=TOL)


def test_mha_rule_without_mask(tmp_path):
    g = build(cache=False, hkv=HQ, mask=None)
    th = thresholds(4, hkv=HQ)
    ctx = context(g, th)
    assert MhaAttention.rule(ctx).apply_to_model(g.model) == 1
    op = only_op(g.model)
    assert len(op.inputs) == 8 and op.inputs[4] is None and op.attributes["causal"].value == 0
    assert ctx.matched[0].mask == "none"
    got = run(g.model, g.feeds, tmp_path)
    np.testing.assert_allclose(got["y"], reference(g, th)[0], atol=TOL)


# -- near misses ---------------------------------------------------------------------------------------


def test_gqa_rules_reject_unsqueeze_on_another_axis():
    g = build(cache=True, hkv=2, mask="bool", unsqueeze_axis=1)
    ctx = context(g, thresholds())
    rules = [CachedGqaAttention.rule(ctx), GqaAttention.rule(ctx)]
    assert sum(r.apply_to_model(g.model) for r in rules) == 0
    reasons = ctx.rejections[g.attention]
    assert len(reasons) == 2 and all("not on axis 2 (the query-group axis)" in r for r in reasons), reasons
    assert [n.op_type for n in g.model.graph].count("Attention") == 1  # untouched


def test_mha_rule_rejects_a_2d_mask():
    g = build(cache=False, hkv=HQ, mask="rank2")
    ctx = context(g, thresholds(hkv=HQ))
    assert MhaAttention.rule(ctx).apply_to_model(g.model) == 0
    assert "not a 4-D [B|1, H|1, Sq, Ktot] mask" in ctx.rejections[g.attention][0]


def test_cached_rule_rejects_a_concat_that_is_no_cache_and_the_mha_rule_takes_it(tmp_path):
    g = build(cache=True, hkv=HQ, mask="bool", present_output=False)
    th = thresholds(5, hkv=HQ)
    ctx = context(g, th)
    assert attention_rules(ctx).apply_to_model(g.model) == 1
    assert "is not a graph output (not a KV cache)" in ctx.rejections[g.attention][0]
    assert ctx.matched[0].form == "MhaAttention"
    np.testing.assert_allclose(run(g.model, g.feeds, tmp_path)["y"], reference(g, th)[0], atol=TOL)


def test_rules_carry_softcap(tmp_path):
    """Gemma 2's logit cap moves to the op's softcap attribute; the result is the capped reference's."""
    g = build(cache=True, hkv=2, mask="bool")
    g.attention.attributes["softcap"] = ir.AttrFloat32("softcap", 0.5)
    th = thresholds(6)
    ctx = context(g, th, comp_mode=1)
    assert attention_rules(ctx).apply_to_model(g.model) == 1
    assert only_op(g.model).attributes["softcap"].value == pytest.approx(0.5)
    got = run(g.model, g.feeds, tmp_path)
    capped, kept, _ = reference(g, th, comp_mode=1, softcap=0.5)
    np.testing.assert_allclose(got["y"], capped, atol=TOL)
    assert 0 < kept.sum() and np.abs(got["y"] - reference(g, th, comp_mode=1)[0]).max() > 1e-2


def test_rules_reject_a_negative_softcap():
    g = build(cache=False, hkv=HQ, mask=None)
    g.attention.attributes["softcap"] = ir.AttrFloat32("softcap", -3.0)
    ctx = context(g, thresholds(hkv=HQ))
    assert attention_rules(ctx).apply_to_model(g.model) == 0
    assert ctx.rejections[g.attention] == ["MhaAttention: its softcap -3.0 is neither 0 nor a finite positive cap"]


# -- NaN thresholds ------------------------------------------------------------------------------------


def test_nan_theta_in_thresholds_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    theta = torch.zeros(3, HQ, ROWS)
    theta[2, 1, 0] = float("nan")
    meta = {"format_version": 1, "num_layers": 3, "num_heads": HQ}
    save_file(
        {"theta": theta, "sdc": torch.zeros(3, HQ, ROWS)},
        str(tmp_path / TENSORS_FILE),
        metadata={"toptheta_meta": json.dumps(meta)},
    )
    with pytest.raises(TopThetaError) as ei:
        Thresholds.load(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "θ of layer 2 is NaN at head 1, row 0" in msg and "recalibrate" in msg, msg
    sdc = torch.zeros(3, HQ, ROWS)
    sdc[1, 0, 2] = float("nan")
    with pytest.raises(TopThetaError, match=r"ρ \(sdc\) of layer 1 is NaN"):
        Thresholds(torch.full((3, HQ, ROWS), float("-inf")), sdc, {})  # -inf θ is fine, NaN ρ is not


def test_rewrite_refuses_nan_theta_set_after_construction(tmp_path):
    g = build(cache=False, hkv=HQ, mask=None)
    src = tmp_path / "dense.onnx"
    ir.save(g.model, src)
    th = thresholds(hkv=HQ)
    th.theta[0, 3, 1] = float("nan")
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(TopThetaError) as ei:
        rewrite(src, th, out)
    msg = str(ei.value)
    assert "\n" not in msg and "θ of layer 0 is NaN at head 3, row 1" in msg and "-inf, not NaN" in msg, msg
    assert not out.parent.exists()


# -- variant passes ------------------------------------------------------------------------------------


@pytest.fixture
def rewritten():
    """A rewritten cached-GQA graph with its thresholds."""
    g = build(cache=True, hkv=2, mask="bool", seed=7)
    th = thresholds(7)
    attention_rules(context(g, th, comp_mode=1)).apply_to_model(g.model)
    return g, th


def test_expose_kept_and_io_passes(rewritten, tmp_path):
    g, th = rewritten
    ExposeKept()(g.model)
    ExposeAttentionIO()(g.model)
    got = run(g.model, g.feeds, tmp_path)
    ref, kept, (q, k, v, mask) = reference(g, th, comp_mode=1)
    assert got[names.kept_name(0)].dtype == np.int32
    np.testing.assert_array_equal(got[names.kept_name(0)], kept)
    assert 0 < kept.sum() < np.broadcast_to(g.mask, kept.shape + (T,)).sum()  # some pruned, some kept
    for slot, want in (("q", q), ("k", k), ("v", v), ("mask", mask), ("y", ref)):
        np.testing.assert_allclose(
            got[names.io_name(0, slot)], want.numpy() if hasattr(want, "numpy") else want, atol=TOL
        )


def test_set_thresholds_comp_mode_and_dense_twin_passes(rewritten, tmp_path):
    g, _ = rewritten
    other = thresholds(11)
    SetThresholds(other)(g.model)
    SetCompMode(2)(g.model)
    np.testing.assert_allclose(run(g.model, g.feeds, tmp_path)["y"], reference(g, other, comp_mode=2)[0], atol=TOL)
    DenseTwin()(g.model)
    q, k, v, mask = reference(g, other)[2]
    dense = dense_attention(q, k, v, scale=D**-0.5, attn_mask=mask).numpy()
    np.testing.assert_allclose(run(g.model, g.feeds, tmp_path)["y"], dense, atol=TOL)
    with pytest.raises(TopThetaError, match="theta_fill is NaN"):
        SetThresholds(theta_fill=float("nan"))


def test_replace_with_topk_pass(rewritten, tmp_path):
    g, th = rewritten
    topk = ReplaceWithTopK(3)
    topk(g.model)
    assert topk.replaced == [0]
    assert not [n for n in g.model.graph if n.domain == names.DOMAIN]
    assert names.theta_name(0) not in g.model.graph.initializers
    ExposeKept()(g.model)
    got = run(g.model, g.feeds, tmp_path)
    q, k, v, mask = reference(g, th)[2]
    ref = topk_attention(q, k, v, 3, scale=D**-0.5, attn_mask=mask).numpy()
    np.testing.assert_allclose(got["y"], ref, atol=TOL)
    valid = np.broadcast_to(g.mask, (B, HQ, S, T)).sum(-1)
    np.testing.assert_array_equal(got[names.kept_name(0)], np.minimum(valid, 3))
