"""The foreign attention forms (topthetaexport.onnx.foreign_rules) on graphs made by other exporters.

The fixtures under tests/fixtures/foreign/ are real exports of one tiny random-weight LLaMA (make_fixtures.sh
there says how they were made); the tests rebuild the same PyTorch model from its config and seed, calibrate
thresholds on it, rewrite the foreign graph and compare onnxruntime with the PyTorch Top-θ reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from topthetaexport.onnx import names
from topthetaexport.onnx.rewriter import rewrite
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
OPTIMUM = ("optimum-opset18", "optimum-opset23")


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
    return {
        i.name: np.zeros((batch, 2, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past_key")
    }


def io_names(path: Path) -> tuple[list, list]:
    model = onnx.load(str(path), load_external_data=False)
    sig = [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input]
    return sig, [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output]


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
        assert model.opset_import[0].version == int(folder.removeprefix("optimum-opset"))
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
        [sys.executable, str(Path(__file__).with_name("_cli_launcher.py")), "rewrite"]
        + [str(FIXTURES / "optimum-opset18" / "model.onnx"), "--thresholds", str(tmp_path / "th"), "-o", str(out)],
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
