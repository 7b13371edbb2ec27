"""The shared-buffer KV-cache form (topthetaexport.onnx.kv_cache.ShareKvBuffer, OnnxModel's KvCache).

Graph level: the pass on real exports of tiny models (llama and qwen2: CachedGqaAttention, gpt2:
CachedMhaAttention), its signature and its refusals. End to end on the CPU: the shared form, run through
onnxruntime IOBinding with one buffer per layer and kind bound as past and present, gives the logits and tokens
of the concat form, and never reallocates its buffers.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_tokens, save_tiny_model
from test_export_rewrite import assert_one_line_error, random_thresholds

from topthetaexport._errors import TopThetaError
from topthetaexport.deploy import write_genai_graph
from topthetaexport.models import load_model
from topthetaexport.onnx import names
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.kv_cache import GenaiSharedInputs, ShareKvBuffer
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.summary import format_summary, graph_kv_cache, summarize
from topthetaexport.onnx.variants import ReplaceWithTopK
from topthetaexport.options import resolve_kv_cache
from topthetaexport.ort.sessions import KvCache, OnnxModel

RTOL, ATOL = 1e-5, 1e-5
STEPS = 8


class Rewritten:
    def __init__(self, loaded, dense: Path, concat: Path, shared: Path, thresholds):
        self.loaded, self.dense, self.concat, self.shared, self.thresholds = loaded, dense, concat, shared, thresholds


@pytest.fixture(scope="module")
def rewritten(tiny_models_dir, tmp_path_factory):
    """kind -> Rewritten: the tiny model's dense export and its concat- and shared-form rewrites (one θ)."""
    cache: dict[str, Rewritten] = {}

    def get(kind: str) -> Rewritten:
        if kind not in cache:
            loaded = load_model(save_tiny_model(kind, tiny_models_dir))
            root = tmp_path_factory.mktemp(f"kv-{kind}")
            dense = export_onnx(loaded, root / "dense.onnx")
            th = random_thresholds(loaded, seed=3)
            rewrite(dense, th, root / "concat.onnx", comp_mode=1)
            report = rewrite(dense, th, root / "shared.onnx", comp_mode=1, kv_cache="shared")
            assert report["kv_cache"] == "shared"
            cache[kind] = Rewritten(loaded, dense, root / "concat.onnx", root / "shared.onnx", th)
        return cache[kind]

    return get


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# -- the graph ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("llama", "qwen2", "gpt2"))
def test_shared_form_signature(rewritten, kind):
    rw = rewritten(kind)
    loaded = rw.loaded
    L, hkv, d = loaded.num_layers, loaded.num_kv_heads, loaded.head_dim
    m = onnx.load(str(rw.shared))
    onnx.checker.check_model(m, full_check=True)
    kv = [names.past_name(i, kind) for i in range(L) for kind in names.KV_KINDS]
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "past_sequence_length", *kv]
    inputs = {i.name: i for i in m.graph.input}
    assert _dims(inputs["attention_mask"]) == ["batch", "max_sequence"]
    assert inputs["attention_mask"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(inputs["past_sequence_length"]) == ["batch"]
    assert inputs["past_sequence_length"].type.tensor_type.elem_type == onnx.TensorProto.INT32
    for name in kv:
        assert _dims(inputs[name]) == ["batch", hkv, "max_sequence", d]
    presents = [names.present_name(i, kind) for i in range(L) for kind in names.KV_KINDS]
    assert [o.name for o in m.graph.output] == ["logits", *presents]
    for o in m.graph.output[1:]:
        assert _dims(o) == ["batch", hkv, "max_sequence", d]
        assert o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    ops = [n for n in m.graph.node if n.op_type == names.OP_TYPE]
    assert len(ops) == L
    for layer, node in enumerate(ops):
        assert node.input[3] == names.theta_name(layer)
        assert list(node.input[5:9]) == [
            names.past_name(layer, "key"),
            names.past_name(layer, "value"),
            names.sdc_name(layer),
            "past_sequence_length",
        ]
        assert not node.input[1].startswith(("present.", "past_key_values."))  # the new rows of this call
        assert list(node.output[1:3]) == [names.present_name(layer, "key"), names.present_name(layer, "value")]
        assert node.input[4] == names.MASK_NAME
    # no cache Concat is left; only the batch/head Shape of a past input may still read one
    readers = [n for n in m.graph.node if set(n.input) & set(kv)]
    assert all(n.op_type == names.OP_TYPE or n.op_type == "Shape" for n in readers), [n.op_type for n in readers]
    for n in readers:
        if n.op_type == "Shape":
            attrs = {a.name: a.i for a in n.attribute}
            assert not attrs.get("start", 0) <= 2 < attrs.get("end", 4), n.name
    concat = onnx.load(str(rw.concat))
    concats = [n.op_type for n in concat.graph.node].count("Concat")
    assert [n.op_type for n in m.graph.node].count("Concat") == concats - 2 * L
    # the positions' offset: max(past_sequence_length), int64 [1], where Shape(past_key_values.0.key)[2] was
    reduce = [n for n in m.graph.node if n.op_type == "ReduceMax" and n.input[0] == "past_sequence_length"]
    assert len(reduce) == 1
    cast = [n for n in m.graph.node if n.op_type == "Cast" and n.input[0] == reduce[0].output[0]]
    assert len(cast) == 1 and cast[0].attribute[0].i == onnx.TensorProto.INT64
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["toptheta.kv_cache"] == "shared" and meta["toptheta.comp_mode"] == "1"
    assert {p.key: p.value for p in concat.metadata_props}["toptheta.kv_cache"] == "concat"
    assert graph_kv_cache(rw.shared) == "shared" and graph_kv_cache(rw.concat) == "concat"
    assert graph_kv_cache(rw.dense) == "concat"  # the dense export is in the concat form too
    s = summarize(rw.shared)
    assert s["kv_cache"] == "shared" and "KV cache: shared" in format_summary(s)
    assert "KV cache: concat" in format_summary(summarize(rw.concat))


def test_pass_on_a_loaded_model_equals_the_rewrite_option(rewritten, tmp_path):
    rw = rewritten("llama")
    model = ir.load(rw.concat)
    assert ShareKvBuffer()(model).modified
    ir.save(model, tmp_path / "m.onnx")
    a, b = onnx.load(str(tmp_path / "m.onnx")), onnx.load(str(rw.shared))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in b.graph.node
    ]
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]


