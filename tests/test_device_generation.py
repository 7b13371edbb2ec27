"""Device-resident generation (topthetaexport.ort.device_generation) and the graphs it runs, on the CPU.

The same code path as on the GPU (IOBinding, one OrtValue per layer and kind bound as past and present, in-place
input updates; only CUDA graphs are off): greedy tokens equal OnnxModel.generate's for the concat and the shared
form, batch 2 with left padding. The dense GroupQueryAttention twin (onnx.dense_gqa.DenseGqa) of a shared-form
graph gives the logits of the Top-θ graph at θ = -inf (DenseTwin) over a prefill and decode steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import make_tokens, save_tiny_model
from test_export_rewrite import assert_one_line_error, thresholds_for

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.onnx import names
from topthetaexport.onnx.decoding import GreedyNextToken, LastTokenLogits, ThetaInput
from topthetaexport.onnx.dense_gqa import DenseGqa
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.variants import DenseTwin, ExposeKept
from topthetaexport.ort.device_generation import DeviceSession, generate, left_pad
from topthetaexport.ort.sessions import OnnxModel

STEPS = 6


@pytest.fixture(scope="module")
def graphs(tiny_models_dir, tmp_path_factory):
    """Tiny llama: dense export, Top-θ concat and shared rewrites (θ keeps about half), the shared graph's dense
    twin (θ = -inf) and its GroupQueryAttention graph."""
    import torch

    loaded = load_model(save_tiny_model("llama", tiny_models_dir))
    root = tmp_path_factory.mktemp("devgen")
    dense = export_onnx(loaded, root / "dense.onnx")
    g = torch.Generator().manual_seed(5)
    th = thresholds_for(loaded, torch.randn(loaded.num_layers, loaded.num_heads, 8, generator=g) * 0.3)
    rewrite(dense, th, root / "concat.onnx")
    rewrite(dense, th, root / "shared.onnx", kv_cache="shared")
    twin = ir.load(root / "shared.onnx")
    DenseTwin()(twin)
    ir.save(twin, root / "twin.onnx")
    gqa = ir.load(root / "shared.onnx")
    DenseGqa()(gqa)
    ir.save(gqa, root / "gqa.onnx")
    return {
        "dense": dense,
        "concat": root / "concat.onnx",
        "shared": root / "shared.onnx",
        "twin": root / "twin.onnx",
    } | {"gqa": root / "gqa.onnx"}


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    ids = make_tokens(2, 11, seed=4).numpy()
    return left_pad([list(ids[0]), list(ids[1, 4:])])  # row 1 left-padded by 4


@pytest.mark.parametrize("kind", ["concat", "shared", "dense"])
def test_greedy_tokens_equal_onnxmodel_left_padded_batch(graphs, kind):
    ids, mask = _prompts()
    ref = OnnxModel(graphs[kind]).generate(ids, STEPS, attention_mask=mask, max_length=ids.shape[1] + STEPS)
    ds = DeviceSession(graphs[kind], device="cpu")
    assert ds.form == ("shared" if kind == "shared" else "concat") and not ds.cuda_graph
    streamed = []
    res = ds.generator(2, ids.shape[1] + STEPS).generate(
        ids, STEPS, attention_mask=mask, on_token=lambda t, i: streamed.append((i, t.copy()))
    )
    np.testing.assert_array_equal(res.tokens, ref)
    assert [i for i, _ in streamed] == list(range(STEPS))
    np.testing.assert_array_equal(np.stack([t for _, t in streamed], 1), ref)
    assert res.steps == STEPS - 1 and res.prefill_ms > 0 and res.decode_tokens_per_s > 0
    assert "prefill" in res.summary() and "tokens/s" in res.summary()


def test_shared_buffers_are_written_in_place(graphs):
    """The cache OrtValues bound as past and present keep their addresses and hold the rows of every step."""
    ids, mask = _prompts()
    ds = DeviceSession(graphs["shared"], device="cpu")
    gen = ds.generator(2, 24)
    ptrs = [c.value.data_ptr() for c in gen.cache]
    gen.generate(ids, STEPS, attention_mask=mask)
    assert [c.value.data_ptr() for c in gen.cache] == ptrs
    assert gen.position == ids.shape[1] + STEPS - 1
    key0 = np.abs(gen.cache[0].read()).sum(-1)  # [B, Hkv, M]
    assert key0[0, :, : gen.position].min() > 0 and key0[1, :, 4 : gen.position].min() > 0  # every real row written
    assert key0[:, :, gen.position :].max() == 0  # nothing past them (the buffers start zeroed)


def test_one_call_generate_pads_ragged_prompts(graphs):
    ids, mask = _prompts()
    rows = [list(ids[0]), list(ids[1][mask[1] == 1])]
    ref = OnnxModel(graphs["concat"]).generate(ids, 4, attention_mask=mask)
    res = generate(graphs["concat"], rows, 4, device="cpu")
    np.testing.assert_array_equal(res.tokens, ref)
    single = generate(graphs["concat"], rows[0], 3, device="cpu")
    np.testing.assert_array_equal(single.tokens, ref[:1, :3])


def test_gqa_graph_equals_dense_twin_prefill_and_decode(graphs):
    """θ = -inf through TopThetaAttention and GroupQueryAttention on the same shared buffers: the same logits."""
    ids = make_tokens(2, 9, seed=7).numpy()
    twin, gqa = OnnxModel(graphs["twin"]), OnnxModel(graphs["gqa"])
    assert gqa.kv_cache == "shared"
    m = ir.load(graphs["gqa"])
    ops = [n.op_type for n in m.graph]
    assert ops.count("GroupQueryAttention") == 3 and names.OP_TYPE not in ops
    assert not [v for v in m.graph.initializers if v.startswith(names.THETA_PREFIX)]
    a, b = twin.run(ids, past=twin.new_cache(2, 16)), gqa.run(ids, past=gqa.new_cache(2, 16))
    for step in range(4):
        np.testing.assert_allclose(b.output, a.output, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(b.cache.valid()[0], a.cache.valid()[0], rtol=1e-5, atol=1e-5)
        nxt = a.output[:, -1].argmax(-1)[:, None]
        mask = np.ones((2, 9 + step + 1), np.int64)
        a, b = twin.run(nxt, mask, a.cache), gqa.run(nxt, mask, b.cache)
    # and the sparse graph differs from it (θ keeps about half), so the comparison can fail
    sparse = OnnxModel(graphs["shared"]).run(ids, past=OnnxModel(graphs["shared"]).new_cache(2, 16))
    assert np.abs(sparse.output - twin.run(ids, past=twin.new_cache(2, 16)).output).max() > 1e-3


def test_device_session_prepares_last_token_and_next_token(graphs, tmp_path):
    m = ir.load(graphs["shared"])
    LastTokenLogits()(m)
    GreedyNextToken()(m)
    assert not LastTokenLogits()(m).modified and not GreedyNextToken()(m).modified  # marked, run once
    ir.save(m, tmp_path / "prepared.onnx")
    ds = DeviceSession(tmp_path / "prepared.onnx", device="cpu", prepare=False)
    assert ds.signature.has_next_token and ds.signature.vocab == 128
    ids = make_tokens(2, 5, seed=1).numpy()
    gen = ds.generator(2, 8)
    out = gen.prefill(ids)
    full = OnnxModel(graphs["shared"]).run(ids, past=OnnxModel(graphs["shared"]).new_cache(2, 8))
    np.testing.assert_allclose(gen.logits.read()[:, 0], full.output[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.tokens, full.output[:, -1].argmax(-1))
    assert not list(tmp_path.glob(".device-*"))  # no variant file left beside the model


def test_theta_input_and_kept_outputs(graphs, tmp_path):
    """ThetaInput: θ set at run time equals θ baked in; with_kept exposes the op's counts (no CUDA graph)."""
    m = ir.load(graphs["shared"])
    ThetaInput()(m)
    assert names.THETA_INPUT in [v.name for v in m.graph.inputs]
    assert not [v for v in m.graph.initializers if v.startswith(names.THETA_PREFIX)]
    ExposeKept()(m)
    ir.save(m, tmp_path / "theta_in.onnx")
    ds = DeviceSession(tmp_path / "theta_in.onnx", device="cpu")
    assert set(ds.signature.extra_inputs) == {names.THETA_INPUT}
    with pytest.raises(TopThetaError, match="extra_inputs"):
        ds.generator(1, 8)
    ids = make_tokens(1, 6, seed=2).numpy()
    dense_ref = OnnxModel(graphs["twin"]).generate(ids, 4, max_length=12)
    gen = ds.generator(1, 12, extra_inputs={names.THETA_INPUT: np.full((4, 8), -np.inf, np.float32)})
    assert gen.graph_id is None
    kept: list = []
    res = gen.generate(ids, 4, on_step=lambda s: kept.append(s.extras))
    np.testing.assert_array_equal(res.tokens, dense_ref)
    assert kept[-1][names.kept_name(0)].numpy().min() > 0  # θ = -inf keeps every valid key
    gen.set_input(names.THETA_INPUT, np.full((4, 8), 1e9, np.float32))  # keeps nothing
    gen.generate(ids, 2, on_step=lambda s: kept.append(s.extras))
    counts = kept[-1][names.kept_name(0)].numpy()
    assert counts.shape == (1, 4, 1) and counts.max() == 0


def test_generator_errors_are_one_line(graphs):
    ds = DeviceSession(graphs["shared"], device="cpu")
    gen = ds.generator(1, 6)
    with pytest.raises(TopThetaError) as e:
        gen.generate(make_tokens(1, 5).numpy(), 4)
    assert_one_line_error(e, "max_length")
    with pytest.raises(TopThetaError) as e:
        gen.prefill(make_tokens(2, 3).numpy())
    assert_one_line_error(e, "input_ids")
    with pytest.raises(TopThetaError) as e:
        gen.decode(np.zeros(1, np.int64))
    assert_one_line_error(e, "prefill")
    with pytest.raises(TopThetaError) as e:
        DeviceSession(Path("/nonexistent/model.onnx"))
    assert_one_line_error(e, "does not exist")


def test_dense_gqa_refuses_concat_form(graphs):
    m = ir.load(graphs["concat"])
    with pytest.raises(TopThetaError) as e:
        DenseGqa()(m)
    assert_one_line_error(e, "ShareKvBuffer")
