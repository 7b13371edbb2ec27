"""The foreign attention forms (topthetaexport.onnx.foreign_rules) on graphs made by other exporters.

The fixtures under tests/fixtures/foreign/ are real exports of one tiny random-weight LLaMA (make_fixtures.sh
there says how they were made); the tests rebuild the same PyTorch model from its config and seed, calibrate
thresholds on it, rewrite the foreign graph and compare onnxruntime with the PyTorch Top-θ reference.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from test_cli_subprocess import CLI  # the installed entry point, else this checkout's CLI

from topthetaexport.onnx import names
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.summary import summarize
from topthetaexport.ort import library as runtime
from topthetaexport.torch.attention import attention_mode

FIXTURES = Path(__file__).parent / "fixtures" / "foreign"
SEED = 0


def tiny_llama_config():
    """GQA (4 query heads on 2 kv heads), 2 layers, hidden 64: small enough for sub-MB fixtures."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,  # not the vocabulary size: the genai builder takes any Linear of that width for lm_head
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )


def tiny_llama():
    """The fixtures' PyTorch model: ``tiny_llama_config`` with weights drawn from ``SEED``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(SEED)
    path = FIXTURES / "config.json"
    cfg = LlamaConfig(**json.loads(path.read_text())) if path.is_file() else tiny_llama_config()
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (the genai model builder needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# -- shared fixtures and helpers ------------------------------------------------------------------------------

TOL = 1e-4
CALIB_ROWS = 16
OPTIMUM = ("optimum-opset18", "optimum-opset23", "optimum-eager-opset18")


@pytest.fixture(scope="module")
def loaded():
    from topthetaexport.models import load_model

    return load_model(tiny_llama())


@pytest.fixture(scope="module")
def calibrated(loaded):
    """θ / ρ calibrated on the tiny model (k = 4 of up to 16 keys, every layer sparse)."""
    from topthetaexport.torch.calibration import calibrate

    tokens = torch.randint(3, 128, (4, CALIB_ROWS), generator=torch.Generator().manual_seed(1))
    return calibrate(loaded, tokens, k=4, seq_len=CALIB_ROWS, num_samples=4, dense_layers=0, device="cpu")


def session(path):
    return runtime.session(path, device="cpu")


def tokens(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 128, (batch, seq))


def reference(loaded, th, comp_mode: int = 0):
    """The PyTorch Top-θ reference of the tiny model (attention through topthetaexport.torch.reference)."""

    def run(**kwargs):
        with torch.no_grad(), attention_mode(loaded.model, "toptheta", thresholds=th, comp_mode=comp_mode):
            tensors = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
            return loaded.model(**tensors, use_cache=True)

    return run


def outputs(sess, feed) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def as_past(outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, 2, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past_key")}


def io_names(path: Path) -> tuple[list, list]:
    """The graph's inputs and outputs: name, element type and dimensions (symbolic names included)."""
    model = onnx.load(str(path), load_external_data=False)

    def sig(values) -> list:
        return [
            (v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    return sig(model.graph.input), sig(model.graph.output)


# -- the fixtures are what they claim -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "weight"),
    [(f, "model.embed_tokens.weight") for f in OPTIMUM] + [("genai-cpu", "model.embed_tokens.weight")],
)
def test_fixture_holds_the_seeded_model(loaded, folder, weight):
    """The fixture's weights are the seeded PyTorch model's (the parity tests below rely on it)."""
    model = onnx.load(str(FIXTURES / folder / "model.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    embed = init.get(weight)
    if embed is None:  # torch's exporter may name the embedding by its Gather
        gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in init)
        embed = init[gather.input[0]]
    np.testing.assert_array_equal(embed, loaded.model.model.embed_tokens.weight.detach().numpy())
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if folder.startswith("optimum"):
        assert ("", "Softmax") in ops and not any(t == "Attention" for _, t in ops)
        assert model.opset_import[0].version == int(folder[-2:])
        assert any(n.op_type == "IsNaN" for n in model.graph.node) == ("eager" not in folder)  # SDPA vs eager
    else:
        assert ("com.microsoft", "GroupQueryAttention") in ops


# -- (a) optimum's decomposed attention ------------------------------------------------------------------------


@pytest.mark.parametrize("comp_mode", (0, 1))
@pytest.mark.parametrize("folder", OPTIMUM)
def test_optimum_export_rewrite_matches_reference(loaded, calibrated, tmp_path, folder, comp_mode):
    """optimum's export → rewrite → onnxruntime equals the PyTorch Top-θ reference over a left-padded prefill
    and two decode steps; the graph keeps optimum's inputs and outputs, and θ really prunes."""
    src, out = FIXTURES / folder / "model.onnx", tmp_path / "model.onnx"
    rep = rewrite(src, calibrated, out, comp_mode=comp_mode)
    assert [(r["layer"], r["form"], r["num_heads"], r["num_kv_heads"]) for r in rep["layers"]] == [
        (0, "DecomposedAttention", 4, 2),
        (1, "DecomposedAttention", 4, 2),
    ]
    assert io_names(out) == io_names(src)
    model = onnx.load(str(out))
    assert sum(n.op_type == names.OP_TYPE for n in model.graph.node) == 2
    assert not any(n.op_type == "Softmax" for n in model.graph.node)

    sess, ref = session(out), reference(loaded, calibrated, comp_mode)
    batch, seq = 2, 12
    ids = tokens(batch, seq, 0)
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0  # row 1 left-padded, positions as optimum's generate computes them
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions} | empty_past(sess, batch)
    got, want = outputs(sess, feed), ref(input_ids=ids, attention_mask=mask, position_ids=positions)
    diffs = [float(np.abs(got["logits"] - want.logits.numpy())[mask.astype(bool)].max())]
    with torch.no_grad():
        dense = loaded.model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert float(np.abs(got["logits"] - dense)[mask.astype(bool)].max()) > 1e-3  # θ changes the result
    cache = want.past_key_values
    for step in range(2):
        ids = tokens(batch, 1, 10 + step)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        positions = positions[:, -1:] + 1
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions} | as_past(got)
        got = outputs(sess, feed)
        with torch.no_grad(), attention_mode(loaded.model, "toptheta", thresholds=calibrated, comp_mode=comp_mode):
            want = loaded.model(
                input_ids=torch.as_tensor(ids),
                attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions),
                past_key_values=cache,
                use_cache=True,
            )
        cache = want.past_key_values
        diffs.append(float(np.abs(got["logits"] - want.logits.numpy()).max()))
    assert max(diffs) <= TOL, diffs


