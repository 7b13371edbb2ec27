"""The whole job: calibrate → export → rewrite → validate, writing one output folder atomically."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from ._errors import TopThetaError
from ._io import staged_files, staged_output_dir, write_json
from .data import describe_data
from .deploy import write_deploy_files
from .options import check_options, resolve_dtype, resolve_fusions, resolve_kv_cache
from .ort.library import library_info, library_path, runs_on_cuda
from .progress import Progress

# Tokenizer files in an output folder: 'run' needs no Hugging Face folder besides OUT/.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def path_reference(source):
    """How thresholds metadata names a model or text: an alias (builtin:pydoc, smollm2-135m) or tensor as given,
    a local file or folder as an absolute path, so that 'validate' and 'eval' find it from any folder."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def save_model_files(loaded, folder: str | os.PathLike) -> None:
    """config.json, the tokenizer files and generation_config.json of ``loaded`` into ``folder``."""
    folder = str(folder)
    loaded.config.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None and loaded.model.can_generate():
        generation.save_pretrained(folder)


def export(
    model,
    thresholds,
    out_dir: str | os.PathLike,
    *,
    comp_mode: int = 0,
    dtype: str = "auto",
    device: str = "cpu",
    kv_cache: str = "auto",
    theta_extrapolation: str = "last-row",
    max_context: int | None = None,
    fusions: str = "auto",
    progress: Progress | None = None,
) -> Path:
    """Export ``model`` to ONNX and rewrite its attention into TopThetaAttention: ``out_dir/model.onnx``.

    ``dtype`` (auto, float32, float16, bfloat16; auto = float16 if ``device`` resolves to CUDA, else
    float32) is what the graph runs in; a float32 ``model`` is exported from a cast copy and left as it is.
    ``kv_cache`` (auto, concat, shared; auto = shared if ``device`` resolves to CUDA and the model has a KV
    cache, else concat) is the graph's KV-cache form (docs/graph.md). ``fusions`` (auto, on, off; auto = on for a
    float16/bfloat16 graph on CUDA, else off): onnxruntime's fused kernels outside attention (docs/graph.md,
    "Fusions").

    Also saves the thresholds, ``library.json`` and the model's config, tokenizer and generation config
    next to it (all moved into ``out_dir`` together at the end). Returns the model path.
    ``theta_extrapolation`` / ``max_context``: θ for rows past the calibrated length (``rewrite``); the
    thresholds saved are the ones the graph carries.
    """
    from .models import LoadedModel, load_model
    from .onnx.exporter import export_onnx
    from .onnx.rewriter import extend_for_context, rewrite
    from .thresholds import Thresholds

    check_options(
        comp_mode=comp_mode,
        kv_cache=kv_cache,
        theta_extrapolation=theta_extrapolation,
        max_context=max_context,
        fusions=fusions,
    )
    dtype = resolve_dtype(dtype, device, cuda=runs_on_cuda(device))
    fusions = resolve_fusions(fusions, dtype, cuda=runs_on_cuda(device))
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    kv_cache = _kv_cache_form(kv_cache, device, loaded)
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.load(thresholds)
    th.check_compatible(loaded)
    th.meta.setdefault("max_positions", loaded.max_positions)
    th = extend_for_context(th, theta_extrapolation, max_context)
    out_dir = Path(out_dir)
    with staged_files(out_dir) as stage:
        with tempfile.TemporaryDirectory(prefix="toptheta-dense-", dir=stage) as tmp:
            dense = export_onnx(loaded, Path(tmp) / "dense.onnx", dtype=dtype, progress=progress)
            rewrite(dense, th, stage / "model.onnx", comp_mode=comp_mode, kv_cache=kv_cache, fusions=fusions)
        th.save(stage)
        write_json(stage / "library.json", library_info())
        save_model_files(loaded, stage)
        write_deploy_files(loaded, stage, library_path())
    return out_dir / "model.onnx"


def _graph_fusions(path: Path) -> dict[str, int] | None:
    """What ``onnx.fusions.FuseForOrt`` fused in the graph at ``path`` (None: unfused), from its metadata."""
    import onnx

    from .onnx.fusions import FUSIONS_META

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    text = meta.get(FUSIONS_META)
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)} if text else None


def _has_cache(loaded) -> bool:
    """Whether the export of ``loaded`` has a KV cache (decoder LMs; see ``export_onnx``)."""
    return bool(loaded.causal and loaded.is_lm)


def _kv_cache_form(kv_cache: str, device: str, loaded) -> str:
    """``resolve_kv_cache`` for ``loaded``: its cache, and whether it has sliding-window layers."""
    windowed = bool(loaded.architecture.sliding_window(loaded.config))
    return resolve_kv_cache(
        kv_cache, device, cuda=runs_on_cuda(device), has_cache=_has_cache(loaded), sliding_window=windowed
    )


def _check_data(data, what: str) -> None:
    """A text source that cannot be read fails now, not after minutes of calibration."""
    if isinstance(data, (str, os.PathLike)):
        from .data import load_texts

        try:
            load_texts(data)
        except TopThetaError as e:
            raise TopThetaError(f"{what}: {e}") from None


