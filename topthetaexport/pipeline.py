"""The whole job: calibrate → export → rewrite → validate, writing one output folder atomically."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .data import describe_data
from .ort.library import library_info, library_path
from ._errors import TopThetaError
from ._io import staged_output_dir, write_json
from .progress import Progress





def export(model, thresholds, out_dir: str | os.PathLike, *, comp_mode: int = 0,
           progress: Progress | None = None) -> Path:
    """Export ``model`` to ONNX and rewrite its attention into TopThetaAttention: ``out_dir/model.onnx``.

    Also saves the thresholds and ``library.json`` next to it. Returns the model path.
    """
    from .onnx.exporter import export_onnx
    from .models import LoadedModel, load_model
    from .onnx.rewriter import rewrite
    from .thresholds import Thresholds

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.load(thresholds)
    th.check_compatible(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toptheta-dense-", dir=out_dir) as tmp:
        dense = export_onnx(loaded, Path(tmp) / "dense.onnx", progress=progress)
        rewrite(dense, th, out_dir / "model.onnx", comp_mode=comp_mode)
    th.save(out_dir)
    write_json(out_dir / "library.json", library_info())
    return out_dir / "model.onnx"


def run_pipeline(model: str, calib, out: str | os.PathLike, *, k: int = 64, seq_len: int = 512,
                 num_samples: int = 16, dense_layers: int = 2, comp_mode: int = 0, eval_data=None,
                 eval_windows: int = 4, decode_steps: int = 16, do_validate: bool = True,
                 device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """calibrate → export → rewrite → validate into ``out``; returns the report (also ``out/report.json``)."""
    from .torch.calibration import calibrate
    from .models import load_model

    prog = progress or (lambda stage, message, fraction: None)
    library_path()  # fail early, before minutes of calibration, if the library is missing
    timings: dict[str, float] = {}
    with staged_output_dir(out) as stage:
        t = time.perf_counter()
        prog("load", f"loading {model}", 0.0)
        loaded = load_model(model)
        prog("load", loaded.name, 1.0)
        timings["load_s"] = time.perf_counter() - t

        t = time.perf_counter()
        th = calibrate(loaded, calib, k=k, seq_len=seq_len, num_samples=num_samples,
                       dense_layers=dense_layers, progress=progress)
        th.meta["model_path"] = str(model)
        timings["calibrate_s"] = time.perf_counter() - t
        prog("calibrate", "thresholds ready", 1.0)

        t = time.perf_counter()
        export(loaded, th, stage, comp_mode=comp_mode, progress=progress)
        timings["export_s"] = time.perf_counter() - t
        prog("export", "model.onnx written", 1.0)

        report: dict[str, Any] = {
            "toptheta_export_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": loaded.name,
            "calibration": {"data": describe_data(calib), "k": k, "seq_len": seq_len, "num_samples": num_samples,
                            "dense_layers": th.dense_layers, "comp_mode": comp_mode},
            "files": sorted(p.name for p in stage.iterdir()),
            "library": library_info(),
        }
        if do_validate:
            t = time.perf_counter()
            from .eval.validation import validate

            report["validation"] = validate(
                stage, model=loaded, thresholds=th, data=calib if eval_data is None else eval_data, seq_len=seq_len,
                num_windows=eval_windows, skip=num_samples if eval_data is None else 0,
                decode_steps=decode_steps, device=device,
                progress=progress)
            report["validation"]["onnx"] = "model.onnx"
            timings["validate_s"] = time.perf_counter() - t
        report["timings"] = timings
        write_json(stage / "report.json", report)
        report["files"] = sorted(p.name for p in stage.iterdir())
        write_json(stage / "report.json", report)
    return report


def tokenizer_for(out_dir: str | os.PathLike):
    """The tokenizer of the model an output folder was built from (named in its thresholds metadata)."""
    from .models import load_model
    from .thresholds import Thresholds

    th = Thresholds.load(out_dir)
    name = th.meta.get("model_path") or th.meta.get("model")
    loaded = load_model(name)
    if loaded.tokenizer is None:
        raise TopThetaError(f"model {name} has no tokenizer: 'run' needs a model folder with tokenizer files")
    return loaded.tokenizer