# -- refusals ------------------------------------------------------------------------------------------------


def test_pass_refuses_what_it_cannot_share(rewritten, tmp_path):
    rw = rewritten("llama")
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(ir.load(rw.shared))
    assert_one_line_error(ei, "already has the shared-buffer KV cache")
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(ir.load(rw.dense))
    assert_one_line_error(ei, "no TopThetaAttention node", "rewrite")
    topk = ir.load(rw.concat)
    ReplaceWithTopK(2, dense_layers=[0])(topk)
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(topk)
    assert_one_line_error(ei, "present.1.key is read by node 'toptheta/topk.1/", "not a top-k variant", "concat")
    with pytest.raises(TopThetaError) as ei:
        ReplaceWithTopK(2)(ir.load(rw.shared))
    assert_one_line_error(ei, "layer 0", "needs the concat-form KV cache", "--kv-cache concat")


def _with_extra_reader(path: Path, op: str, **attrs) -> ir.Model:
    """The concat-form model with one more node reading past_key_values.1.key, exposed as a graph output."""
    model = ir.load(path)
    past = next(v for v in model.graph.inputs if v.name == names.past_name(1, "key"))
    node = ir.Node("", op, [past], attributes=ir.convenience.convert_attributes(attrs), num_outputs=1, name="extra")
    node.outputs[0].name = "extra_out"
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    return model


@pytest.mark.parametrize(
    "op,attrs,allowed",
    [
        ("ReduceSum", {}, False),  # reads the cache's values
        ("Shape", {}, False),  # the whole shape: its length too
        ("Shape", {"start": 2}, False),
        ("Shape", {"start": 0, "end": 1}, True),  # the batch size: the buffer has the same
        ("Shape", {"start": -1}, True),  # the head size
    ],
)
def test_pass_refuses_other_readers_of_the_cache(rewritten, op, attrs, allowed):
    model = _with_extra_reader(rewritten("gpt2").concat, op, **attrs)
    if allowed:
        ShareKvBuffer()(model)
        extra = next(n for n in model.graph if n.name == "extra")
        assert extra.inputs[0].name == names.past_name(1, "key")
        return
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(model)
    assert_one_line_error(ei, f"node 'extra' ({op}) reads past_key_values.1.key", "--kv-cache concat")


