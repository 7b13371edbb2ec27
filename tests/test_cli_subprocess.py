"""Every subcommand as its own process, as a user runs it: exit codes, stdout, one-line errors on stderr, signals.

The installed entry point (``toptheta-export``) when this interpreter has it, else the source tree's CLI through
tests/_cli_launcher.py. Tiny LLaMA with a BPE tokenizer (conftest), 64-token windows, a couple of windows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from topthetaexport._io import is_own_file

SIZE = ["--k", "8", "--seq-len", "64", "--samples", "2", "--dense-layers", "1"]


def _cli_command() -> list[str]:
    try:
        import topthetaexport.cli.main  # noqa: F401  (installed layout)
    except ImportError:
        return [sys.executable, str(Path(__file__).with_name("_cli_launcher.py"))]
    script = Path(sys.executable).with_name("toptheta-export")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "topthetaexport.cli.main"]


CLI = _cli_command()


def cli(*args, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr[-3000:]!r}"
    return lines[0]


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    return res


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_bpe) -> Path:
    """A folder with the model (``model/``, used by a relative path) and a small prose text (``calib.txt``)."""
    from topthetaexport.data import load_texts

    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(tiny_llama_bpe, root / "model")
    (root / "calib.txt").write_text("\n\n\n".join(load_texts("builtin:pydoc")[6:40]))
    return root


@pytest.fixture(scope="module")
def pipeline(work) -> Path:
    """The one-shot command, with the model given by a relative path."""
    res = ok(cli("model", "--calib", "calib.txt", "-o", "out", *SIZE, "--eval-windows", "2", cwd=work))
    assert "Top-θ summary" in res.stdout
    return work / "out"


@pytest.mark.slow  # the one-shot pipeline in a subprocess (about a minute)
def test_out_is_self_contained(pipeline, work):
    names = {p.name for p in pipeline.iterdir()}
    assert {
        "model.onnx",
        "thresholds.safetensors",
        "thresholds.json",
        "library.json",
        "report.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert all(is_own_file(n) for n in names), sorted(n for n in names if not is_own_file(n))
    assert set(json.loads((pipeline / "report.json").read_text())["files"]) == names
    assert not [n for n in os.listdir(work) if n.startswith(".")]


def _numbers(obj, prefix=""):
    """Flattened numeric leaves of a report, timings left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "seconds" not in k and k != "timings" and not k.endswith("_s"):
                yield from _numbers(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


@pytest.mark.slow  # the one-shot pipeline in a subprocess (about a minute)
def test_stage_by_stage_processes_match_the_pipeline(pipeline, work):
    """calibrate → export → rewrite → validate, each its own process, give the one-shot command's numbers."""
    ok(cli("calibrate", "model", "--calib", "calib.txt", "-o", "staged", *SIZE, cwd=work))
    ok(cli("export", "model", "-o", "dense/dense.onnx", cwd=work))
    res = ok(cli("rewrite", "dense/dense.onnx", "--thresholds", "staged", "-o", "staged/model.onnx", cwd=work))
    assert "rewrote 3 attention blocks" in res.stdout
    res = ok(cli("validate", "staged", "--data", "calib.txt", "--windows", "2", cwd=work))
    assert "Top-θ summary" in res.stdout
    staged = json.loads((work / "staged" / "report.json").read_text())["validation"]
    one_shot = json.loads((pipeline / "report.json").read_text())["validation"]
    a, b = dict(_numbers(staged)), dict(_numbers(one_shot))
    common = sorted(set(a) & set(b))
    assert len(common) > 20 and {".perplexity.toptheta_onnx", ".parity.max_abs_diff_vs_torch_toptheta"} <= set(common)
    differ = [(k, a[k], b[k]) for k in common if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7)]
    assert not differ, differ[:10]
    assert not [n for n in os.listdir(work) if n.startswith(".")]


