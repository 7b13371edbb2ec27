"""The whole job through the Python API and the command line: outputs, report, errors, no partial output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_tokens

try:  # installed layout: the CLI lives in topthetaexport.cli
    from topthetaexport.cli.main import main as cli_main
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli.main import main as cli_main


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow  # over 10 s: exports a model through torch.onnx
def test_pipeline_tiny_llama_writes_everything(tmp_path, tiny_llama):
    from topthetaexport.pipeline import run_pipeline

    out = tmp_path / "out"
    report = run_pipeline(
        str(tiny_llama),
        make_tokens(3, 48, seed=1),
        out,
        k=6,
        seq_len=48,
        num_samples=3,
        dense_layers=1,
        comp_mode=2,
        eval_data=make_tokens(2, 48, seed=2),
        eval_windows=2,
        decode_steps=4,
    )
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "thresholds.safetensors", "thresholds.json", "library.json", "report.json"} <= names
    assert _leftovers(tmp_path) == []
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["validation"]["parity"] == report["validation"]["parity"]
    v = report["validation"]
    # exported Top-θ model vs the PyTorch Top-θ reference, fp32
    assert v["parity"]["max_abs_diff_vs_torch_toptheta"] <= 1e-4
    assert v["parity"]["operator_max_abs_diff_vs_fp64_reference"] <= 1e-5
    assert v["parity"]["dense_fp32_floor"] <= 1e-4
    assert v["parity"]["keep_decisions_window0"]["rows_with_different_kept_count"] == 0
    # the thresholds prune: fewer kept elements than dense, layer 0 stays dense
    ae = v["attention_elements"]
    assert ae["per_layer_kept_fraction"][0] == 1.0
    assert 0.0 < ae["sparse_layers_kept_fraction"] < 0.8
    assert ae["reduction"] > 1.2
    # decode through the KV cache reproduces prefill logits and reads fewer V rows
    assert v["decode"]["max_abs_diff_decode_vs_prefill"] <= 1e-4
    assert v["decode"]["v_rows_kept_per_step"] < v["decode"]["v_rows_dense_per_step"]
    assert set(v["compensation"]) == {"none", "sdc", "sdc+vmc"}
    assert v["compensation"]["sdc+vmc"]["perplexity"] == pytest.approx(v["perplexity"]["toptheta_onnx"])
    lib = json.loads((out / "library.json").read_text())
    from topthetaexport.ort.library import library_path

    assert Path(lib["path"]) == library_path()


@pytest.mark.slow  # over 10 s: exports a model through torch.onnx
def test_cli_stages_and_inspect(tmp_path, tiny_gpt2, capsys):
    """export → rewrite → inspect through the CLI on a tiny GPT-2 with thresholds from the API."""
    from topthetaexport.torch.calibration import calibrate

    th = calibrate(str(tiny_gpt2), make_tokens(2, 40), k=5, seq_len=40, num_samples=2, dense_layers=0, progress=None)
    th_dir = tmp_path / "th"
    th.save(th_dir)
    dense = tmp_path / "dense.onnx"
    rc, _, err = _run_cli(capsys, "export", tiny_gpt2, "-o", dense)
    assert rc == 0, err
    final = tmp_path / "model.onnx"
    rc, out, err = _run_cli(capsys, "rewrite", dense, "--thresholds", th_dir, "-o", final, "--comp-mode", "1")
    assert rc == 0, err
    assert "3 attention blocks" in out
    rc, out, err = _run_cli(capsys, "inspect", final, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert json.dumps(info).count("TopThetaAttention") >= 1
    assert [n["layer"] for n in info["toptheta_nodes"]] == [0, 1, 2]
    rc, out, err = _run_cli(capsys, "inspect", final)
    assert rc == 0, err
    # shapes keep their brackets (no console markup), the 3 layers' caches collapse into one line each
    assert "input_ids: int64 [batch, sequence]" in out
    assert "past_key_values.{0..2}.key: float [batch, " in out
    assert "TopThetaAttention: 3 nodes" in out and out.count("comp_mode 1") == 3
    import onnx

    ops = [n.op_type for n in onnx.load(str(final)).graph.node]
    assert ops.count("TopThetaAttention") == 3 and "Attention" not in ops


def _one_error_line(err: str) -> str:
    """The error message: one line starting with 'error:' (progress bars may precede it on stderr)."""
    assert "error:" in err, f"no error printed: {err!r}"
    tail = err[err.rindex("error:") :].strip()
    assert "\n" not in tail, f"error spans several lines: {tail!r}"
    assert "Traceback" not in err
    return tail


def test_cli_missing_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run_cli(capsys, tmp_path / "no-such-model", "--calib", "builtin:pydoc", "-o", out)
    assert rc == 2
    assert "nor an existing directory" in _one_error_line(err)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_cli_empty_calibration_data(tmp_path, tiny_llama, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    rc, _, err = _run_cli(capsys, tiny_llama, "--calib", empty, "-o", out)
    assert rc == 2
    _one_error_line(err)
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow  # over 10 s: exports a model through torch.onnx
def test_pipeline_calibrates_on_mixed_text(tmp_path, tiny_llama_bpe, capsys):
    """--calib A,B: the calibration takes windows in turn from both texts, the report names the mix, and a part
    that cannot be read fails in one line before any work."""
    from topthetaexport.data import token_batches
    from topthetaexport.models import load_model

    notes = tmp_path / "notes.txt"
    notes.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    mix = f"builtin:pydoc,{notes}"
    out = tmp_path / "out"
    rc, _, err = _run_cli(
        capsys,
        tiny_llama_bpe,
        "--calib",
        mix,
        "-o",
        out,
        "--k",
        "6",
        "--seq-len",
        "32",
        "--samples",
        "4",
        "--dense-layers",
        "1",
        "--eval-windows",
        "2",
    )
    assert rc == 0, err
    meta = json.loads((out / "thresholds.json").read_text())
    assert meta["calib_source"] == mix and meta["num_samples"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["perplexity"]["toptheta_onnx"] > 0
    tok = load_model(str(tiny_llama_bpe)).tokenizer
    windows = token_batches(tok, mix, seq_len=32, num_samples=4)
    assert windows[1].tolist() == token_batches(tok, notes, seq_len=32, num_samples=1)[0].tolist()
    missing = tmp_path / "missing.txt"
    rc, _, err = _run_cli(capsys, tiny_llama_bpe, "--calib", f"builtin:pydoc,{missing}", "-o", tmp_path / "o2")
    assert rc == 2 and "missing.txt does not exist" in _one_error_line(err)
    assert not (tmp_path / "o2").exists()


def test_cli_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    th_dir = tmp_path / "th"
    import torch

    from topthetaexport.thresholds import Thresholds

    Thresholds(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), {"num_layers": 2, "num_heads": 4}).save(th_dir)
    out = tmp_path / "model.onnx"
    rc, _, err = _run_cli(capsys, "rewrite", bad, "--thresholds", th_dir, "-o", out)
    assert rc == 2
    assert "not a valid ONNX model" in _one_error_line(err)
    assert not out.exists()
    rc, _, err = _run_cli(capsys, "inspect", bad)
    assert rc == 2
    _one_error_line(err)


@pytest.mark.slow  # over 10 s: exports a model through torch.onnx
def test_cli_thresholds_of_wrong_shape(tmp_path, tiny_llama, capsys):
    import torch

    from topthetaexport.thresholds import Thresholds

    dense = tmp_path / "dense.onnx"
    assert _run_cli(capsys, "export", tiny_llama, "-o", dense)[0] == 0
    th_dir = tmp_path / "th"
    Thresholds(torch.zeros(3, 7, 16), torch.zeros(3, 7, 16), {"num_layers": 3, "num_heads": 7}).save(th_dir)
    out = tmp_path / "model.onnx"
    rc, _, err = _run_cli(capsys, "rewrite", dense, "--thresholds", th_dir, "-o", out)
    assert rc == 2
    line = _one_error_line(err)
    assert "layer" in line and "7" in line
    assert not out.exists()


def test_cli_library_missing(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.setenv("TOPTHETA_OPS_LIBRARY", str(tmp_path / "libnothing.so"))
    out = tmp_path / "out"
    rc, _, err = _run_cli(capsys, tiny_llama, "--calib", "builtin:pydoc", "-o", out)
    assert rc == 2
    assert "TOPTHETA_OPS_LIBRARY" in _one_error_line(err)
    assert not out.exists()


def test_refuses_foreign_output_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc, _, err = _run_cli(capsys, "smollm2-135m", "--calib", "builtin:pydoc", "-o", out)
    assert rc == 2
    assert "not empty" in _one_error_line(err)
    assert (out / "thesis.tex").read_text() == "precious"


def test_cuda_request_falls_back_to_cpu_with_warning():
    import onnxruntime as ort

    from topthetaexport.ort.library import providers_for

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(RuntimeWarning, match="running on CPU"):
        assert providers_for("cuda") == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_default_model_pipeline_and_run(tmp_path, capsys, smollm2):
    """The real SmolLM2-135M through the CLI at a small size, then generation and inspect on its output."""
    out = tmp_path / "smol"
    rc, stdout, err = _run_cli(
        capsys,
        "smollm2-135m",
        "--calib",
        "builtin:pydoc",
        "-o",
        out,
        "--k",
        "32",
        "--seq-len",
        "128",
        "--samples",
        "2",
        "--eval-windows",
        "1",
    )
    assert rc == 0, err
    assert "Top-θ summary" in stdout
    v = json.loads((out / "report.json").read_text())["validation"]
    assert v["parity"]["operator_max_abs_diff_vs_fp64_reference"] <= 1e-4
    assert v["parity"]["dense_fp32_floor"] <= 5e-4
    assert v["attention_elements"]["reduction"] > 1.5
    assert v["decode"]["v_rows_reduction"] > 1.5
    assert abs(v["perplexity"]["relative_change"]) < 0.25
    rc, stdout, err = _run_cli(capsys, "run", out, "--prompt", "def fibonacci(n):", "--max-new-tokens", "8")
    assert rc == 0, err
    assert stdout.startswith("def fibonacci(n):") and len(stdout.strip()) > len("def fibonacci(n):")
    rc, stdout, err = _run_cli(capsys, "inspect", out)
    assert rc == 0, err
    assert "30" in stdout


@pytest.mark.parametrize(
    "bad,flag",
    [
        ({"comp_mode": 7}, "--comp-mode"),
        ({"device": "tpu"}, "--device"),
        ({"eval_windows": 0}, "--eval-windows"),
        ({"k": 0}, "--k"),
        ({"seq_len": 1}, "--seq-len"),
        ({"num_samples": 0}, "--samples"),
        ({"dense_layers": -1}, "--dense-layers"),
        ({"decode_steps": 0}, "--decode-steps"),
        ({"kv_cache": "ring"}, "--kv-cache"),
        ({"theta_extrapolation": "spline"}, "--theta-extrapolation"),
        ({"max_context": 1}, "--max-context"),
        ({"layer_k": "2+4"}, "--layer-k"),
        ({"layer_k": "2=0"}, "--layer-k"),
        ({"dense_heads": "1"}, "--dense-heads"),
        ({"dense_heads": "1:a"}, "--dense-heads"),
    ],
)
def test_api_checks_options_before_loading_anything(bad, flag, tmp_path):
    """The model does not exist: an option error (not the missing-model one) proves the options come first."""
    from topthetaexport._errors import TopThetaError
    from topthetaexport.pipeline import export, run_pipeline

    with pytest.raises(TopThetaError, match=flag):
        run_pipeline(str(tmp_path / "no-model"), "builtin:pydoc", tmp_path / "a" / "out", **bad)
    if "comp_mode" in bad or "kv_cache" in bad:
        with pytest.raises(TopThetaError, match=flag):
            export(str(tmp_path / "no-model"), tmp_path / "th", tmp_path / "a" / "out", **bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "spec,kind,source",
    [
        ("cloze:builtin:pydoc", "cloze", "builtin:pydoc"),
        ("retrieval:docs/", "retrieval", "docs/"),
        ("hellaswag.jsonl", "choice", "hellaswag.jsonl"),
        ("choice:items.txt", "choice", "items.txt"),
    ],
)
def test_parse_task_spec(spec, kind, source):
    from topthetaexport.eval.tasks import parse_task_spec

    assert tuple(parse_task_spec(spec)) == (kind, source, "")  # name: standard tasks only


@pytest.mark.parametrize(
    "spec,message",
    [("foo:bar", "unknown task kind 'foo'"), ("cloze:", "names no data"), ("notes.txt", "cloze:notes.txt")],
)
def test_parse_task_spec_errors(spec, message):
    from topthetaexport._errors import TopThetaError
    from topthetaexport.eval.tasks import parse_task_spec

    with pytest.raises(TopThetaError, match=message):
        parse_task_spec(spec)


def test_output_parents_removes_only_the_folders_it_made(tmp_path):
    from topthetaexport._io import output_parents

    (tmp_path / "x").mkdir()
    with pytest.raises(KeyboardInterrupt), output_parents(tmp_path / "x" / "a" / "b" / "out.onnx") as target:
        assert target.parent.is_dir()
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["x"]
    with output_parents(tmp_path / "x" / "a" / "out.onnx"):
        pass
    assert (tmp_path / "x" / "a").is_dir()  # kept on success
