"""The end-to-end benchmark harness (topthetaexport.ort.e2e, bench/e2e.py) on the CPU with a tiny model.

``prepare`` exports a random-weight tiny llama and writes the four graphs without their weights plus the manifest;
``run --device cpu`` regenerates the weights, sets θ by the search, times decode and prefill of the three graphs and
writes the rows: the same code the GPU run executes, with CUDA events, CUPTI and CUDA graphs off.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_bpe_tokenizer

from topthetaexport._errors import TopThetaError
from topthetaexport.onnx import names
from topthetaexport.ort import e2e

ROOT = Path(__file__).resolve().parents[1]

try:  # installed layout: the CLI lives in topthetaexport.cli
    from topthetaexport.cli.main import main as cli_main
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(ROOT))
    from cli.main import main as cli_main
KEYS = {"model", "dtype", "context", "batch", "phase", "toptheta_ms", "dense_ms", "dense_gqa_ms"}
KEYS |= {"toptheta_wall_ms", "v_rows_fraction", "ceiling", "kernels"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def prepared(root):
    """The tiny shape's graphs. Its export is forced to external data (as a model over 1 GB is) and the strip size
    raised above its [64, 32] matrices, so that initializers in the export's data file that stay in the graphs must
    be moved inline by prepare."""
    from topthetaexport.onnx import exporter

    out = root / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)
        mp.setattr(e2e, "STRIP_BYTES", 10000)
        e2e.prepare_shape("tiny", out, dtype="float32", exports_dir=root / "exports", log=lambda m: None)
    assert (root / "exports" / "dense.onnx.data").is_file()
    return out


@pytest.fixture(scope="module")
def out_folder(root, prepared):
    """A folder like the pipeline writes: the tiny shape's Top-θ rewrite (θ = 0 everywhere, concat form) as
    model.onnx, with the tests' tiny BPE tokenizer (the shape's 1000-token vocabulary) and config.json."""
    out = root / "out"
    out.mkdir()
    shutil.copyfile(root / "exports" / "toptheta.onnx", out / "model.onnx")
    shutil.copyfile(root / "exports" / "toptheta.onnx.data", out / "toptheta.onnx.data")  # its weights' file name
    tiny_bpe_tokenizer().save_pretrained(str(out))
    e2e.shape_config("tiny").to_json_file(str(out / "config.json"))
    return out


def test_prepare_writes_graphs_without_weights(prepared):
    man = json.loads((prepared / e2e.MANIFEST).read_text())
    assert sorted(p.name for p in prepared.iterdir()) == sorted([e2e.MANIFEST, *e2e.GRAPHS.values()])
    assert not (prepared / e2e.WEIGHTS).exists()
    kinds = {w["kind"] for w in man["weights"]}
    assert kinds <= {"normal", "ones", "zeros"} and "normal" in kinds
    assert all(abs(w["std"] - 0.02) < 0.005 for w in man["weights"] if w["kind"] == "normal")
    embed = [w for w in man["weights"] if w["gather_only"]]
    assert len(embed) == 1 and embed[0]["shape"] == [1000, 64]  # the embedding: B rows read per step
    assert man["streamed_weight_bytes"] == sum(w["nbytes"] for w in man["weights"] if not w["gather_only"])
    for fusions in man["fusions"].values():  # FuseForOrt on every graph alike (float32: rotary is ONNX's op already)
        assert fusions == {
            "simplified_layer_norm": 5,
            "skip_simplified_layer_norm": 4,
            "rotary_embedding": 0,
            "rotary_before_transpose": 0,
            "packed_attention": 0,  # float32: ONNX RotaryEmbedding sits between the head split and the op
            "concat_projections": 2,  # Q/K/V of the 2 layers (gate/up are too wide)
        }
    stored = {w["name"]: w for w in man["weights"]}
    assert min(w["nbytes"] for w in man["weights"]) >= 10000
    for gname, fname in man["graphs"].items():
        model = onnx.load(str(prepared / fname), load_external_data=False)
        external = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert external and set(external) <= set(stored), gname  # nothing still points at the export's data
        inline = [t for t in model.graph.initializer if t.name not in external and t.dims and int(np.prod(t.dims)) > 8]
        assert inline and all(t.raw_data for t in inline), gname  # the small ones (norms, biases) stay, with data
        for name, t in external.items():
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == e2e.WEIGHTS and int(info["offset"]) == stored[name]["offset"], name
        ops = {n.op_type for n in model.graph.node}
        outputs = [o.name for o in model.graph.output]
        assert names.NEXT_TOKEN in outputs
        inputs = [i.name for i in model.graph.input]
        if gname == "dense":
            assert "Attention" in ops and names.PAST_SEQUENCE_LENGTH not in inputs
        elif gname == "dense_gqa":
            assert "GroupQueryAttention" in ops and names.OP_TYPE not in ops
        else:
            assert names.OP_TYPE in ops and names.THETA_INPUT in inputs and names.PAST_SEQUENCE_LENGTH in inputs
        if gname == "toptheta_measure":
            assert {names.kept_name(0), names.io_name(0, "q")} <= set(outputs)
            assert names.io_name(0, "k") not in outputs


def test_unfused_folder_fused_afterwards_equals_a_fused_prepare(prepared, root):
    """prepare --no-fuse (reusing the export) then fuse (bench/e2e.py fuse): a fused prepare's graphs and manifest."""
    out = root / "tiny-unfused"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(e2e, "STRIP_BYTES", 10000)
        e2e.prepare_shape("tiny", out, dtype="float32", exports_dir=root / "exports", fuse=False, log=lambda m: None)
    assert set(json.loads((out / e2e.MANIFEST).read_text())["fusions"].values()) == {None}
    e2e.fuse_prepared(out, log=lambda m: None)
    fused, made = (json.loads((d / e2e.MANIFEST).read_text()) for d in (out, prepared))
    # The same but ConcatProjections, which needs the weights' values and the folder has none (docs/benchmarks.md).
    for g in e2e.GRAPHS:
        assert fused["fusions"][g] == {**made["fusions"][g], "concat_projections": 0}
    # (concatenated, the small K and V weights of both layers, inline on their own, cross the strip size)
    assert made["weights_bytes"] - fused["weights_bytes"] == 2 * 2 * 64 * 32 * 4
    for fname in e2e.GRAPHS.values():
        ops = [
            Counter(n.op_type for n in onnx.load(str(d / fname), load_external_data=False).graph.node)
            for d in (out, prepared)
        ]
        assert ops[0] - Counter({"MatMul": 2 * 2}) == ops[1] - Counter({"Split": 2}), fname  # Q/K/V: 3 GEMMs -> 1
    with pytest.raises(TopThetaError, match="is fused already .*: nothing to do") as err:
        e2e.fuse_prepared(out, log=lambda m: None)
    assert "\n" not in str(err.value)


