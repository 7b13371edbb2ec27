"""Writing outputs and checking options: nothing half-written at a final path, no folders left by a failed run,
every option checked before any work."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import TopThetaError

# What an output folder of the pipeline may hold (glob patterns: tokenizer file names vary by model).
OUR_FILES = {
    "model.onnx",
    "model.onnx.data",
    "thresholds.safetensors",
    "thresholds.json",
    "report.json",
    "library.json",
    "config.json",
    "generation_config.json",
    "genai_config.json",
    "libtoptheta_ops.so",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
}


CACHE_ENV = "TOPTHETA_CACHE"


def cache_root() -> Path:
    """Root of the persistent cache (models, fetched GGUF): ``$TOPTHETA_CACHE`` or ``~/.cache/toptheta-export``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "toptheta-export")


def is_own_file(name: str, own_files=OUR_FILES) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in own_files)


def _unwritable(path: Path, e: OSError) -> TopThetaError:
    reason = e.strerror or type(e).__name__
    return TopThetaError(f"cannot write {path} ({reason}): choose an output path in a folder you can write to")


@contextlib.contextmanager
def output_parents(path: str | os.PathLike) -> Iterator[Path]:
    """Create the missing folders above ``path`` and check that the innermost one is writable.

    On an exception (Ctrl-C and SIGTERM included) the folders created here are removed again, innermost
    first, as long as they are empty; folders that existed before are never touched.
    """
    path = Path(path)
    made: list[Path] = []
    try:
        missing = []
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        # a real write test: permissions alone say nothing for root or on /proc-like file systems
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent))
    except OSError as e:
        _remove_empty(made)
        raise _unwritable(path, e) from None
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield path
    except BaseException:
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (someone else wrote there) or gone: leave it and everything above


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``.

    Works for files and directories. On an exception the temporary path (and any parent folder created
    for it) is removed and ``final`` is left as it was.
    """
    final = Path(final)
    with output_parents(final):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        except OSError as e:
            raise _unwritable(final, e) from None
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


def check_output_dir(out: str | os.PathLike, own_files=OUR_FILES, what: str = "a toptheta-export output") -> Path:
    """Refuse an ``out`` that is a file or a folder holding anything but ``own_files`` (a mistyped ``-o``)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise TopThetaError(f"output {out} exists and is not a folder: choose another -o")
        foreign = sorted(p.name for p in out.iterdir() if not is_own_file(p.name, own_files))
        if foreign:
            raise TopThetaError(
                f"output folder {out} is not empty and not {what} (it holds {foreign[0]}): choose another -o"
            )
    return out


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, own_files=OUR_FILES, what: str = "a toptheta-export output") -> Any:
    """Yield a staging folder; on success it replaces ``out`` as a whole, on failure it is removed.

    ``out`` may be missing, empty, or a previous output of the same kind (only ``own_files`` in it);
    anything else is refused so that a mistyped ``-o`` never deletes a user's files.
    """
    out = check_output_dir(out, own_files, what)
    with output_parents(out):
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        except OSError as e:
            raise _unwritable(out, e) from None
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


@contextlib.contextmanager
def staged_files(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder whose files are moved into ``out_dir`` (created if missing) on success.

    Unlike :func:`staged_output_dir` the other files of ``out_dir`` stay: this adds or replaces files.
    On failure nothing reaches ``out_dir``, and folders created for it are removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TopThetaError(f"output {out_dir} exists and is not a folder: choose another -o")
    with output_parents(out_dir):
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        except OSError as e:
            raise _unwritable(out_dir, e) from None
        made = False
        try:
            yield stage
            if not out_dir.exists():
                out_dir.mkdir()
                made = True
            for item in sorted(stage.iterdir()):
                target = out_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        except BaseException:
            if made:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Fail now, before any work, if files cannot be created in the existing ``folder``."""
    folder = Path(folder)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise _unwritable(folder, e) from None
    return folder


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
