"""--dtype: a float16 export of a tiny llama runs in onnxruntime (CPU, our library) close to the PyTorch Top-θ
reference, greedy-decodes the same tokens, says float16 in inspect and report.json, and validates; a float16 export
of a tiny gemma3 (norms computed in float32) passes onnx.checker and matches its float32 run."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tokens
from rich.console import Console

try:  # installed layout: the CLI lives in topthetaexport.cli
    from topthetaexport.cli.main import main as cli_main
    from topthetaexport.cli.main import summary_table
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli.main import main as cli_main
    from cli.main import summary_table

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.ort.sessions import OnnxModel
from topthetaexport.thresholds import Thresholds
from topthetaexport.torch.attention import attention_mode

SEQ = 48
STEPS = 16


@pytest.fixture(scope="module")
def fp16_out(tmp_path_factory, tiny_llama) -> tuple[Path, dict[str, Any]]:
    """One float16 pipeline run (calibrate in float32, export float16, validate) shared by the tests."""
    from topthetaexport.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("dtype") / "out16"
    report = run_pipeline(
        str(tiny_llama),
        make_tokens(3, SEQ, seed=1),
        out,
        k=6,
        seq_len=SEQ,
        num_samples=3,
        dense_layers=1,
        eval_data=make_tokens(1, SEQ, seed=2),
        eval_windows=1,
        decode_steps=4,
        dtype="float16",
        threads=1,
    )
    return out, report


def _torch_toptheta(model: torch.nn.Module, th: Thresholds, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), attention_mode(model, "toptheta", thresholds=th):
        return model(input_ids=ids).logits.float().numpy()


def test_float16_graph_matches_torch_reference_and_greedy_tokens(fp16_out, tiny_llama):
    out, _ = fp16_out
    om = OnnxModel(out, device="cpu", threads=1)
    assert om.dtype == np.float16 and om.providers == ["CPUExecutionProvider"]
    th = Thresholds.load(out)
    loaded = load_model(tiny_llama)  # float32: the reference the thresholds were calibrated on
    ids = make_tokens(1, 24, seed=3)

    got = om.run(ids.numpy()).output
    assert got.dtype == np.float16
    ref = _torch_toptheta(loaded.model, th, ids)
    rel = float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())
    assert rel <= 1e-2, rel

    # greedy through the float16 KV cache vs the float32 PyTorch reference (full recompute each step)
    tokens = om.generate(ids.numpy(), STEPS)[0].tolist()
    seq, ref_tokens, margins = ids, [], []
    for _ in range(STEPS):
        last = _torch_toptheta(loaded.model, th, seq)[0, -1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ref_tokens.append(int(last.argmax()))
        seq = torch.cat([seq, torch.tensor([[ref_tokens[-1]]])], dim=1)
    # meaningful only if no step is a near-tie that float16 rounding (~1e-3 here) could flip
    assert min(margins) > 5e-3, margins
    assert tokens == ref_tokens


def test_report_and_inspect_say_float16(fp16_out, capsys):
    out, report = fp16_out
    assert report["dtype"] == "float16"
    assert report["validation"]["dtype"] == "float16"
    assert json.loads((out / "report.json").read_text())["dtype"] == "float16"
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(summary_table(report))
    table = console.export_text()
    assert "model runs in" in table and "float16" in table
    rc = cli_main(["inspect", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["dtype"] == "float16"
    types = {v["name"]: v["dtype"] for v in info["inputs"] + info["outputs"]}
    assert types["logits"] == types["past_key_values.0.key"] == types["present.2.value"] == "float16"
    assert types["input_ids"] == "int64"


def test_validate_accepts_float16_out(fp16_out, tiny_llama):
    from topthetaexport.eval.validation import validate

    out, _ = fp16_out
    rep = validate(
        out, model=str(tiny_llama), data=make_tokens(1, SEQ, seed=4), seq_len=SEQ, num_windows=1, decode_steps=4
    )
    par = rep["parity"]
    assert rep["dtype"] == "float16" and par["operator_tolerance"] == 1e-2
    # the model's tolerance scales with the graph's own dense floor (its logits' float16 rounding)
    assert par["tolerance"] == max(1e-2, 2 * par["dense_fp32_floor"]) and par["dense_fp32_floor"] > 1e-4
    assert par["pinned_rows_differing_from_ort"] == 0  # fp64 re-decisions from fp16 Q/K reproduce ORT's
    assert 1e-4 < par["max_abs_diff_vs_torch_toptheta_pinned"] <= par["tolerance"]  # float16 rounding, not float32's
    assert par["pass"] and par["operator_pass"]
    assert rep["decode"]  # decoding fed float16 past through the cache


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dtype", "float64"], ["unknown dtype 'float64'", "--dtype", "float16"]),
        (["--dtype", "bfloat16", "--device", "cpu"], ["bfloat16", "CPU kernel", "float16 or float32"]),
    ],
)
@pytest.mark.parametrize("command", ["pipeline", "export"])
def test_bad_dtype_is_one_line_before_work(tmp_path, capsys, command, args, words):
    out = tmp_path / ("out" if command == "pipeline" else "dense.onnx")
    # a model that does not exist: the dtype error must come first, before anything is loaded
    argv = [command, str(tmp_path / "no-model"), "-o", str(out), *args]
    if command == "pipeline":
        argv += ["--calib", "builtin:pydoc"]
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_api_checks_dtype(tmp_path, tiny_llama):
    from topthetaexport.onnx.exporter import export_onnx
    from topthetaexport.pipeline import run_pipeline

    with pytest.raises(TopThetaError, match="--dtype"):
        run_pipeline(str(tiny_llama), "builtin:pydoc", tmp_path / "o", dtype="half")
    with pytest.raises(TopThetaError, match="CPU kernel"):
        run_pipeline(str(tiny_llama), "builtin:pydoc", tmp_path / "o", dtype="bfloat16", device="cpu")
    with pytest.raises(TopThetaError, match="unknown export dtype"):
        export_onnx(load_model(tiny_llama), tmp_path / "m.onnx", dtype="fp16")
    assert not (tmp_path / "o").exists()


def test_float16_gemma3_export_checks_and_matches_float32_reference(tmp_path, tiny_gemma3):
    """Gemma's RMSNorm scales in float32 and casts back afterwards: the float16 export passes onnx.checker (every
    RMSNormalization reads input and scale of one type, the float32 the norm computes in) and gives the logits of
    its float16 weights run in float32, over a padded prefill past the sliding window and a decode step."""
    import onnx

    from topthetaexport.onnx.exporter import export_onnx

    path = export_onnx(load_model(tiny_gemma3, dtype=torch.float16), tmp_path / "model.onnx")
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    norms = [n for n in m.graph.node if n.op_type == "RMSNormalization"]
    assert norms and all(types[n.input[0]] == types[n.input[1]] == onnx.TensorProto.FLOAT for n in norms)

    om = OnnxModel(path, device="cpu", threads=1)
    assert om.dtype == np.float16
    reference = load_model(tiny_gemma3, dtype=torch.float16).model.float()
    ids, mask = make_tokens(2, 10, seed=5), torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0
    step = om.run(ids.numpy(), mask.numpy())
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    rows = mask.bool().numpy()
    tok, mask = make_tokens(2, 1, seed=6), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    pairs = [(step.output[rows], ref.logits.numpy()[rows])]
    step = om.run(tok.numpy(), mask.numpy(), past=step.cache)
    with torch.no_grad():
        ref = reference(input_ids=tok, attention_mask=mask, past_key_values=ref.past_key_values, use_cache=True)
    pairs.append((step.output, ref.logits.numpy()))
    for got, want in pairs:
        assert got.dtype == np.float16
        rel = float(np.abs(got.astype(np.float32) - want).max() / np.abs(want).max())
        assert rel <= 1e-2, rel


@pytest.fixture(scope="module")
def bf16_graphs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """A bfloat16 export of the tiny llama (made on the CPU: only running it needs CUDA), rewritten in both forms."""
    from test_export_rewrite import random_thresholds

    from topthetaexport.onnx.exporter import export_onnx
    from topthetaexport.onnx.rewriter import rewrite

    loaded = load_model(tiny_llama)
    root = tmp_path_factory.mktemp("bf16")
    dense = export_onnx(loaded, root / "dense.onnx", dtype="bfloat16")
    th = random_thresholds(loaded, seed=3)
    rewrite(dense, th, root / "concat.onnx")
    rewrite(dense, th, root / "shared.onnx", kv_cache="shared")
    return {"dense": dense, "concat": root / "concat.onnx", "shared": root / "shared.onnx"}


@pytest.mark.parametrize("form", ["concat", "shared"])
def test_float32_interface_of_a_bfloat16_export(bf16_graphs, form):
    """prepare_variant(float32_interface=True): logits, exposed op I/O and (concat form) the past/present cache are
    float32 at the graph's edge; the shared cache, bound as one device buffer, and everything inside stay
    bfloat16; the variant passes the checker."""
    import onnx
    import onnx_ir as ir

    from topthetaexport.onnx.variants import op_nodes, prepare_variant

    path = prepare_variant(bf16_graphs[form], expose_kept=True, expose_io=True, float32_interface=True)
    try:
        onnx.checker.check_model(str(path))
        model = ir.load(path)
        types = {v.name: v.dtype for v in [*model.graph.inputs, *model.graph.outputs]}
        cache = [n for n in types if n and n.startswith(("past_key_values.", "present."))]
        want = ir.DataType.FLOAT if form == "concat" else ir.DataType.BFLOAT16
        assert cache and all(types[n] == want for n in cache), types
        assert types["logits"] == ir.DataType.FLOAT
        io = [n for n in types if n and n.startswith("toptheta.io.") and not n.endswith(".mask")]
        assert io and all(types[n] == ir.DataType.FLOAT for n in io), types
        assert types["toptheta.kept.0"] == ir.DataType.INT32
        for _, node in op_nodes(model.graph):
            assert node.inputs[0].dtype == node.outputs[0].dtype == ir.DataType.BFLOAT16
    finally:
        path.unlink()


def test_float32_interface_of_a_dense_bfloat16_export(bf16_graphs):
    """A dense export has no TopThetaAttention node: the float32 interface alone still applies (OnnxModel runs
    dense bfloat16 graphs too), the other passes still need the operator."""
    import onnx_ir as ir

    from topthetaexport.onnx.variants import prepare_variant

    path = prepare_variant(bf16_graphs["dense"], expose_kept=False, float32_interface=True)
    try:
        model = ir.load(path)
        assert {v.dtype for v in model.graph.outputs} == {ir.DataType.FLOAT}
    finally:
        path.unlink()
    with pytest.raises(TopThetaError, match="no TopThetaAttention node"):
        prepare_variant(bf16_graphs["dense"], expose_kept=True, float32_interface=True)


def test_float32_interface_computes_the_same_values():
    """On the CPU provider, which runs Concat for bfloat16: the float32 edge of a past + new -> present graph gives
    the bfloat16-rounded inputs back, bit for bit, and a graph without bfloat16 I/O is left alone."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from topthetaexport.onnx.variants import Float32Interface

    bf16 = TensorProto.BFLOAT16
    graph = helper.make_graph(
        [helper.make_node("Concat", ["past", "new"], ["present"], axis=2)],
        "cache",
        [helper.make_tensor_value_info(n, bf16, [1, 2, None, 4]) for n in ("past", "new")],
        [helper.make_tensor_value_info("present", bf16, [1, 2, None, 4])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert Float32Interface()(model).modified
    assert not Float32Interface()(model).modified  # nothing bfloat16 left at the edge
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    past, new = g.standard_normal((1, 2, 3, 4), np.float32), g.standard_normal((1, 2, 1, 4), np.float32)
    (present,) = sess.run(None, {"past": past, "new": new})
    want = torch.from_numpy(np.concatenate([past, new], axis=2)).bfloat16().float().numpy()
    assert present.dtype == np.float32 and np.array_equal(present, want)


def test_bfloat16_graph_on_cpu_is_one_line(bf16_graphs):
    """OnnxModel names the device and the float16 alternative before onnxruntime fails on the graph."""
    with pytest.raises(TopThetaError) as err:
        OnnxModel(bf16_graphs["concat"], device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in ("bfloat16", "device='cuda'", "--dtype float16")), msg