def test_run_on_cpu_writes_the_rows(prepared, tmp_path):
    """bench/e2e.py run as its own process, as gpu_session.sh runs it (there with --device cuda)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "run", "--graphs", str(prepared), "--out", str(tmp_path)]
        + ["--device", "cpu", "--contexts", "48,96,4096", "--batches", "1,2", "--steps", "2", "--date", "test"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "e2e-cpu-test.json").read_text())
    info = json.loads((tmp_path / "e2e-cpu-test-info.json").read_text())
    assert "| tiny-random | 48 | 2 | decode |" in (tmp_path / "e2e-cpu-test.md").read_text()
    assert {(r["phase"], r["context"], r["batch"]) for r in rows} == {
        (p, c, b) for p in ("prefill", "decode") for c in (48, 96) for b in (1, 2)
    }
    model = info["models"][0]
    assert any("4096" in s and "positions" in s for s in model["skipped"])  # beyond the tiny model's 512
    for r in rows:
        assert KEYS <= set(r), set(KEYS) - set(r)
        for key in ("toptheta_ms", "dense_ms", "dense_gqa_ms", "toptheta_wall_ms"):
            assert r[key] is not None and r[key] > 0, (key, r)
        assert r["kernels"] == [] and r["generic_kernel"] is False  # no CUDA kernels on the CPU
        if r["phase"] == "decode":
            assert 0 < r["v_rows_fraction"] <= 1 / 3, r
            assert r["ceiling"] > 1 and math.isclose(r["ceiling"], r["dense_bytes"] / r["toptheta_bytes"])
            assert r["kept_rows_differing"] == 0 and r["kept_fraction"] <= r["v_rows_fraction"]
        else:
            assert r["v_rows_fraction"] is None and r["ceiling"] is None
    for c, how in model["theta_by_context"].items():
        assert how["rounds"][0]["theta"] == "-inf" and how["rounds"][0]["v_rows_fraction"] == 1.0
        assert how["rounds"][-1]["v_rows_fraction"] <= 1 / 3 and math.isfinite(how["theta"]), c
    for diff in model["dense_parity"].values():  # Top-θ at θ = -inf vs GroupQueryAttention, same buffers
        assert diff < 1e-4


def test_cli_run_streams_tokens_and_prints_timing(out_folder, capsys):
    rc = cli_main(["run", str(out_folder), "--prompt", "The cat", "--max-new-tokens", "6", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.startswith("The cat") and cap.out.endswith("\n")
    err = " ".join(cap.err.split())
    assert "prefill" in err and "tokens/s" in err and "no CUDA graphs" in err
    assert "mean V rows read per decode step" in err  # --kept is on by default on the CPU
    rc = cli_main(["run", str(out_folder), "--prompt", "The cat", "--max-new-tokens", "3", "--no-kept"])
    cap2 = capsys.readouterr()
    assert rc == 0 and "V rows read" not in cap2.err


def test_cli_bench_e2e_of_an_output_folder(out_folder, root, tmp_path, capsys):
    """bench OUT --e2e: the folder's own θ (no search), the dense export given with --dense."""
    args = ["bench", str(out_folder), "--e2e", "--dense", str(root / "exports" / "dense.onnx"), "--device", "cpu"]
    rc = cli_main([*args, "--contexts", "40", "--batches", "1,2", "--results", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "| decode |" in cap.out
    rows = json.loads(next(tmp_path.glob("e2e-cpu-*[0-9].json")).read_text())
    assert len(rows) == 4
    for r in rows:
        if r["phase"] == "decode":  # θ = 0 from the graph, read per layer/head/row for the union
            assert 0 < r["v_rows_fraction"] < 1 and r["ceiling"] > 1 and r["theta"] is None
    rc = cli_main(["bench", str(out_folder), "--device", "cpu"])
    assert rc == 2 and "--e2e" in capsys.readouterr().err