@pytest.mark.slow  # the one-shot pipeline in a subprocess (about a minute)
def test_run_and_session_need_only_out(pipeline, tmp_path):
    """OUT/ copied elsewhere, run from another folder: the relative model path in its metadata is never used."""
    import warnings

    import topthetaexport as tt

    copy = tmp_path / "elsewhere" / "out"
    shutil.copytree(pipeline, copy)
    res = ok(cli("run", "elsewhere/out", "--prompt", "The object", "--max-new-tokens", "4", cwd=tmp_path))
    assert res.stdout.startswith("The object") and len(res.stdout.strip()) > len("The object")
    # a library.json from another build: one warning line each for the library and onnxruntime, still runs
    record = json.loads((copy / "library.json").read_text())
    (copy / "library.json").write_text(json.dumps({**record, "sha256": "0" * 64, "onnxruntime_version": "0.0"}))
    res = ok(cli("run", "elsewhere/out", "--prompt", "The", "--max-new-tokens", "2", cwd=tmp_path))
    warned = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert any("sha256 000000000000" in ln for ln in warned) and any("onnxruntime 0.0" in ln for ln in warned)
    with pytest.warns(RuntimeWarning, match="sha256 000000000000"):
        sess = tt.session(copy)  # the folder, not only the .onnx file
    assert "input_ids" in {i.name for i in sess.get_inputs()}
    (copy / "library.json").write_text(json.dumps(record))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tt.session(copy / "model.onnx")
    # no library anywhere: one line naming library.json
    env = {k: v for k, v in os.environ.items() if k != "TOPTHETA_OPS_LIBRARY"}
    (copy / "library.json").write_text(json.dumps({**record, "path": str(tmp_path / "gone.so")}))
    code = "from topthetaexport.ort.library import library_path as p; print(p(required=False))"
    probe = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, check=False
    )
    if probe.stdout.strip() != "None":
        pytest.skip("an installed library is found without TOPTHETA_OPS_LIBRARY")
    res = cli("run", "elsewhere/out", "--prompt", "The", "--max-new-tokens", "2", cwd=tmp_path, env=env)
    assert res.returncode == 2
    assert "library.json" in one_line(res.stderr) and "pip install" in res.stderr


@pytest.mark.slow  # builds and evaluates an output in subprocesses
def test_run_refuses_out_without_tokenizer(pipeline, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(pipeline, copy)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    res = cli("run", copy, "--prompt", "x", cwd=tmp_path)
    assert res.returncode == 2 and "holds no tokenizer files" in one_line(res.stderr)


def _prose(path: Path) -> Path:
    """Short plain sentences: the tiny tokenizer finds sentence starts in them (pydoc's text gives too few)."""
    import random

    rng = random.Random(0)
    subjects = ["The parser", "This function", "The module", "A class", "The list", "Each object"]
    verbs = ["returns", "reads", "creates", "raises", "evaluates", "defines", "accepts", "stores"]
    objects = ["a new value", "the first item", "an error", "the whole file", "a string of text", "every element"]
    path.write_text(
        " ".join(
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} when it is called." for _ in range(300)
        )
    )
    return path


