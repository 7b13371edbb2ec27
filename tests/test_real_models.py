"""The larger offline models (``topθ-export fetch``): gemma-3-270m and Qwen2.5-Coder-1.5B-Instruct, 4-bit GGUF
weights de-quantised to float32. Slow tier; each test skips, naming the install command, when its model has not
been fetched.
"""

from __future__ import annotations

import math

import pytest
import torch

from topthetaexport.data import token_batches
from topthetaexport.fetch import BUNDLES, bundle_path
from topthetaexport.models import cache_dir, load_model
from topthetaexport.torch.attention import KeptRecorder, attention_mode
from topthetaexport.torch.calibration import calibrate

# bigmodel: documented runs on the larger fetched models (make test-big-models), not part of make test-models / CI
pytestmark = [pytest.mark.slow, pytest.mark.bigmodel]


def _installed(alias: str):
    if not bundle_path(alias).is_file() and not (cache_dir() / "models" / alias / "config.json").is_file():
        pytest.skip(f"{alias} is not installed: run '{BUNDLES[alias].install_command}' (or 'make fetch-models')")
    return load_model(alias)


@pytest.fixture(scope="module")
def gemma3():
    return _installed("gemma-3-270m")


@pytest.fixture(scope="module")
def qwen_coder():
    return _installed("qwen2.5-coder-1.5b")


def _perplexity(lm, ids, mode="dense", **kw):
    rec = KeptRecorder(min_valid=kw.get("k_min", 0))
    kw.pop("k_min", None)
    with torch.no_grad(), attention_mode(lm, mode, recorder=rec, **kw):
        logits = lm.model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return math.exp(float(nll)), rec


def test_gemma3_270m_is_gemma3_text_with_sliding_and_global_layers(gemma3):
    lm = gemma3
    assert (lm.model_type, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) == ("gemma3_text", 18, 4, 1, 256)
    kinds = lm.architecture.attention_kinds(lm.config)
    assert lm.architecture.sliding_window(lm.config) == 512
    assert [i for i, k in enumerate(kinds) if k == "global"] == [5, 11, 17]  # five sliding layers to one global
    assert (bundle_path("gemma-3-270m").parent / "GEMMA_TERMS.html").is_file()  # the terms travel with the weights


def test_gemma3_270m_toptheta_perplexity(gemma3):
    """Measured (pydoc, 2 x 256 held-out tokens, 4 x 256 calibration): dense 45.7, top-k 64 47.7, Top-θ k=64
    51.8 with SDC (52 without); at k=32: top-k 52.2, Top-θ 64.7 with SDC, 77.7 without."""
    lm = gemma3
    k = 64
    th = calibrate(lm, "builtin:pydoc", k=k, seq_len=256, num_samples=4, dense_layers=1, progress=None)
    assert th.meta["attention_kinds"].count("global") == 3 and set(th.stats()["by_attention"]) == {"sliding", "global"}
    held_out = token_batches(lm.tokenizer, "builtin:pydoc", seq_len=256, num_samples=2, skip=4)
    dense, _ = _perplexity(lm, held_out)
    assert 2 < dense < 80, dense  # a working language model on Python docs
    topk, _ = _perplexity(lm, held_out, "topk", k=k)
    sparse, rec = _perplexity(lm, held_out, "toptheta", thresholds=th, comp_mode=1, k_min=k)
    assert sparse / dense < 1.2 and sparse / topk < 1.15, (sparse, topk, dense)
    kinds = th.meta["attention_kinds"]
    for which in ("sliding", "global"):  # both kinds keep about k of their keys
        layers = [i for i in range(1, lm.num_layers) if kinds[i] == which]
        assert k / 2 < rec.mean_kept(layers) < 1.5 * k and rec.mean_kept(layers) < rec.mean_valid(layers) / 1.5


def test_qwen_coder_1_5b_loads_and_codes(qwen_coder):
    lm = qwen_coder
    assert (lm.model_type, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) == ("qwen2", 28, 12, 2, 128)
    assert lm.architecture.sliding_window(lm.config) == 0
    tok = lm.tokenizer
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=24, do_sample=False)
    completion = tok.decode(out[0, ids.shape[1] :])
    # measured: " if n <= 1:\n         return n\n     else:\n         return fibonacci(n-1) + fibonacci(n-"
    assert "return" in completion and "fibonacci(n-1)" in completion.replace(" ", ""), completion
    held_out = token_batches(tok, "builtin:pydoc", seq_len=128, num_samples=1, skip=4)
    dense, _ = _perplexity(lm, held_out)
    assert 1.5 < dense < 30, dense  # measured 11.4
