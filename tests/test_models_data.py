"""Model loading (aliases, directories, errors) and calibration data / token windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model

from topthetaexport._errors import TopThetaError
from topthetaexport.data import as_token_tensor, load_texts, token_batches
from topthetaexport.models import SUPPORTED_MODEL_TYPES, LoadedModel, load_model

EXPECTED = {  # kind: (causal, is_lm, heads, kv heads, head_dim)
    "llama": (True, True, 4, 2, 16),
    "qwen2": (True, True, 4, 2, 16),
    "mistral": (True, True, 4, 1, 16),
    "gpt2": (True, True, 4, 4, 16),
    "bert": (False, False, 4, 4, 16),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_load_tiny_dirs(kind, request):
    path = request.getfixturevalue(f"tiny_{kind}")
    lm = load_model(path)
    causal, is_lm, heads, kv, hd = EXPECTED[kind]
    assert isinstance(lm, LoadedModel) and lm.model_type == kind and lm.source == str(path)
    assert (lm.causal, lm.is_lm, lm.num_heads, lm.num_kv_heads, lm.head_dim) == (causal, is_lm, heads, kv, hd)
    assert lm.num_layers == 3 and lm.max_positions == 256 and lm.tokenizer is None
    assert not lm.model.training and lm.model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    # the loaded weights are the saved ones
    ref = build_tiny_model(kind)
    name, p = next(iter(ref.state_dict().items()))
    assert torch.equal(lm.model.state_dict()[name], p)


def test_wrap_in_memory_model():
    m = build_tiny_model("llama")
    lm = load_model(m)
    assert lm.model is m and lm.source == "in-memory" and lm.num_kv_heads == 2
    assert load_model(lm) is lm


def test_load_errors(tmp_path, tiny_llama):
    with pytest.raises(TopThetaError, match="neither a known alias"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TopThetaError, match="no config.json"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{ nope")
    with pytest.raises(TopThetaError, match="cannot read"):
        load_model(bad)
    # truncated weights
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(TopThetaError, match="cannot load model weights"):
        load_model(broken)


def test_unsupported_architecture(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        str(tmp_path / "t5")
    )
    with pytest.raises(TopThetaError, match="unsupported architecture 't5'") as e:
        load_model(tmp_path / "t5")
    assert all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)
    with pytest.raises(TopThetaError, match="'t5'"):
        load_model(T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)))


def test_minilm_alias():
    lm = load_model("all-minilm-l6-v2")
    assert lm.model_type == "bert" and not lm.causal and not lm.is_lm
    assert (lm.num_layers, lm.num_heads, lm.head_dim) == (6, 12, 32)
    toks = token_batches(lm.tokenizer, "builtin:pydoc", seq_len=64, num_samples=3)
    assert toks.shape == (3, 64)
    cls, sep = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
    assert torch.all(toks[:, 0] == cls) and torch.all(toks[:, -1] == sep)
    with torch.no_grad():
        out = lm.model(input_ids=toks, attention_mask=torch.ones_like(toks)).last_hidden_state
    assert out.shape == (3, 64, 384) and torch.isfinite(out).all()


# -- texts -------------------------------------------------------------------------------------------


def test_load_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsame doc paragraph\n\n\n\nsecond doc\n")
    assert load_texts(tmp_path / "a.txt") == ["first doc\nline two\n\nsame doc paragraph", "second doc"]
    rows = [{"text": "alpha"}, {"text": "beta", "id": 3}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(tmp_path / "b.jsonl") == ["alpha", "beta"]
    (tmp_path / "ignored.csv").write_text("x")
    assert load_texts(tmp_path) == ["first doc\nline two\n\nsame doc paragraph", "second doc", "alpha", "beta"]
    assert load_texts(["  x ", "", "y"]) == ["x", "y"]
    pydoc = load_texts("builtin:pydoc")
    assert len(pydoc) > 50 and sum(map(len, pydoc)) > 300_000


def test_load_texts_errors(tmp_path):
    with pytest.raises(TopThetaError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(TopThetaError, match="no text found"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(TopThetaError, match="not UTF-8"):
        load_texts(tmp_path / "bin.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(TopThetaError, match="line 2 is not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(TopThetaError, match="no string field"):
        load_texts(tmp_path / "nofield.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(TopThetaError, match="unsupported data file"):
        load_texts(tmp_path / "x.csv")
    (tmp_path / "d").mkdir()
    with pytest.raises(TopThetaError, match="no .txt or .jsonl"):
        load_texts(tmp_path / "d")
    with pytest.raises(TopThetaError, match="no text found"):
        load_texts([])


# -- token windows -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real (tiny) fast tokenizer: whitespace words, with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <eos> the quick brown fox jumps over lazy dog a b c d e".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_token_windows(word_tokenizer):
    docs = ["the quick brown fox", "jumps over the lazy dog", "a b c d e"]
    stream = [2, 3, 4, 5, 1, 6, 7, 2, 8, 9, 1, 10, 11, 12, 13, 14, 1]  # docs joined with EOS (id 1)
    w = token_batches(word_tokenizer, docs, seq_len=4, num_samples=3)
    assert w.dtype == torch.long and w.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    held = token_batches(word_tokenizer, docs, seq_len=4, num_samples=1, skip=3)
    assert held.tolist() == [stream[12:16]]
    with pytest.warns(RuntimeWarning, match="only 4 windows"):
        assert token_batches(word_tokenizer, docs, seq_len=4, num_samples=9).shape == (4, 4)
    with pytest.raises(TopThetaError, match="at least one more"):
        token_batches(word_tokenizer, docs, seq_len=4, num_samples=1, skip=4)
    with pytest.raises(TopThetaError, match="at least one more"):
        token_batches(word_tokenizer, ["the dog"], seq_len=64, num_samples=1)
    with pytest.raises(TopThetaError, match="no tokenizer"):
        token_batches(None, docs, seq_len=4, num_samples=1)


def test_token_windows_start_with_bos_where_the_tokenizer_adds_it(word_tokenizer):
    """A tokenizer that starts every text with BOS (Gemma's, Llama's) gets windows [BOS] + seq_len - 1 tokens of
    the stream, as the model runs at deployment; one that adds none (the word tokenizer above) gets none."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from topthetaexport.data import leading_bos

    words = "<unk> <eos> <bos> the quick brown fox jumps over lazy dog".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    assert leading_bos(bos_tok) == 2 and leading_bos(word_tokenizer) is None
    stream = [3, 4, 5, 6, 1, 7, 8, 3, 9, 10, 1]  # the documents joined with EOS, without BOS inside
    w = token_batches(bos_tok, ["the quick brown fox", "jumps over the lazy dog"], seq_len=4, num_samples=3)
    assert w.tolist() == [[2, *stream[0:3]], [2, *stream[3:6]], [2, *stream[6:9]]]


