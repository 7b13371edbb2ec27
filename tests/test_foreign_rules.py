"""The foreign attention forms (topthetaexport.onnx.foreign_rules) on graphs made by other exporters.

The fixtures under tests/fixtures/foreign/ are real exports of one tiny random-weight LLaMA (make_fixtures.sh
there says how they were made); the tests rebuild the same PyTorch model from its config and seed, calibrate
thresholds on it, rewrite the foreign graph and compare onnxruntime with the PyTorch Top-θ reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
