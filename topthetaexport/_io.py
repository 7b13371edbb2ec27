"""Atomic writes: nothing half-written is ever left at a final path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from typing import Any, Iterator

from ._errors import TopThetaError

OUR_FILES = {"model.onnx", "model.onnx.data", "thresholds.safetensors", "thresholds.json", "report.json",
             "library.json"}


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``.

    Works for files and directories. On an exception the temporary path is removed and
    ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written to {target}")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, own_files=OUR_FILES, what: str = "a toptheta-export output") -> Any:
    """Yield a staging folder; on success it replaces ``out`` as a whole, on failure it is removed.

    ``out`` may be missing, empty, or a previous output of the same kind (only ``own_files`` in it);
    anything else is refused so that a mistyped ``-o`` never deletes a user's files.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise TopThetaError(f"output {out} exists and is not a folder: choose another -o")
        names = {p.name for p in out.iterdir()}
        if names and not names <= own_files:
            raise TopThetaError(f"output folder {out} is not empty and not {what}: choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
