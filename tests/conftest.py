"""Shared fixtures: tiny random-weight HF models (saved with save_pretrained) and the real SmolLM2 (slow).

Tiny model fixtures return the model directory (a ``Path``); ``load_model(path)`` turns it into a LoadedModel
in well under a second. They have no tokenizer: feed them token tensors (``tiny_tokens``), except
``tiny_llama_bpe``, which has a BPE tokenizer trained here (``tiny_bpe_tokenizer``) saved beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# persistent model cache (the de-quantised SmolLM2 is written there once, later loads take seconds)
os.environ.setdefault("TOPTHETA_CACHE", str(Path.home() / ".cache" / "toptheta-export"))

TINY_VOCAB = 128
TINY_POSITIONS = 256


def _tiny_config(kind: str):
    from transformers import (
        BertConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=TINY_VOCAB, initializer_range=0.1)
    if kind == "llama":  # GQA: 4 query heads on 2 kv heads
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **common,
        )
    if kind == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            use_sliding_window=False,
            **common,
        )
    if kind == "mistral":
        return MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=TINY_POSITIONS,
            sliding_window=None,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    if kind == "qwen3":  # per-head q/k RMSNorm, head_dim set apart from hidden/heads
        return Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **common,
        )
    if kind == "phi3":  # fused qkv / gate_up projections, partial rotary, a sliding window on every layer
        return Phi3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_POSITIONS,
            original_max_position_embeddings=TINY_POSITIONS,
            sliding_window=6,
            partial_rotary_factor=0.5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    if kind == "gemma2":  # attention logit softcap, alternating sliding / global layers, head dim 32
        return Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    if kind == "gemma3":  # q/k norm, 5 sliding : 1 global layers shortened to 2 : 1, head dim 256 (as gemma-3)
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    if kind == "gpt_neox":  # partial rotary (a quarter of each head), parallel residual
        return GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            rotary_pct=0.25,
            max_position_embeddings=TINY_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if kind == "gpt2":
        return GPT2Config(
            n_embd=64, n_layer=3, n_head=4, n_positions=TINY_POSITIONS, bos_token_id=1, eos_token_id=2, **common
        )
    if kind == "bert":
        return BertConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=TINY_POSITIONS,
            pad_token_id=0,
            **common,
        )
    raise ValueError(kind)


def build_tiny_model(kind: str, seed: int = 0):
    """A tiny random-weight model of ``kind`` (see ``_tiny_config``), eval mode, its registry attention."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _tiny_config(kind)
    from topthetaexport.architectures import ARCHITECTURES

    cfg._attn_implementation = ARCHITECTURES[cfg.model_type].attn_implementation  # eager for gemma2
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def save_tiny_model(kind: str, root: Path, seed: int = 0) -> Path:
    out = root / f"tiny-{kind}"
    if not (out / "config.json").is_file():
        build_tiny_model(kind, seed).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_llama(tiny_models_dir) -> Path:
    return save_tiny_model("llama", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models_dir) -> Path:
    return save_tiny_model("qwen2", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_mistral(tiny_models_dir) -> Path:
    return save_tiny_model("mistral", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models_dir) -> Path:
    return save_tiny_model("gpt2", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_bert(tiny_models_dir) -> Path:
    return save_tiny_model("bert", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models_dir) -> Path:
    return save_tiny_model("qwen3", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_phi3(tiny_models_dir) -> Path:
    return save_tiny_model("phi3", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_gemma2(tiny_models_dir) -> Path:
    return save_tiny_model("gemma2", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_models_dir) -> Path:
    return save_tiny_model("gemma3", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_gpt_neox(tiny_models_dir) -> Path:
    return save_tiny_model("gpt_neox", tiny_models_dir)


def tiny_bpe_tokenizer(vocab: int = 1000):
    """A byte-level BPE tokenizer trained on a few pydoc topics (deterministic, about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from topthetaexport.data import load_texts

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(load_texts("builtin:pydoc")[:6], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama_with_tokenizer(out: Path, seed: int = 0) -> Path:
    """A tiny LLaMA (GQA 4/2 heads, 3 layers) sized to a tiny BPE tokenizer, both saved in ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").is_file():
        return out
    tok = tiny_bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.1,
    )
    cfg._attn_implementation = "sdpa"
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_bpe(tiny_models_dir) -> Path:
    return save_tiny_llama_with_tokenizer(tiny_models_dir / "tiny-llama-bpe")


def make_tokens(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [n, seq_len] in the tiny vocabulary (ids 3.. to avoid pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (n, seq_len), generator=g)


@pytest.fixture
def tiny_tokens():
    return make_tokens


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (LoadedModel), loaded once per session through the persistent cache."""
    from topthetaexport.models import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(items):
    """Two tiers: whatever loads the real SmolLM2 is ``slow`` (deselect with -m 'not slow'), marked or not."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
