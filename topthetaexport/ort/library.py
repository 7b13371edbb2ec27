"""Locate the custom-op library and open onnxruntime sessions with it registered."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal, overload

from .._errors import TopThetaError
from ..onnx.names import DOMAIN, OP_TYPE, OP_VERSION

LIBRARY_ENV = "TOPTHETA_OPS_LIBRARY"
LIBRARY_NAME = "libtoptheta_ops.so"


@overload
def library_path(required: Literal[True] = ...) -> Path: ...
@overload
def library_path(required: bool) -> Path | None: ...


def library_path(required: bool = True) -> Path | None:
    """Path of the custom-op shared library.

    Looked up in ``$TOPTHETA_OPS_LIBRARY`` first, then next to this package (``_lib/``), where
    ``pip install .`` puts it.
    """
    env = os.environ.get(LIBRARY_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise TopThetaError(f"{LIBRARY_ENV}={env} does not exist: point it at a built {LIBRARY_NAME} or unset it")
        return p
    p = Path(__file__).resolve().parent.parent / "_lib" / LIBRARY_NAME
    if p.is_file():
        return p
    if required:
        raise TopThetaError(
            f"custom-op library {LIBRARY_NAME} not found next to {Path(__file__).parent}: "
            f"build it with 'pip install .' (needs cmake and a C++ compiler) or set {LIBRARY_ENV}"
        )
    return None


@functools.lru_cache(maxsize=1)
def import_onnxruntime():
    """The onnxruntime module, or a one-line error naming the extra that installs it.

    The package depends on neither wheel by default: the extra ``[cpu]`` pulls ``onnxruntime``, ``[gpu]``
    ``onnxruntime-gpu`` (both install the module ``onnxruntime``, so only one of them may be installed)."""
    try:
        import onnxruntime
    except ImportError:
        raise TopThetaError(
            "onnxruntime is not installed: pip install 'topthetaexport[cpu]' (CPU) or 'topthetaexport[gpu]' "
            "(onnxruntime-gpu, NVIDIA GPUs)"
        ) from None
    return onnxruntime


def cuda_available() -> bool:
    ort = import_onnxruntime()

    return "CUDAExecutionProvider" in ort.get_available_providers()


def runs_on_cuda(device: str) -> bool:
    """Whether ``device`` resolves to CUDA in ``providers_for`` ('cuda' without a CUDA provider falls back)."""
    return device != "cpu" and cuda_available()


def providers_for(device: str = "auto") -> list[str]:
    """Execution providers for ``device`` in {'auto', 'cpu', 'cuda'}.

    'cuda' without onnxruntime-gpu (or without a GPU) falls back to CPU with a warning.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise TopThetaError(f"unknown device '{device}': use auto, cpu or cuda")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        warnings.warn(
            "CUDA requested but onnxruntime has no CUDAExecutionProvider here "
            "(install onnxruntime-gpu on a machine with an NVIDIA GPU); running on CPU",
            RuntimeWarning,
            stacklevel=2,
        )
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None, library: str | os.PathLike | None = None):
    """``onnxruntime.SessionOptions`` with the Top-θ library registered (``threads``: intra-op threads).

    ``library``: a library file, or an output folder / .onnx file (the library that ``session`` would load for
    it, checked against its ``library.json``); default: the installed one. For runtimes that open the session
    themselves, e.g. ``ORTModelForCausalLM.from_pretrained(OUT, session_options=tt.session_options(library=OUT))``.
    """
    ort = import_onnxruntime()

    so = ort.SessionOptions()
    lib = Path(library) if library else library_path()
    if lib.is_dir() or lib.suffix == ".onnx":
        lib = library_for(lib / "model.onnx" if lib.is_dir() else lib)
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # onnxruntime raises a bare RuntimeError/Fail
        raise TopThetaError(
            f"onnxruntime could not load the custom-op library {lib} ({str(e).splitlines()[0]}): "
            "rebuild it with 'pip install .'"
        ) from None
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def session(
    model_path: str | os.PathLike,
    *,
    device: str = "auto",
    threads: int | None = None,
    library: str | os.PathLike | None = None,
):
    """An ``onnxruntime.InferenceSession`` for ``model_path`` with the Top-θ library registered.

    ``model_path`` is an .onnx file or an output folder (its ``model.onnx``). When a ``library.json``
    lies beside the model, the library is checked against it: none to load is an error, another build
    (sha256) or another onnxruntime version a warning. ``device='auto'`` uses CUDA when onnxruntime-gpu
    sees a GPU, else CPU.
    """
    ort = import_onnxruntime()

    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.onnx"
    if not model_path.is_file():
        raise TopThetaError(f"ONNX model {model_path} does not exist: run 'topθ-export export' first")
    lib = Path(library) if library else library_for(model_path)
    so = session_options(threads, lib)
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=providers_for(device))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopThetaError(
            f"onnxruntime cannot load {model_path}: {first[:300]} (is it a complete ONNX file? re-export it)"
        ) from None


RECORD_FILE = "library.json"


def library_for(model_path: str | os.PathLike) -> Path:
    """The library to run ``model_path`` with, checked against the ``library.json`` written beside it at export.

    The installed (or ``$TOPTHETA_OPS_LIBRARY``) library comes first; without one the copy beside the model
    (``libtoptheta_ops.so``, written by the pipeline), then the recorded path.
    """
    ort = import_onnxruntime()

    record_path = Path(model_path).parent / RECORD_FILE
    if not record_path.is_file():
        return library_path()
    try:
        record = json.loads(record_path.read_text())
        recorded_lib, recorded_sha = record.get("path"), record["sha256"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise TopThetaError(
            f"{record_path} is not a library record written by topθ-export ({type(e).__name__}): "
            "re-run 'topθ-export export' or delete it"
        ) from None
    lib = library_path(required=False)
    bundled = record_path.parent / LIBRARY_NAME  # the copy the pipeline puts beside the model (deploy.py)
    if lib is None and bundled.is_file():
        lib = bundled
    if lib is None and recorded_lib and Path(recorded_lib).is_file():
        lib = Path(recorded_lib)
    if lib is None:
        raise TopThetaError(
            f"custom-op library {LIBRARY_NAME} for {model_path} not found (neither installed, nor beside it, nor at "
            f"{recorded_lib}, named in {record_path}): build it with 'pip install .' or set "
            f"{LIBRARY_ENV}"
        )
    sha = _sha256(lib)
    if sha != recorded_sha:
        warnings.warn(
            f"{model_path} was built with {LIBRARY_NAME} sha256 {recorded_sha[:12]}, this session loads "
            f"{lib} with sha256 {sha[:12]}: re-export if results differ",
            RuntimeWarning,
            stacklevel=3,
        )
    recorded_ort = record.get("onnxruntime_version")
    if recorded_ort and recorded_ort != ort.__version__:
        warnings.warn(
            f"{model_path} was built with onnxruntime {recorded_ort}, this is {ort.__version__}: "
            "re-export if results differ",
            RuntimeWarning,
            stacklevel=3,
        )
    return lib


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rebuilt file hashes again
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def library_info() -> dict[str, Any]:
    ort = import_onnxruntime()

    lib = library_path()
    return {
        "path": str(lib),
        "sha256": _sha256(lib),
        "onnxruntime_version": ort.__version__,
        "domain": DOMAIN,
        "op": OP_TYPE,
        "op_version": OP_VERSION,
    }