def test_mixed_data_takes_windows_in_turn_from_each_text(word_tokenizer, tmp_path):
    """``A,B``: window j from text j mod 2 (its window j div 2); skip holds out the same windows of each."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog the quick brown fox")
    (tmp_path / "b.txt").write_text("a b c d e a b c d e a b c d e")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    wa = token_batches(word_tokenizer, a, seq_len=3, num_samples=4)
    wb = token_batches(word_tokenizer, b, seq_len=3, num_samples=4)
    mix = f"{a},{b}"
    assert load_texts(mix) == load_texts(a) + load_texts(b)
    w = token_batches(word_tokenizer, mix, seq_len=3, num_samples=4)
    assert w.tolist() == [wa[0].tolist(), wb[0].tolist(), wa[1].tolist(), wb[1].tolist()]
    held = token_batches(word_tokenizer, mix, seq_len=3, num_samples=3, skip=3)
    assert held.tolist() == [wb[1].tolist(), wa[2].tolist(), wb[2].tolist()]
    with pytest.warns(RuntimeWarning) as short:  # a's 14 tokens give 4 windows, b's 15 give 5
        assert token_batches(word_tokenizer, mix, seq_len=3, num_samples=12).shape == (9, 3)
    assert sorted(str(w.message)[:14] for w in short) == ["only 4 windows", "only 5 windows"]
    with pytest.raises(TopThetaError, match=r"part 2 of the mixed data\): data path .*nope.txt does not exist"):
        token_batches(word_tokenizer, f"{a},{tmp_path / 'nope.txt'}", seq_len=3, num_samples=2)
    with pytest.raises(TopThetaError, match="has an empty part"):
        load_texts(f"{a},")
    odd = tmp_path / "x,y.txt"  # a file whose name has a comma is one text, not two
    odd.write_text("the dog")
    assert load_texts(odd) == ["the dog"]


def test_as_token_tensor(word_tokenizer):
    t = torch.randint(0, 10, (2, 5))
    assert as_token_tensor(t, None, seq_len=99, num_samples=7) is t
    assert as_token_tensor(["the quick brown fox"], word_tokenizer, seq_len=2, num_samples=2).shape == (2, 2)
    with pytest.raises(TopThetaError, match="integer tensor"):
        as_token_tensor(torch.zeros(2, 3), None, seq_len=3, num_samples=1)
    with pytest.raises(TopThetaError, match="integer tensor"):
        as_token_tensor(torch.zeros(3, dtype=torch.long), None, seq_len=3, num_samples=1)
