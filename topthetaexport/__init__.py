"""toptheta-export: Top-θ sparse attention, calibrated in PyTorch, exported to ONNX, run in onnxruntime.

The public API mirrors the command line::

    import topthetaexport as tt
    loaded = tt.load_model("smollm2-135m")
    th = tt.calibrate(loaded, "builtin:pydoc", k=64)
    tt.export(loaded, th, "out/")            # dense export + rewrite, writes out/model.onnx
    sess = tt.session("out/model.onnx")      # onnxruntime session with the custom op registered
    report = tt.validate("out/", data="builtin:pydoc")
    acc = tt.evaluate("out/", output="eval/", sweep=[32, 128])  # dense / top-k / Top-θ through onnxruntime

Heavy modules (torch, transformers) are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TopThetaError": "._errors",
    "load_model": ".models",
    "LoadedModel": ".models",
    "DEFAULT_MODEL": ".models",
    "calibrate": ".calibrate",
    "Thresholds": ".thresholds",
    "load_thresholds": ".thresholds",
    "export_onnx": ".export",
    "rewrite": ".rewrite",
    "export": ".pipeline",
    "run_pipeline": ".pipeline",
    "validate": ".validate",
    "evaluate": ".evaluate",
    "session": ".runtime",
    "library_path": ".runtime",
    "toptheta_attention": ".reference",
    "attention_mode": ".torch_attention",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'topthetaexport' has no attribute '{name}'")
    if name == "load_thresholds":
        from .thresholds import Thresholds

        return Thresholds.load
    return getattr(importlib.import_module(mod, __name__), name)