@pytest.mark.slow  # builds and evaluates an output in subprocesses
def test_eval_reads_task_specs(pipeline, work, tmp_path):
    prose = _prose(tmp_path / "prose.txt")
    items = [
        {"ctx": "The with statement is used to", "endings": [" wrap a block.", " eat soup."], "label": 0},
        {"ctx": "A list is", "endings": [" a mutable sequence.", " a colour."], "label": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    ev = tmp_path / "ev"
    res = ok(
        cli(
            "eval",
            pipeline,
            "-o",
            ev,
            "--windows",
            "4",
            "--task-items",
            "3",
            "--comp-modes",
            "0",
            "--no-topk",
            "--tasks",
            "cloze:prose.txt,mc.jsonl",
            cwd=tmp_path,
        )
    )
    assert "wrote" in res.stdout
    rep = json.loads((ev / "eval.json").read_text())
    kinds = {t["name"]: t["kind"] for t in rep["tasks"]}
    assert kinds["cloze:prose.txt"] == "choice" and kinds["mc.jsonl"] == "choice"
    dense = rep["variants"][0]
    assert dense["tasks"]["mc.jsonl"]["items"] == 2 and dense["tasks"]["cloze:prose.txt"]["items"] == 3
    assert prose.is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_inspect(pipeline, work):
    info = json.loads(ok(cli("inspect", "out", "--json", cwd=work)).stdout)
    assert [n["layer"] for n in info["toptheta_nodes"]] == [0, 1, 2]
    assert "TopThetaAttention: 3 nodes" in ok(cli("inspect", "out/model.onnx", cwd=work)).stdout


def test_bench_runs_prefill_and_decode(tmp_path):
    res = ok(
        cli(
            "bench",
            "--seq",
            "16,24",
            "--repeats",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            cwd=tmp_path,
        )
    )
    rows = [ln for ln in res.stdout.splitlines() if "prefill" in ln or "decode" in ln]
    assert len(rows) == 4 and sum("decode" in r for r in rows) == 2


def test_bench_dense_references_equal_toptheta_keeping_everything():
    """θ = -inf keeps every key: TopThetaAttention must equal every dense reference the bench times (ONNX
    Attention, MultiHeadAttention, GroupQueryAttention) in both phases, so the benchmark compares the same
    attention (causal bottom-right for the decode row)."""
    import numpy as np
    import onnxruntime as ort

    from topthetaexport.ort import bench
    from topthetaexport.ort.library import session_options

    hq, hkv, d, t = 4, 2, 8, 12
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((1, hkv, t, d), dtype=np.float32) for _ in range(2))
    theta = np.full(hq, -np.inf, np.float32)
    for phase, s in (("prefill", t), ("decode", 1)):
        q = rng.standard_normal((1, hq, s, d), dtype=np.float32)
        models = bench._graphs(hq, hkv, d, d**-0.5, phase)
        assert set(models) == {"toptheta", bench.DENSE, "mha", "gqa"}
        outputs = {}
        for method, model in models.items():
            sess = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
            y = sess.run(None, bench._feeds(method, q, k, v, theta))[0]
            outputs[method] = y if y.ndim == 4 else y.reshape(1, s, hq, d).transpose(0, 2, 1, 3)
        for method, y in outputs.items():
            np.testing.assert_allclose(outputs["toptheta"], y, atol=1e-5, err_msg=f"{phase}: {method}")


# -- bad input: one line on stderr, exit 2, nothing written --------------------------------------------

BAD_OPTIONS = [
    (["pipeline", "{model}", "--calib", "{calib}", "-o", "a/b/out", "--comp-mode", "7"], "--comp-mode"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--device", "tpu"], "--device"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--eval-windows", "0"], "--eval-windows"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--k", "0"], "--k"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--seq-len", "1"], "--seq-len"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--samples", "0"], "--samples"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--dense-layers", "-1"], "--dense-layers"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--k", "abc"], "Invalid value for '--k'"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--nope"], "No such option: --nope"),
    (["calibrate", "{model}", "--calib", "{calib}", "-o", "a/b/th", "--samples", "0"], "--samples"),
    (["rewrite", "dense.onnx", "--thresholds", "th", "-o", "a/b/m.onnx", "--comp-mode", "3"], "--comp-mode"),
    (["rewrite", "dense.onnx", "--thresholds", "th", "-o", "a/b/m.onnx", "--kv-cache", "ring"], "--kv-cache"),
    (["{model}", "--calib", "{calib}", "-o", "a/b/out", "--kv-cache", "ring"], "--kv-cache"),
    (["rewrite", "dense.onnx", "--thresholds", "th", "-o", "a/b/m.onnx", "--fusions", "all"], "--fusions"),
    (["validate", "{out}", "--windows", "0"], "--windows"),
    (["validate", "{out}", "--device", "tpu"], "--device"),
    (["eval", "{out}", "-o", "a/b/ev", "--windows", "1"], "--windows"),
    (["eval", "{out}", "-o", "a/b/ev", "--comp-modes", "0,7"], "compensation mode 7"),
    (["eval", "{out}", "-o", "a/b/ev", "--sweep", "0"], "--sweep"),
    (["eval", "{out}", "-o", "a/b/ev", "--tasks", "foo:bar"], "unknown task kind 'foo'"),
    (["eval", "{out}", "-o", "a/b/ev", "--tasks", "notes.txt"], "cloze:notes.txt"),
    (["run", "{out}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "--keep", "0"], "--keep"),
    (["bench", "--seq", "16,x"], "--seq must be comma-separated integers"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--heads", "3", "--kv-heads", "2", "--seq", "8", "--repeats", "1"], "not a multiple of --kv-heads"),
]


@pytest.mark.parametrize("args,expect", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_options_fail_first_in_one_line(args, expect, work, tmp_path):
    fill = {"model": work / "model", "calib": work / "calib.txt", "out": tmp_path / "given"}
    (tmp_path / "given").mkdir()
    before = listing(tmp_path)
    res = cli(*[a.format(**fill) for a in args], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    line = one_line(res.stderr)
    assert line.startswith("error:") and expect in line, line
    assert listing(tmp_path) == before


UNWRITABLE = [
    ["{model}", "--calib", "{calib}", "-o", "/proc/x"],
    ["{model}", "--calib", "{calib}", "-o", "/proc/x/y/out"],
    ["{model}", "--calib", "{calib}", "-o", "{file}/out"],
    ["calibrate", "{model}", "--calib", "{calib}", "-o", "/proc/x"],
    ["export", "{model}", "-o", "/proc/x/dense.onnx"],
    ["rewrite", "dense.onnx", "--thresholds", "th", "-o", "/proc/x/model.onnx"],
    ["eval", "{model}", "-o", "/proc/x"],
    ["validate", "/proc"],
]


@pytest.mark.parametrize("args", UNWRITABLE, ids=[" ".join(a[:1] + a[-1:]) for a in UNWRITABLE])
def test_unwritable_output_is_one_line(args, work, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    fill = {"model": work / "model", "calib": work / "calib.txt", "file": tmp_path / "afile"}
    args = [a.format(**fill) for a in args]
    before = listing(tmp_path)
    res = cli(*args, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    line = one_line(res.stderr)
    target = args[-1] if args[0] != "validate" else "/proc"
    assert line.startswith(f"error: cannot write {target}") and "choose" in line, line
    assert listing(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = cli(work / "model", "--calib", work / "calib.txt", "-o", ro / "out", cwd=tmp_path)
        assert res.returncode == 2 and f"cannot write {ro / 'out'}" in one_line(res.stderr)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize(
    "command",
    ["pipeline", pytest.param("calibrate", marks=pytest.mark.slow), pytest.param("export", marks=pytest.mark.slow)],
)
def test_failed_run_removes_the_folders_it_made(command, work, tmp_path):
    """-o a/b/out on a failing run: a/ and a/b/ were made by this run, so they go; x/ existed, so it stays."""
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "x").mkdir()
    args = {
        "pipeline": [work / "model", "--calib", "empty.txt", *SIZE],
        "calibrate": ["calibrate", work / "model", "--calib", "empty.txt", *SIZE],
        "export": ["export", work / "model"],
    }[command]
    target = {"export": "{}/b/dense.onnx.txt"}.get(command, "{}/b/out")  # export: a wrong suffix fails after load
    for top in ("a", "x"):
        before = listing(tmp_path)
        res = cli(*args, "-o", target.format(top), cwd=tmp_path, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert one_line(res.stderr).startswith("error:")
        assert listing(tmp_path) == before


# -- signals: one line, 130 / 143, nothing left ----------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_export_cleans_up(sig, code, work, tmp_path):
    shutil.copy(work / "calib.txt", tmp_path / "calib.txt")
    before = listing(tmp_path)
    proc = subprocess.Popen(
        [*CLI, str(work / "model"), "--calib", "calib.txt", "-o", "sub/out", *SIZE],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the pipeline's staging folder, then export's own one beside it: the process is inside export
        deadline = time.monotonic() + 300
        while len(list((tmp_path / "sub").glob(".*.partial"))) < 2:
            assert proc.poll() is None, f"finished before export: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "export never started"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "partial output removed" in one_line(err)
    assert listing(tmp_path) == before