def run_pipeline(
    model: str,
    calib,
    out: str | os.PathLike,
    *,
    k: int = 64,
    seq_len: int = 512,
    num_samples: int = 16,
    dense_layers: int = 2,
    comp_mode: int = 0,
    eval_data=None,
    k_growth: str | None = None,
    layer_k: str | dict[int, int] | None = None,
    dense_heads: str | dict[int, list[int]] | None = None,
    eval_windows: int = 4,
    decode_steps: int = 16,
    do_validate: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    kv_cache: str = "auto",
    threads: int | None = None,
    theta_extrapolation: str = "last-row",
    max_context: int | None = None,
    fusions: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """calibrate → export → rewrite → validate into ``out``; returns the report (also ``out/report.json``).
    ``theta_extrapolation`` / ``max_context``: θ for rows past ``seq_len`` (``export``). ``k_growth``: k per
    row growing with the row, ``layer_k`` per-layer k, ``dense_heads`` dense heads of sparse layers (all
    ``calibrate``).

    Calibration runs the model in float32 PyTorch; the export runs in ``dtype`` (see ``export``), from a
    cast copy of the same loaded model, and validation compares it with the float32 model. ``kv_cache``: the
    graph's KV-cache form, ``fusions`` its fused kernels outside attention (see ``export``).
    """
    from .models import load_model
    from .onnx.summary import graph_dtype, graph_kv_cache
    from .torch.calibration import calibrate

    check_options(
        k=k,
        seq_len=seq_len,
        num_samples=num_samples,
        dense_layers=dense_layers,
        k_growth=k_growth,
        layer_k=layer_k,
        dense_heads=dense_heads,
        comp_mode=comp_mode,
        eval_windows=eval_windows,
        decode_steps=decode_steps,
        device=device,
        dtype=dtype,
        kv_cache=kv_cache,
        theta_extrapolation=theta_extrapolation,
        max_context=max_context,
        fusions=fusions,
    )
    dtype = resolve_dtype(dtype, device, cuda=runs_on_cuda(device))  # bfloat16 on CPU fails here, before any work
    prog = progress or (lambda stage, message, fraction: None)
    library_path()  # fail early, before minutes of calibration, if the library is missing
    timings: dict[str, float] = {}
    with staged_output_dir(out) as stage:
        _check_data(calib, "--calib")
        if do_validate and eval_data is not None:
            _check_data(eval_data, "--eval-data")
        t = time.perf_counter()
        prog("load", f"loading {model}", 0.0)
        loaded = load_model(model)
        prog("load", loaded.name, 1.0)
        timings["load_s"] = time.perf_counter() - t
        # a shared cache for a model without one fails here, before minutes of calibration
        kv_cache = _kv_cache_form(kv_cache, device, loaded)

        t = time.perf_counter()
        th = calibrate(
            loaded,
            path_reference(calib),
            k=k,
            seq_len=seq_len,
            num_samples=num_samples,
            dense_layers=dense_layers,
            k_growth=k_growth,
            layer_k=layer_k,
            dense_heads=dense_heads,
            progress=progress,
        )
        th.meta["model_path"] = path_reference(model)
        timings["calibrate_s"] = time.perf_counter() - t
        prog("calibrate", "thresholds ready", 1.0)

        t = time.perf_counter()
        export(
            loaded,
            th,
            stage,
            comp_mode=comp_mode,
            dtype=dtype,
            device=device,
            kv_cache=kv_cache,
            theta_extrapolation=theta_extrapolation,
            max_context=max_context,
            fusions=fusions,
            progress=progress,
        )
        timings["export_s"] = time.perf_counter() - t
        prog("export", "model.onnx written", 1.0)

        report: dict[str, Any] = {
            "toptheta_export_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": loaded.name,
            "dtype": graph_dtype(stage / "model.onnx"),
            "kv_cache": graph_kv_cache(stage / "model.onnx"),
            "fusions": _graph_fusions(stage / "model.onnx"),
            "calibration": {
                "data": describe_data(calib),
                "k": k,
                "layer_k": th.meta.get("layer_k") or {},
                "dense_heads": th.meta.get("dense_heads") or {},
                "seq_len": seq_len,
                "num_samples": num_samples,
                "dense_layers": th.dense_layers,
                "comp_mode": comp_mode,
            },
            "files": sorted(p.name for p in stage.iterdir()),
            "library": library_info(),
        }
        if do_validate:
            t = time.perf_counter()
            from .eval.validation import validate

            report["validation"] = validate(
                stage,
                model=loaded,
                thresholds=th,
                data=calib if eval_data is None else eval_data,
                seq_len=seq_len,
                num_windows=eval_windows,
                skip=num_samples if eval_data is None else 0,
                decode_steps=decode_steps,
                device=device,
                threads=threads,
                progress=progress,
            )
            report["validation"]["onnx"] = "model.onnx"
            timings["validate_s"] = time.perf_counter() - t
        report["timings"] = timings
        write_json(stage / "report.json", report)
        report["files"] = sorted(p.name for p in stage.iterdir())
        write_json(stage / "report.json", report)
    return report


def tokenizer_for(out_dir: str | os.PathLike):
    """The tokenizer saved in an output folder at export time (no other folder is consulted)."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise TopThetaError(
            f"{out_dir} is not a folder: pass the folder written by 'topθ-export MODEL --calib DATA -o OUT'"
        )
    if not any((out_dir / name).is_file() for name in TOKENIZER_FILES):
        raise TopThetaError(
            f"{out_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): re-export it with "
            "'topθ-export MODEL --calib DATA -o OUT' from a model folder that has a tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a broken tokenizer.json)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TopThetaError(f"cannot load the tokenizer in {out_dir} ({first[:200]}): re-export the folder") from None