@pytest.mark.parametrize("attrs,allowed", [({}, False), ({"start": 1}, False), ({"end": 1}, True)])
def test_pass_refuses_other_readers_of_the_mask(rewritten, attrs, allowed):
    """Shape(attention_mask) is its length, which becomes the buffer's, except Shape(...)[0:1], the batch size."""
    model = ir.load(rewritten("gpt2").concat)
    am = next(v for v in model.graph.inputs if v.name == names.ATTENTION_MASK)
    node = ir.Node("", "Shape", [am], attributes=ir.convenience.convert_attributes(attrs), num_outputs=1, name="m")
    node.outputs[0].name = "mask_len_out"
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    if allowed:
        assert ShareKvBuffer()(model).modified and node.inputs[0] is am
        return
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(model)
    assert_one_line_error(ei, "node 'm' (Shape) reads attention_mask", "spans the whole buffer")


def test_rewrite_refuses_shared_without_cache_or_key_padding_mask(rewritten, tmp_path):
    rw = rewritten("llama")
    with pytest.raises(TopThetaError) as ei:
        rewrite(rw.dense, rw.thresholds, tmp_path / "m.onnx", kv_cache="ring")
    assert_one_line_error(ei, "unknown KV-cache form 'ring'", "concat or shared")
    th = random_thresholds(rw.loaded, seed=3)
    th.meta["sliding_window"] = 4096  # the rewrite keeps the 4-D mask, which spans past + new only
    with pytest.raises(TopThetaError) as ei:
        rewrite(rw.dense, th, tmp_path / "m.onnx", kv_cache="shared")
    assert_one_line_error(ei, "key-padding mask", "sliding window", "--kv-cache concat")
    no_cache = export_onnx(rw.loaded, tmp_path / "nocache" / "dense.onnx", with_cache=False)
    with pytest.raises(TopThetaError) as ei:
        rewrite(no_cache, rw.thresholds, tmp_path / "m.onnx", kv_cache="shared")
    assert_one_line_error(ei, "has no KV cache", "kv_cache='concat'")
    rewrite(no_cache, rw.thresholds, tmp_path / "plain.onnx")
    with pytest.raises(TopThetaError) as ei:
        ShareKvBuffer()(ir.load(tmp_path / "plain.onnx"))
    assert_one_line_error(ei, "no KV cache", "no past_key_values")
    assert graph_kv_cache(tmp_path / "plain.onnx") is None
    assert "toptheta.kv_cache" not in {p.key for p in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nocache", "plain.onnx"]  # nothing half-written


def test_cli_rewrite_and_inspect_name_the_form(rewritten, tmp_path, capsys):
    try:  # installed layout: the CLI lives in topthetaexport.cli
        from topthetaexport.cli.main import main as cli_main
    except ImportError:  # running from a source checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from cli.main import main as cli_main

    rw = rewritten("gpt2")
    rw.thresholds.save(tmp_path / "th")
    out = tmp_path / "m.onnx"
    args = ["rewrite", rw.dense, "--thresholds", tmp_path / "th", "-o", out, "--kv-cache", "shared"]
    assert cli_main([str(a) for a in args]) == 0
    assert "(shared KV cache); wrote" in capsys.readouterr().out
    assert graph_kv_cache(out) == "shared"
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "KV cache: shared" in text and "past_sequence_length: int32 [batch]" in text
    assert "past_key_values.{0..2}.key: float [batch, 4, max_sequence, 16]" in text
    assert cli_main(["rewrite", str(rw.dense), "--thresholds", str(tmp_path / "th"), "-o", str(out)]) == 0
    assert "(concat KV cache)" in capsys.readouterr().out and graph_kv_cache(out) == "concat"  # CPU: auto = concat


def test_resolve_kv_cache():
    assert resolve_kv_cache("auto", "cpu", cuda=False) == "concat"
    assert resolve_kv_cache("auto", "auto", cuda=True) == "shared"
    assert resolve_kv_cache("auto", "cuda", cuda=True, has_cache=False) == "concat"
    assert resolve_kv_cache("auto", "cuda", cuda=True, sliding_window=True) == "concat"  # Gemma, Mistral, Phi-3
    assert resolve_kv_cache("shared", "cpu", cuda=False) == "shared"
    assert resolve_kv_cache("concat", "cuda", cuda=True) == "concat"
    with pytest.raises(TopThetaError, match="--kv-cache shared needs a decoder exported with its KV cache"):
        resolve_kv_cache("shared", "cpu", cuda=False, has_cache=False)
    with pytest.raises(TopThetaError, match=r"unknown KV-cache form 'ring' \(--kv-cache\)"):
        resolve_kv_cache("ring", "cpu", cuda=False)


# -- end to end in onnxruntime (CPU) ---------------------------------------------------------------------


def _padded(batch: int = 2, seq: int = 8, seed: int = 0):
    ids = make_tokens(batch, seq, seed=seed).numpy()
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0  # row 1 is left-padded
    return ids, mask


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_shared_form_decodes_like_the_concat_form_in_place(rewritten, kind):
    """Prefill + 8 greedy steps, batch 2 with left padding: the same logits, tokens and cache contents as the
    concat form; the buffers are the same memory throughout (bound as past and present, written in place)."""
    rw = rewritten(kind)
    concat = OnnxModel(rw.concat, threads=1)
    shared = OnnxModel(rw.shared, threads=1, max_length=32)
    assert (concat.kv_cache, shared.kv_cache) == ("concat", "shared")
    ids, mask = _padded()
    a, b = concat.run(ids, mask), shared.run(ids, mask)
    cache = b.cache
    assert isinstance(cache, KvCache) and cache.capacity == 32 and cache.batch == 2
    ptrs = cache.data_ptrs()
    assert ptrs == [int(x.ctypes.data) for x in cache.arrays]  # the OrtValues wrap the numpy buffers
    tokens_a, tokens_b = [], []
    for step in range(STEPS + 1):
        np.testing.assert_allclose(b.output, a.output, rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        assert cache.lengths.tolist() == [8 + step] * 2
        assert cache.mask[:, : 8 + step].tolist() == mask.tolist() and not cache.mask[:, 8 + step :].any()
        for got, want in zip(b.present, a.present):  # the op wrote this step's rows into our own memory
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert not any(arr[:, :, 8 + step :].any() for arr in cache.arrays)  # rows past the valid ones untouched
        if step == STEPS:
            break
        nxt_a = a.output[:, -1].argmax(-1)[:, None].astype(np.int64)
        nxt_b = b.output[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens_a.append(nxt_a)
        tokens_b.append(nxt_b)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        a = concat.run(nxt_a, mask, a.cache)
        b = shared.run(nxt_b, None, b.cache)  # None: the cache's own mask, plus this call's token
        assert b.cache is cache and cache.data_ptrs() == ptrs  # no step reallocates the buffers
    np.testing.assert_array_equal(np.concatenate(tokens_b, 1), np.concatenate(tokens_a, 1))


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_generate_is_the_same_in_both_forms(rewritten, kind):
    rw = rewritten(kind)
    ids, mask = _padded(seed=5)
    concat = OnnxModel(rw.concat, threads=1)
    shared = OnnxModel(rw.shared, threads=1)
    caches = []
    want = concat.generate(ids, STEPS, attention_mask=mask)
    got = shared.generate(ids, STEPS, attention_mask=mask, on_step=lambda s: caches.append(s.cache))
    np.testing.assert_array_equal(got, want)
    assert want.shape == (2, STEPS)
    assert len({id(c) for c in caches}) == 1 and caches[0].capacity == 8 + STEPS  # default: prompt + new tokens
    assert caches[0].lengths.tolist() == [8 + STEPS - 1] * 2  # the last token is never fed back
    with pytest.raises(TopThetaError) as ei:
        shared.generate(ids, STEPS, attention_mask=mask, max_length=12)
    assert_one_line_error(ei, "max_length 12 is too small", "max_length >= 15")


def test_shared_cache_errors_and_past_arrays(rewritten):
    rw = rewritten("llama")
    ids, mask = _padded(seq=6)
    concat, shared = OnnxModel(rw.concat, threads=1), OnnxModel(rw.shared, threads=1)
    full = shared.run(ids, mask)  # default capacity: this call's length
    assert full.cache.capacity == 6
    with pytest.raises(TopThetaError) as ei:
        shared.run(ids[:, :1], None, full.cache)
    assert_one_line_error(ei, "the KV cache is full", "6 tokens + 1 new ones exceed its max_length 6", "max_length=N")
    with pytest.raises(TopThetaError) as ei:
        shared.run(ids, mask[:, :4])
    assert_one_line_error(ei, "attention_mask has shape [2, 4]", "[2, 6]")
    with pytest.raises(TopThetaError) as ei:
        shared.run(ids[:1], None, shared.new_cache(2, 8))
    assert_one_line_error(ei, "holds 2 rows but input_ids has 1")
    with pytest.raises(TopThetaError) as ei:
        concat.run(ids, mask, shared.new_cache(2, 8))
    assert_one_line_error(ei, "concat-form KV cache", "not a KvCache")
    with pytest.raises(TopThetaError) as ei:
        concat.new_cache(2, 8)
    assert_one_line_error(ei, "no shared-buffer KV cache", "--kv-cache shared")
    with pytest.raises(TopThetaError) as ei:
        OnnxModel(rw.shared, max_length=0)
    assert_one_line_error(ei, "max_length must be an integer >= 1")
    # concat-style past arrays are copied into new buffers: the same step as the concat form's
    a = concat.run(ids, mask)
    nxt = make_tokens(2, 2, seed=9).numpy()
    mask2 = np.concatenate([mask, np.ones((2, 2), np.int64)], axis=1)
    want = concat.run(nxt, mask2, a.present)
    got = shared.run(nxt, mask2, a.present)
    np.testing.assert_allclose(got.output, want.output, rtol=RTOL, atol=ATOL)
    assert got.cache.capacity == 8 and got.cache.lengths.tolist() == [8, 8]
    # reset: the same buffers serve a new prefill, whose stale rows past the new length are never read
    cache, ptrs = got.cache, got.cache.data_ptrs()
    cache.reset()
    again = shared.run(ids, mask, cache)
    np.testing.assert_allclose(again.output, a.output, rtol=RTOL, atol=ATOL)
    assert cache.data_ptrs() == ptrs and cache.lengths.tolist() == [6, 6]


def test_exposed_kept_and_attention_io_match_the_concat_form(rewritten):
    """ExposeKept and ExposeAttentionIO on the shared form: the kept counts, and K/V/mask cut to the valid rows,
    equal the concat form's at a prefill and at a decode step."""
    rw = rewritten("llama")
    concat = OnnxModel(rw.concat, threads=1, with_kept=True, expose_io=True)
    shared = OnnxModel(rw.shared, threads=1, with_kept=True, expose_io=True, max_length=16)
    ids, mask = _padded(seq=7, seed=2)
    a, b = concat.run(ids, mask), shared.run(ids, mask)
    for _ in range(2):
        assert sorted(b.io) == sorted(a.io) and b.kept.keys() == a.kept.keys()
        for layer in a.kept:
            np.testing.assert_array_equal(b.kept[layer], a.kept[layer])
        for name, want in a.io.items():
            assert b.io[name].shape == want.shape, name
            np.testing.assert_allclose(b.io[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
        nxt = a.output[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        a, b = concat.run(nxt, mask, a.cache), shared.run(nxt, mask, b.cache)


@pytest.mark.slow  # two validations of a tiny model
def test_validate_a_shared_graph_gives_the_concat_numbers(rewritten, tmp_path, tiny_llama):
    from topthetaexport.eval.validation import validate
    from topthetaexport.pipeline import export
    from topthetaexport.torch.calibration import calibrate

    th = calibrate(str(tiny_llama), make_tokens(2, 40), k=5, seq_len=40, num_samples=2, dense_layers=1)
    export(str(tiny_llama), th, tmp_path / "concat")
    export(str(tiny_llama), th, tmp_path / "shared", kv_cache="shared")
    assert graph_kv_cache(tmp_path / "shared" / "model.onnx") == "shared"
    data = make_tokens(2, 40, seed=4)
    reports = {
        form: validate(tmp_path / form, model=str(tiny_llama), data=data, num_windows=2, decode_steps=6, threads=1)
        for form in ("concat", "shared")
    }
    a, b = reports["concat"], reports["shared"]
    assert (a["kv_cache"], b["kv_cache"]) == ("concat", "shared")
    assert b["parity"]["pass"] and b["parity"]["pinned_rows_differing_from_ort"] == 0
    assert b["attention_elements"] == a["attention_elements"]
    for key in ("v_rows_kept_per_step", "v_rows_dense_per_step", "v_rows_read_kv_group_union_per_step"):
        assert b["decode"][key] == pytest.approx(a["decode"][key]), key
    assert b["decode"]["max_abs_diff_decode_vs_prefill"] <= 1e-4
    assert b["perplexity"]["toptheta_onnx"] == pytest.approx(a["perplexity"]["toptheta_onnx"], rel=1e-6)


def test_smollm2_shared_form_generates_like_the_concat_form(smollm2, tmp_path):
    """The real SmolLM2-135M (30 layers, GQA 9/3 heads), calibrated thresholds: a left-padded batch of two prompts
    decodes to the same tokens and logits in both KV-cache forms."""
    from topthetaexport.torch.calibration import calibrate

    th = calibrate(smollm2, "builtin:pydoc", k=16, seq_len=64, num_samples=2, dense_layers=2)
    dense = export_onnx(smollm2, tmp_path / "dense.onnx")
    rewrite(dense, th, tmp_path / "concat.onnx")
    rewrite(dense, th, tmp_path / "shared.onnx", kv_cache="shared")
    tok = smollm2.tokenizer
    rows = [tok(t)["input_ids"] for t in ("def fibonacci(n):", "The quick brown fox jumps over the")]
    width = max(len(r) for r in rows)
    ids = np.full((2, width), tok.eos_token_id or 0, np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, r in enumerate(rows):  # left padding
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    concat, shared = OnnxModel(tmp_path / "concat.onnx"), OnnxModel(tmp_path / "shared.onnx")
    logits: dict[str, list[np.ndarray]] = {"concat": [], "shared": []}
    got = {
        form: om.generate(ids, STEPS, attention_mask=mask, on_step=lambda s, form=form: logits[form].append(s.output))
        for form, om in (("concat", concat), ("shared", shared))
    }
    np.testing.assert_array_equal(got["shared"], got["concat"])
    assert len(logits["shared"]) == STEPS
    for a, b in zip(logits["concat"], logits["shared"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


# -- onnxruntime-genai's inputs (GenaiSharedInputs) ----------------------------------------------------------


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_genai_inputs_decode_like_the_concat_form(rewritten, kind, tmp_path):
    """The shared form with the inputs onnxruntime-genai feeds (the mask of the tokens so far, no past lengths),
    its buffers bound as past and present as genai binds them: the concat form's logits at every step, batch 2 with
    left padding; the genai graph reads the weights of model.onnx (external data, written once)."""
    import onnxruntime as ort

    from topthetaexport import session_options

    rw = rewritten(kind)
    shutil.copy(rw.shared, tmp_path / "model.onnx")
    genai = write_genai_graph(tmp_path / "model.onnx")
    assert genai == tmp_path / names.GENAI_MODEL and (tmp_path / "model.onnx.data").is_file()
    proto = onnx.load(str(genai), load_external_data=False)
    inputs = {i.name: i for i in proto.graph.input}
    assert names.PAST_SEQUENCE_LENGTH not in inputs
    assert _dims(inputs["attention_mask"]) == ["batch", "total_sequence_length"]
    assert {p.key: p.value for p in proto.metadata_props}[names.GENAI_INPUTS_META] == "1"
    assert {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}

    loaded = rw.loaded
    capacity = 8 + STEPS
    buffers = [
        np.zeros((2, loaded.num_kv_heads, capacity, loaded.head_dim), np.float32) for _ in range(2 * loaded.num_layers)
    ]
    sess = ort.InferenceSession(str(genai), sess_options=session_options(1), providers=["CPUExecutionProvider"])
    concat = OnnxModel(rw.concat, threads=1)
    ids, mask = _padded()
    a = concat.run(ids, mask)
    for step in range(STEPS + 1):
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_output("logits")  # first: copy_outputs_to_cpu keeps the binding order
        for i, buf in enumerate(buffers):
            layer, kind_ = divmod(i, 2)
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(names.past_name(layer, names.KV_KINDS[kind_]), value)
            io.bind_ortvalue_output(names.present_name(layer, names.KV_KINDS[kind_]), value)
        sess.run_with_iobinding(io)
        logits = io.copy_outputs_to_cpu()[0]
        np.testing.assert_allclose(logits, a.output, rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        if step == STEPS:
            break
        ids = a.output[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        a = concat.run(ids, mask, a.cache)
    assert not any(buf[:, :, 8 + STEPS :].any() for buf in buffers)  # the op wrote the valid rows only


def test_genai_inputs_refuse_the_concat_form_and_run_once(rewritten):
    rw = rewritten("llama")
    with pytest.raises(TopThetaError) as ei:
        GenaiSharedInputs()(ir.load(str(rw.concat)))
    assert_one_line_error(ei, "shared-buffer KV-cache form", "--kv-cache shared")
    model = ir.load(str(rw.shared))
    assert GenaiSharedInputs()(model).modified
    assert not GenaiSharedInputs()(model).modified  # already in genai's form: nothing to do
