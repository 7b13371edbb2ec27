"""Every numeric and choice option of the API and the CLI, checked in one place before any work starts."""

from __future__ import annotations

from ._errors import TopThetaError

COMP_MODES = {0: "none", 1: "SDC", 2: "SDC + V-mean"}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHES = ("auto", "concat", "shared")
FUSIONS = ("auto", "on", "off")
AGGREGATIONS = ("mean", "mean+sigma")
EXTRAPOLATIONS = ("fit", "last-row")

# API name -> (command-line flag, smallest allowed value); values may be ints or lists of ints
_MINIMUM = {
    "k": ("--k", 1),
    "seq_len": ("--seq-len", 2),
    "num_samples": ("--samples", 1),
    "dense_layers": ("--dense-layers", 0),
    "eval_windows": ("--eval-windows", 1),
    "num_windows": ("--windows", 1),
    "eval_cmd_windows": ("--windows", 2),
    "decode_steps": ("--decode-steps", 1),
    "task_items": ("--task-items", 1),
    "threads": ("--threads", 1),
    "max_new_tokens": ("--max-new-tokens", 1),
    "sweep": ("--sweep", 1),
    "heads": ("--heads", 1),
    "kv_heads": ("--kv-heads", 1),
    "head_dim": ("--head-dim", 1),
    "seqs": ("--seq", 1),
    "repeats": ("--repeats", 1),
    "max_context": ("--max-context", 2),
    "needle_trials": ("--needle-trials", 1),
}
_COMP = {"comp_mode": "--comp-mode", "comp_modes": "--comp-modes", "sweep_comp_modes": "--sweep-comp-modes"}


def check_options(**options) -> None:
    """Raise a one-line TopThetaError for the first option out of its range or choices (None = not given).

    Names are the API's (``k``, ``seq_len``, ``num_samples``, ``comp_mode``, ``device``, ``keep``, ...);
    messages name the command-line flag, since that is what most users typed.
    """
    for name, value in options.items():
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if name in _MINIMUM:
            flag, low = _MINIMUM[name]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise TopThetaError(
                        f"{flag} must be an integer >= {low}, got {v!r}: pass e.g. {flag} {max(low, 4)}"
                    )
        elif name in _COMP:
            for v in values:
                if isinstance(v, bool) or v not in COMP_MODES:
                    raise TopThetaError(
                        f"compensation mode {v!r} does not exist ({_COMP[name]}): use "
                        + ", ".join(f"{m} ({what})" for m, what in COMP_MODES.items())
                    )
        elif name == "device":
            if value not in DEVICES:
                raise TopThetaError(f"unknown device {value!r} (--device): use auto, cpu or cuda")
        elif name == "dtype":
            if value not in DTYPES:
                raise TopThetaError(f"unknown dtype {value!r} (--dtype): use auto, float32, float16 or bfloat16")
        elif name == "kv_cache":
            if value not in KV_CACHES:
                raise TopThetaError(f"unknown KV-cache form {value!r} (--kv-cache): use auto, concat or shared")
        elif name == "fusions":
            if value not in FUSIONS:
                raise TopThetaError(f"unknown fusions mode {value!r} (--fusions): use auto, on or off")
        elif name == "aggregation":
            if value not in AGGREGATIONS:
                raise TopThetaError(f"unknown aggregation {value!r} (--aggregation): use mean or mean+sigma")
        elif name == "sigma_c":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
                raise TopThetaError(f"--sigma-c must be a finite number >= 0, got {value!r}: pass e.g. --sigma-c 0.1")
        elif name == "theta_extrapolation":
            if value not in EXTRAPOLATIONS:
                raise TopThetaError(f"unknown --theta-extrapolation {value!r}: use fit or last-row")
        elif name == "k_growth":
            from .thresholds import check_k_growth

            check_k_growth(value)
        elif name == "layer_k":
            from .thresholds import parse_layer_k

            parse_layer_k(value)
        elif name == "dense_heads":
            from .thresholds import parse_dense_heads

            parse_dense_heads(value)
        elif name == "keep":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise TopThetaError(f"--keep must be a fraction in (0, 1], got {value!r}: pass e.g. --keep 0.125")
        else:
            raise TypeError(f"check_options: unknown option {name}")


def resolve_dtype(dtype: str, device: str, *, cuda: bool) -> str:
    """The dtype the exported model runs in: ``auto`` is float16 when the device resolves to CUDA (``cuda``:
    ``ort.library.runs_on_cuda(device)``), else float32.

    bfloat16 on CPU is refused before any work: the op's CPU kernel is registered for float32 and float16 only.
    """
    check_options(dtype=dtype, device=device)
    if dtype == "auto":
        return "float16" if cuda else "float32"
    if dtype == "bfloat16" and not cuda:
        raise TopThetaError(
            "--dtype bfloat16 needs --device cuda with onnxruntime-gpu and a GPU: TopThetaAttention's CPU kernel "
            "has only float32 and float16 (custom_ops/src/register.cc); use --dtype float16 or float32 on CPU"
        )
    return dtype


def resolve_kv_cache(
    kv_cache: str, device: str, *, cuda: bool, has_cache: bool = True, sliding_window: bool = False
) -> str:
    """The KV-cache form of the rewritten graph: ``auto`` is ``shared`` (one preallocated buffer per layer and kind,
    written in place) when the device resolves to CUDA (``cuda``, as for ``resolve_dtype``) and the model has a
    cache without sliding-window layers, else ``concat`` (the graph concatenates past and new K/V each step).

    ``shared`` for a model without a KV cache (an encoder, an export without the cache) is refused; for one with a
    sliding window (Gemma 2/3, Mistral, Phi-3 windows: their layers keep 4-D masks) the rewrite refuses it.
    """
    check_options(kv_cache=kv_cache, device=device)
    if kv_cache == "auto":
        return "shared" if cuda and has_cache and not sliding_window else "concat"
    if kv_cache == "shared" and not has_cache:
        raise TopThetaError(
            "--kv-cache shared needs a decoder exported with its KV cache, and this model has none: "
            "use --kv-cache concat (or auto)"
        )
    return kv_cache


def resolve_fusions(fusions: str, dtype: str, *, cuda: bool) -> str:
    """Whether the rewritten graph gets onnxruntime's fused kernels outside attention (``onnx.fusions``): ``auto``
    is ``on`` for a float16/bfloat16 graph on CUDA (``cuda`` as for ``resolve_dtype``; ``dtype`` resolved), where
    the decode step is many small kernels, else ``off``, so the CPU path stays exactly as it was."""
    check_options(fusions=fusions)
    if fusions == "auto":
        return "on" if cuda and dtype in ("float16", "bfloat16") else "off"
    return fusions