def test_optimum_rewrite_cli(loaded, calibrated, tmp_path):
    """``topθ-export rewrite`` on optimum's export, as a user runs it: thresholds from a folder."""
    calibrated.save(tmp_path / "th")
    out = tmp_path / "model.onnx"
    res = subprocess.run(
        [*CLI, "rewrite", str(FIXTURES / "optimum-opset18" / "model.onnx"), "--thresholds", str(tmp_path / "th")]
        + ["-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rewrote 2 attention blocks into TopThetaAttention" in res.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["toptheta.foreign_forms"] == "DecomposedAttention"
    assert meta["toptheta.kv_cache"] == "concat"


# -- (c) onnxruntime-genai's GroupQueryAttention ---------------------------------------------------------------


def genai_feed(ids: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """What onnxruntime-genai feeds besides the cache: the ids and an all-ones mask over the total length."""
    return {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64)}


@pytest.mark.parametrize("comp_mode", (0, 2))
def test_genai_gqa_rewrite_matches_reference(loaded, calibrated, tmp_path, comp_mode):
    """The genai builder's graph (packed QKV, do_rotary, seqlens_k) → rewrite (concat KV form) → onnxruntime
    equals the PyTorch Top-θ reference over a prefill and two decode steps, with the builder's I/O kept."""
    src, out = FIXTURES / "genai-cpu" / "model.onnx", tmp_path / "model.onnx"
    rep = rewrite(src, calibrated, out, comp_mode=comp_mode)
    assert {r["form"] for r in rep["layers"]} == {"MicrosoftGroupQueryAttention"}
    assert io_names(out) == io_names(src)
    model = onnx.load(str(out))
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph.node) == 4  # Q and K of both layers

    sess, ref = session(out), reference(loaded, calibrated, comp_mode)
    batch, seq = 2, 12
    ids = tokens(batch, seq, 3)
    got, want = outputs(sess, genai_feed(ids, seq) | empty_past(sess, batch)), ref(input_ids=ids)
    diffs = [float(np.abs(got["logits"] - want.logits.numpy()).max())]
    with torch.no_grad():
        dense = loaded.model(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert float(np.abs(got["logits"] - dense).max()) > 1e-3
    cache, total = want.past_key_values, seq
    for step in range(2):
        ids, total = tokens(batch, 1, 20 + step), total + 1
        got = outputs(sess, genai_feed(ids, total) | as_past(got))
        want = ref(input_ids=ids, past_key_values=cache)
        cache = want.past_key_values
        diffs.append(float(np.abs(got["logits"] - want.logits.numpy()).max()))
    assert max(diffs) <= TOL, diffs


def run_shared_buffer(sess, ids: np.ndarray, total: int, buffers: dict[str, Any]) -> np.ndarray:
    """One call as onnxruntime-genai makes it with ``past_present_share_buffer``: past and present bound to one
    preallocated buffer per layer and kind (IOBinding); returns the logits."""
    io = sess.io_binding()
    for name, array in genai_feed(ids, total).items():
        io.bind_cpu_input(name, array)
    io.bind_output("logits")
    for past, buffer in buffers.items():
        io.bind_ortvalue_input(past, buffer)
        io.bind_ortvalue_output(past.replace("past_key_values.", "present."), buffer)
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0]


def test_genai_gqa_shared_buffer_matches_reference(loaded, calibrated, tmp_path):
    """``kv_cache="shared"`` maps GroupQueryAttention's shared past/present buffer onto the op's shared form
    (``past_sequence_length`` from seqlens_k): bound like genai binds it, the original graph equals dense
    PyTorch and the rewritten one the Top-θ reference, over a prefill and three decode steps."""
    from onnxruntime import InferenceSession, OrtValue

    src, out = FIXTURES / "genai-cpu" / "model.onnx", tmp_path / "model.onnx"
    rep = rewrite(src, calibrated, out, kv_cache="shared")
    assert rep["kv_cache"] == "shared" and io_names(out) == io_names(src)
    assert summarize(out)["kv_cache"] == "shared"  # what `inspect` prints
    capacity, batch, seq = 24, 2, 10
    sessions = {"dense": InferenceSession(str(src), providers=["CPUExecutionProvider"]), "toptheta": session(out)}
    for kind, sess in sessions.items():
        arrays = {n: np.zeros((batch, 2, capacity, 16), np.float32) for n in empty_past(sess, batch)}
        buffers = {n: OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        ids = tokens(batch, seq, 5)
        if kind == "dense":

            def ref(**kw):
                with torch.no_grad():
                    return loaded.model(
                        **{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
                    )

        else:
            ref = reference(loaded, calibrated)
        want = ref(input_ids=ids)
        diffs = [float(np.abs(run_shared_buffer(sess, ids, seq, buffers) - want.logits.numpy()).max())]
        cache, total = want.past_key_values, seq
        for step in range(3):
            ids, total = tokens(batch, 1, 30 + step), total + 1
            got = run_shared_buffer(sess, ids, total, buffers)
            want = ref(input_ids=ids, past_key_values=cache)
            cache = want.past_key_values
            diffs.append(float(np.abs(got - want.logits.numpy()).max()))
        assert max(diffs) <= TOL, (kind, diffs)


# -- (b) com.microsoft.MultiHeadAttention -----------------------------------------------------------------------
# No exporter at hand emits it for a decoder, so these graphs are built here with onnx.helper: one
# MultiHeadAttention node with the inputs onnxruntime's transformers optimizer gives it (3-D Q/K/V, no bias).

MHA_B, MHA_H, MHA_D, MHA_S, MHA_P = 2, 4, 8, 5, 6


def mha_graph(path: Path, *, cached: bool) -> dict[str, np.ndarray]:
    """Write a one-node MultiHeadAttention model to ``path``; returns its feeds. ``cached``: past/present,
    a 2-D int32 key padding mask (row 1 left-padded by 2) and ``unidirectional=1``; else an additive
    attention bias ``[1, 1, S, S]``."""
    from onnx import TensorProto, helper

    b, h, d, s, p = MHA_B, MHA_H, MHA_D, MHA_S, MHA_P
    rng = np.random.default_rng(7)
    feeds = {n: rng.standard_normal((b, s, h * d)).astype(np.float32) for n in ("query", "key", "value")}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, s, h * d]) for n in feeds]
    node_inputs = ["query", "key", "value", ""]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, s, h * d])]
    if cached:
        mask = np.ones((b, p + s), np.int32)
        mask[1, :2] = 0
        feeds["key_padding_mask"] = mask
        inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, [b, p + s]))
        for kind in ("key", "value"):
            feeds[f"past_{kind}"] = rng.standard_normal((b, h, p, d)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(f"past_{kind}", TensorProto.FLOAT, [b, h, p, d]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}", TensorProto.FLOAT, [b, h, p + s, d]))
        node_inputs += ["key_padding_mask", "", "past_key", "past_value"]
    else:
        feeds["attention_bias"] = rng.standard_normal((1, 1, s, s)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, [1, 1, s, s]))
        node_inputs += ["", "attention_bias"]
    node = helper.make_node(
        "MultiHeadAttention",
        node_inputs,
        [o.name for o in outputs],
        domain="com.microsoft",
        name="/encoder/layer.0/attention/MultiHeadAttention",
        num_heads=h,
        unidirectional=int(cached),
    )
    graph = helper.make_graph([node], "one_mha", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return feeds


def heads(x: np.ndarray) -> torch.Tensor:
    b, s, _ = x.shape
    return torch.from_numpy(x).reshape(b, s, MHA_H, MHA_D).transpose(1, 2).double()


@pytest.mark.parametrize("cached", (True, False))
def test_multi_head_attention_rewrite_matches_reference(tmp_path, cached):
    """A MultiHeadAttention graph → rewrite → onnxruntime equals topthetaexport.torch.reference (float64), and
    the original node equals the dense reference (the mapping of its mask, cache and causality is right)."""
    from onnxruntime import InferenceSession

    from topthetaexport.thresholds import Thresholds
    from topthetaexport.torch.reference import dense_attention, toptheta_attention

    src, out = tmp_path / "mha.onnx", tmp_path / "model.onnx"
    feeds = mha_graph(src, cached=cached)
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(1, MHA_H, MHA_P + MHA_S, generator=g) * 0.5
    meta = {"num_layers": 1, "num_heads": MHA_H, "num_kv_heads": MHA_H, "head_dim": MHA_D, "k": 4, "causal": cached}
    th = Thresholds(theta, torch.rand(theta.shape, generator=g) * 0.5, meta)
    rep = rewrite(src, th, out, comp_mode=1)
    assert rep["layers"][0]["form"] == (
        "CachedMicrosoftMultiHeadAttention" if cached else "MicrosoftMultiHeadAttention"
    )
    assert io_names(out) == io_names(src)

    q, k, v = (heads(feeds[n]) for n in ("query", "key", "value"))
    kwargs: dict[str, Any] = {"scale": MHA_D**-0.5}
    if cached:
        kwargs |= {
            "causal": True,
            "attn_mask": torch.from_numpy(feeds["key_padding_mask"]).bool(),
            "past_key": torch.from_numpy(feeds["past_key"]).double(),
            "past_value": torch.from_numpy(feeds["past_value"]).double(),
        }
    else:
        kwargs["attn_mask"] = torch.from_numpy(feeds["attention_bias"]).double()

    def flat(y: torch.Tensor) -> np.ndarray:
        return y.transpose(1, 2).reshape(MHA_B, MHA_S, MHA_H * MHA_D).numpy()

    want = flat(toptheta_attention(q, k, v, theta[0].double(), sdc=th.sdc[0].double(), comp_mode=1, **kwargs))
    dense = flat(dense_attention(q, k, v, **kwargs))
    got = outputs(session(out), feeds)
    original = outputs(InferenceSession(str(src), providers=["CPUExecutionProvider"]), feeds)
    np.testing.assert_allclose(original["output"], dense, atol=TOL)
    np.testing.assert_allclose(got["output"], want, atol=TOL)
    assert np.abs(got["output"] - dense).max() > 1e-3  # θ prunes
    if cached:
        for kind in ("key", "value"):
            np.testing.assert_array_equal(got[f"present_{kind}"], original[f"present_{kind}"])


# -- layer mapping and refusals -------------------------------------------------------------------------------


def one_line_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_layer_count_mismatch_is_one_line_error(loaded, calibrated, tmp_path):
    from topthetaexport._errors import TopThetaError
    from topthetaexport.thresholds import Thresholds

    three = Thresholds(
        torch.cat([calibrated.theta, calibrated.theta[:1]]),
        torch.cat([calibrated.sdc, calibrated.sdc[:1]]),
        calibrated.meta | {"num_layers": 3},
    )
    for folder in ("optimum-opset18", "genai-cpu"):
        with pytest.raises(TopThetaError) as e:
            rewrite(FIXTURES / folder / "model.onnx", three, tmp_path / "model.onnx")
        one_line_error(e, "the graph has 2 attention blocks", "the thresholds have 3 layers", "calibrate")
    assert not (tmp_path / "model.onnx").exists()


def test_head_count_mismatch_is_one_line_error(calibrated, tmp_path):
    from topthetaexport._errors import TopThetaError
    from topthetaexport.thresholds import Thresholds

    eight = Thresholds(
        calibrated.theta.repeat(1, 2, 1), calibrated.sdc.repeat(1, 2, 1), calibrated.meta | {"num_heads": 8}
    )
    for folder in ("optimum-opset23", "genai-cpu"):
        with pytest.raises(TopThetaError) as e:
            rewrite(FIXTURES / folder / "model.onnx", eight, tmp_path / "model.onnx")
        one_line_error(e, "layer 0", "4 query heads", "[4, R]")


def test_ambiguous_layers_is_one_line_error(calibrated, tmp_path):
    """Two attention blocks named for one layer: the mapping refuses to guess."""
    from topthetaexport._errors import TopThetaError

    model = onnx.load(str(FIXTURES / "optimum-opset18" / "model.onnx"))
    for node in model.graph.node:
        node.name = node.name.replace("/layers.1/", "/layers.0/")
    src = tmp_path / "renamed.onnx"
    onnx.save(model, str(src))
    with pytest.raises(TopThetaError) as e:
        rewrite(src, calibrated, tmp_path / "model.onnx")
    one_line_error(e, "ambiguous", "both belong to layer 0")


def test_unnamed_blocks_map_by_order(loaded, calibrated, tmp_path):
    """Without layer numbers in the node names the blocks take their graph order; parity is unchanged."""
    model = onnx.load(str(FIXTURES / "optimum-opset18" / "model.onnx"))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    src, out = tmp_path / "unnamed.onnx", tmp_path / "model.onnx"
    onnx.save(model, str(src))
    rep = rewrite(src, calibrated, out)
    assert [r["layer"] for r in rep["layers"]] == [0, 1]
    ids = tokens(1, 8, 9)
    feed = {"input_ids": ids, "attention_mask": np.ones((1, 8), np.int64), "position_ids": np.arange(8)[None]}
    got = outputs(session(out), feed | empty_past(session(out), 1))["logits"]
    want = reference(loaded, calibrated)(input_ids=ids).logits.numpy()
    assert float(np.abs(got - want).max()) <= TOL


def test_shared_kv_refused_for_decomposed_graph(calibrated, tmp_path):
    from topthetaexport._errors import TopThetaError

    with pytest.raises(TopThetaError) as e:
        rewrite(FIXTURES / "optimum-opset18" / "model.onnx", calibrated, tmp_path / "model.onnx", kv_cache="shared")
    one_line_error(e, "--kv-cache concat")


def test_genai_gqa_separate_qkv(loaded, calibrated, tmp_path):
    """GroupQueryAttention fed separate Q, K, V (the builder's packed projection split in front of it, an edit
    of the real fixture): the rule's unpacked path equals the Top-θ reference over a prefill and a decode step."""
    from onnx import helper

    model = onnx.load(str(FIXTURES / "genai-cpu" / "model.onnx"))
    nodes = list(model.graph.node)
    for node in [n for n in nodes if n.op_type == "GroupQueryAttention"]:
        qkv, parts = node.input[0], [f"{node.name}/{p}" for p in ("q", "k", "v")]
        sizes = helper.make_tensor(f"{node.name}/sizes", onnx.TensorProto.INT64, [3], [64, 32, 32])
        model.graph.initializer.append(sizes)
        split = helper.make_node("Split", [qkv, sizes.name], parts, name=f"{node.name}/Split", axis=-1)
        nodes.insert(nodes.index(node), split)
        node.input[0], node.input[1], node.input[2] = parts
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    src, out = tmp_path / "separate.onnx", tmp_path / "model.onnx"
    onnx.save(model, str(src))
    rewrite(src, calibrated, out)
    sess, ref = session(out), reference(loaded, calibrated)
    ids = tokens(2, 9, 4)
    got, want = outputs(sess, genai_feed(ids, 9) | empty_past(sess, 2)), ref(input_ids=ids)
    diffs = [float(np.abs(got["logits"] - want.logits.numpy()).max())]
    ids2 = tokens(2, 1, 40)
    got = outputs(sess, genai_feed(ids2, 10) | as_past(got))
    diffs.append(
        float(np.abs(got["logits"] - ref(input_ids=ids2, past_key_values=want.past_key_values).logits.numpy()).max())
    )
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize(
    ("attribute", "value", "reason"),
    [("local_window_size", 4, "it uses a local (sliding) window"), ("softcap", 30.0, "it uses softcap")],
)
def test_gqa_refusal_names_the_reason(calibrated, tmp_path, attribute, value, reason):
    """A GroupQueryAttention the op cannot compute is refused in one line with the rule's reason."""
    from onnx import helper

    from topthetaexport._errors import TopThetaError

    model = onnx.load(str(FIXTURES / "genai-cpu" / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            kept = [a for a in node.attribute if a.name != attribute]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute(attribute, value)])
    src = tmp_path / "edited.onnx"
    onnx.save(model, str(src))
    with pytest.raises(TopThetaError) as e:
        rewrite(src, calibrated, tmp_path / "model.onnx")
    one_line_error(e, "layer 0", f"MicrosoftGroupQueryAttention: {reason}", "not supported")
