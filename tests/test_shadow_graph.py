"""The shadow K pair on the graph (topthetaexport.onnx.kv_cache.AddShadowK, rewrite(..., shadow_k=True)) and in
device generation (ort.device_generation allocates and binds its buffers): a float16 tiny Qwen3 (head size 32) in
the shared-buffer form gets past_shadow.{i}.* inputs and present_shadow.{i}.* outputs on every layer, and greedy
generation with them gives the tokens and the K/V cache of the same graph without them, bit for bit, while the op
fills the shadow buffers with bench/toptheta_cuda.shadow_k of the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import make_tokens, save_tiny_model
from test_export_rewrite import assert_one_line_error, thresholds_for

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.onnx import names
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.kv_cache import AddShadowK
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.ort.device_generation import DeviceSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from toptheta_cuda import shadow_k  # noqa: E402

PROMPT, STEPS = 60, 12  # the decode steps complete block 0 (key 63)


@pytest.fixture(scope="module")
def graphs(tiny_models_dir, tmp_path_factory):
    loaded = load_model(save_tiny_model("qwen3", tiny_models_dir))
    root = tmp_path_factory.mktemp("shadow-graph")
    dense = export_onnx(loaded, root / "dense.onnx", dtype="float16")
    g = torch.Generator().manual_seed(6)
    th = thresholds_for(loaded, torch.randn(loaded.num_layers, loaded.num_heads, 8, generator=g) * 0.3)
    rewrite(dense, th, root / "shared.onnx", kv_cache="shared")
    report = rewrite(dense, th, root / "shadow.onnx", kv_cache="shared", shadow_k=True)
    assert report["shadow_k"]
    rewrite(dense, th, root / "concat.onnx")
    return dict(loaded=loaded, dense=dense, th=th) | {k: root / f"{k}.onnx" for k in ("shared", "shadow", "concat")}


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_pass_adds_the_pair_to_every_layer(graphs):
    loaded = graphs["loaded"]
    L, hkv, d = loaded.num_layers, loaded.num_kv_heads, loaded.head_dim
    m = onnx.load(str(graphs["shadow"]))
    onnx.checker.check_model(m, full_check=True)
    plain = onnx.load(str(graphs["shared"]))
    shadow_in = [names.past_shadow_name(i, k) for i in range(L) for k in names.SHADOW_KINDS]
    shadow_out = [names.present_shadow_name(i, k) for i in range(L) for k in names.SHADOW_KINDS]
    assert [i.name for i in m.graph.input] == [i.name for i in plain.graph.input] + shadow_in
    assert [o.name for o in m.graph.output] == [o.name for o in plain.graph.output] + shadow_out
    for vi in [*m.graph.input, *m.graph.output]:
        if "shadow" not in vi.name:
            continue
        codes = vi.name.endswith(".key")
        assert _dims(vi) == (["batch", hkv, "max_sequence", d // 2] if codes else ["batch", hkv, "shadow_blocks", 2, d])
        assert vi.type.tensor_type.elem_type == (onnx.TensorProto.UINT8 if codes else onnx.TensorProto.FLOAT16)
    ops = [n for n in m.graph.node if n.op_type == names.OP_TYPE]
    assert len(ops) == L
    for layer, node in enumerate(ops):
        assert list(node.input[9:11]) == [names.past_shadow_name(layer, k) for k in names.SHADOW_KINDS]
        assert list(node.output[4:6]) == [names.present_shadow_name(layer, k) for k in names.SHADOW_KINDS]
    assert {p.key: p.value for p in m.metadata_props}[names.SHADOW_META] == "1"
    model = ir.load(graphs["shadow"])
    assert not AddShadowK()(model).modified  # run again: nothing to do


def test_pass_refusals_are_one_line(graphs, tmp_path):
    with pytest.raises(TopThetaError) as e:
        AddShadowK()(ir.load(graphs["concat"]))
    assert_one_line_error(e, "shared-buffer KV cache", "--kv-cache shared")
    with pytest.raises(TopThetaError) as e:
        rewrite(graphs["dense"], graphs["th"], tmp_path / "x.onnx", shadow_k=True)
    assert_one_line_error(e, "--shadow-k", "--kv-cache shared")
    with pytest.raises(TopThetaError) as e:
        AddShadowK()(ir.load(graphs["dense"]))
    assert_one_line_error(e, "no TopThetaAttention node")


def test_generation_with_the_shadow_equals_without(graphs):
    """Greedy tokens and the whole K/V cache are those of the graph without the pair, bit for bit; the shadow
    buffers hold shadow_k of the K cache in the blocks complete at the end (block 0) and zeros elsewhere."""
    ids = make_tokens(2, PROMPT, seed=8).numpy()
    runs = {}
    for kind in ("shared", "shadow"):
        ds = DeviceSession(graphs[kind], device="cpu")
        gen = ds.generator(2, PROMPT + STEPS + 3)
        res = gen.generate(ids, STEPS)
        runs[kind] = (res.tokens, [c.read().copy() for c in gen.cache], gen)
    np.testing.assert_array_equal(runs["shadow"][0], runs["shared"][0])
    for a, b in zip(runs["shadow"][1], runs["shared"][1]):
        np.testing.assert_array_equal(a, b)
    gen = runs["shadow"][2]
    assert len(gen.shadow) == 2 * graphs["loaded"].num_layers
    n = gen.position  # keys in the cache: PROMPT + STEPS - 1
    assert n // 64 == 1
    for i, name in enumerate(gen.sig.shadow_past):
        layer = int(names.PAST_SHADOW_RE.match(name).group(1))
        k = runs["shadow"][1][gen.sig.past.index(names.past_name(layer, "key"))]
        codes, rng = shadow_k(torch.from_numpy(k), valid=n)
        got = gen.shadow[i].read()
        want = (codes if name.endswith(".key") else rng).numpy()
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # zeros past block 0 too
        assert got.any()


def test_rewrite_cli_shadow_k(graphs, tmp_path, capsys):
    """--shadow-k on rewrite (with --kv-cache shared) gives the pass's graph; off by default."""
    try:
        from topthetaexport.cli.main import main as cli_main
    except ImportError:  # running from a source checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from cli.main import main as cli_main

    graphs["th"].save(tmp_path / "th")
    base = ["rewrite", str(graphs["dense"]), "--thresholds", str(tmp_path / "th"), "--kv-cache", "shared", "-o"]
    assert cli_main([*base, str(tmp_path / "s.onnx"), "--shadow-k"]) == 0
    assert [i.name for i in onnx.load(str(tmp_path / "s.onnx")).graph.input][-1] == "past_shadow.2.range"
    assert cli_main([*base, str(tmp_path / "p.onnx")]) == 0
    assert not any("shadow" in i.name for i in onnx.load(str(tmp_path / "p.onnx")).graph.input)
    capsys.readouterr()
