"""Files that make an output folder deployable as it is (docs/deploy.md): the custom-op library copied beside the
model, and ``genai_config.json`` for onnxruntime-genai, which registers that copy through ``custom_ops_library``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ._errors import TopThetaError
from ._io import atomic_path, write_json
from .onnx.names import GENAI_INPUTS_META, GENAI_MODEL, kv_cache_form
from .ort.library import LIBRARY_NAME

GENAI_CONFIG = "genai_config.json"
# onnxruntime-genai's model types for the decoder architectures we export (its own names, which match HF's).
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2"}


def bundle_library(library: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy the custom-op library into ``folder`` as ``libtoptheta_ops.so`` (atomically); returns the copy.

    genai accepts a ``custom_ops_library`` only inside the model's folder, and a copy keeps OUT/ movable."""
    target = Path(folder) / LIBRARY_NAME
    with atomic_path(target) as tmp:
        shutil.copy2(library, tmp)
    return target


def _token_id(value) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        ids = [int(v) for v in value]
        return ids[0] if len(ids) == 1 else ids
    return None if value is None else int(value)


def genai_config(loaded, model_file: str | os.PathLike, library_name: str, max_length: int | None = None) -> dict:
    """The ``genai_config.json`` content for the rewritten decoder ``model_file`` of ``loaded``.

    The graph decides the cache: the concat form (``past_key_values.*`` in, ``present.*`` out, a fresh tensor each
    step) is ``past_present_share_buffer: false``; the shared form with genai's inputs (``write_genai_graph``: the
    mask of the tokens so far, past lengths from it) is ``true``, genai binding one buffer per layer and kind as past
    and present. A shared-form graph without those inputs is refused: genai 0.18 feeds it no
    ``past_sequence_length`` (measured: "Missing Input: past_sequence_length")."""
    import onnx

    genai_type = GENAI_TYPES.get(loaded.model_type)
    if genai_type is None or not (loaded.causal and loaded.is_lm):
        raise TopThetaError(
            f"onnxruntime-genai runs decoder language models ({', '.join(GENAI_TYPES)}); {loaded.name} is "
            f"'{loaded.model_type}': serve it with onnxruntime directly (docs/deploy.md)"
        )
    proto = onnx.load(str(model_file), load_external_data=False)
    input_names = [v.name for v in proto.graph.input]
    form = kv_cache_form(input_names)  # what the rewrite records as toptheta.kv_cache, read from the graph itself
    shared = {p.key: p.value for p in proto.metadata_props}.get(GENAI_INPUTS_META) == "1"
    if form is None:
        raise TopThetaError(f"{model_file} has no KV cache: export it with the cache (the default) for genai")
    if form != "concat":
        raise TopThetaError(
            f"{model_file} has the shared-buffer KV cache, whose past_sequence_length input onnxruntime-genai "
            f"0.18 does not feed: give genai the graph write_genai_graph makes ({GENAI_MODEL}), or export with "
            "--kv-cache concat (docs/deploy.md)"
        )
    cfg = loaded.config
    context = int(loaded.max_positions or max_length or 2048)
    inputs: dict[str, str] = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if "position_ids" in input_names:
        inputs["position_ids"] = "position_ids"
    eos = _token_id(getattr(cfg, "eos_token_id", None))
    pad = _token_id(getattr(cfg, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    model: dict[str, Any] = {
        "type": genai_type,
        "bos_token_id": _token_id(getattr(cfg, "bos_token_id", None)),
        "eos_token_id": eos,
        "pad_token_id": pad,
        "context_length": context,
        "vocab_size": int(cfg.vocab_size),
        "decoder": {
            "filename": Path(model_file).name,
            "session_options": {
                "log_id": "toptheta-export",
                "custom_ops_library": library_name,
                "provider_options": [],
            },
            "head_size": loaded.head_dim,
            "hidden_size": int(getattr(cfg, "hidden_size", loaded.head_dim * loaded.num_heads)),
            "num_attention_heads": loaded.num_heads,
            "num_key_value_heads": loaded.num_kv_heads,
            "num_hidden_layers": loaded.num_layers,
            "inputs": inputs,
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    return {
        "model": {k: v for k, v in model.items() if v is not None},
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": int(max_length or context),
            "min_length": 0,
            "past_present_share_buffer": shared,  # false: genai feeds past and takes present (concat form)
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_graph(model_file: str | os.PathLike) -> Path:
    """``model.genai.onnx`` beside the shared-form ``model_file``: the same graph with the inputs genai
    feeds (``onnx.kv_cache.GenaiSharedInputs``), reading ``model_file``'s external data, so the weights are not
    written twice: a ``model_file`` that holds its weights itself is saved again with them in ``<name>.data``.
    Returns the file."""
    import onnx
    import onnx_ir as ir
    from onnx.external_data_helper import uses_external_data

    from .onnx.exporter import write_onnx
    from .onnx.kv_cache import GenaiSharedInputs

    model_file = Path(model_file)
    target = model_file.with_name(GENAI_MODEL)
    proto = onnx.load(str(model_file), load_external_data=False)
    if not any(uses_external_data(t) for t in proto.graph.initializer):
        write_onnx(ir.from_proto(proto), model_file, external=True, check=False)
        proto = onnx.load(str(model_file), load_external_data=False)
    model = ir.from_proto(proto)
    GenaiSharedInputs()(model)
    with atomic_path(target) as tmp:
        onnx.save(ir.to_proto(model), str(tmp))
    return target


def write_deploy_files(loaded, folder: str | os.PathLike, library: str | os.PathLike) -> list[Path]:
    """Into ``folder`` (which holds ``model.onnx``): the library copy and, for decoder LMs of a type genai runs,
    ``genai_config.json``; for the shared-buffer cache also ``model.genai.onnx`` (genai's inputs), which the config
    names. Returns the files written."""
    from .onnx.summary import graph_kv_cache

    folder = Path(folder)
    written = [bundle_library(library, folder)]
    genai_runs = loaded.causal and loaded.is_lm and loaded.model_type in GENAI_TYPES
    form = graph_kv_cache(folder / "model.onnx") if genai_runs else None
    if form == "shared":
        written.append(write_genai_graph(folder / "model.onnx"))
    if form in ("concat", "shared"):
        cfg = genai_config(loaded, written[-1] if form == "shared" else folder / "model.onnx", written[0].name)
        written.append(write_json(folder / GENAI_CONFIG, cfg))
    return written
