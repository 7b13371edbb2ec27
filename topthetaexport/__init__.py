"""toptheta-export: Top-θ sparse attention, calibrated in PyTorch, exported to ONNX, run in onnxruntime.

The public API mirrors the command line::

    import topthetaexport as tt
    loaded = tt.load_model("smollm2-135m")
    th = tt.calibrate(loaded, "builtin:pydoc", k=64)
    tt.export(loaded, th, "out/")            # dense export + rewrite, writes out/model.onnx
    sess = tt.session("out/model.onnx")      # onnxruntime session with the custom op registered
    so = tt.session_options(library="out/")  # SessionOptions with out/'s library (optimum, your own sessions)
    res = tt.generate("out/", [1, 2, 3], 32)  # greedy, cache on the device; res.tokens, res.prefill_ms, ...
    report = tt.validate("out/", data="builtin:pydoc")
    acc = tt.evaluate("out/", output="eval/", sweep=[32, 128])  # dense / top-k / Top-θ through onnxruntime

Heavy modules (torch, transformers) are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. No module of the package shares a name with a public function,
# so importing a stage never shadows the function (``tt.export`` is always the function).
_LAZY = {
    "TopThetaError": "._errors",
    "load_model": ".models",
    "LoadedModel": ".models",
    "DEFAULT_MODEL": ".models",
    "Thresholds": ".thresholds",
    "calibrate": ".torch.calibration",
    "toptheta_attention": ".torch.reference",
    "attention_mode": ".torch.attention",
    "export_onnx": ".onnx.exporter",
    "rewrite": ".onnx.rewriter",
    "session": ".ort.library",
    "generate": ".ort.device_generation",
    "session_options": ".ort.library",
    "library_path": ".ort.library",
    "validate": ".eval.validation",
    "evaluate": ".eval.evaluation",
    "export": ".pipeline",
    "run_pipeline": ".pipeline",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'topthetaexport' has no attribute '{name}'")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
