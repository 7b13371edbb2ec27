"""OUT/ deployable as it is (docs/deploy.md): moved to another folder, it runs in onnxruntime-genai, in optimum's
ORTModelForCausalLM and from C++ (examples/cpp) with the same greedy tokens and logits as our own generation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import topthetaexport

REPO = Path(__file__).resolve().parent.parent
NEW_TOKENS = 12
PROMPT = "The Python language reference"


@pytest.fixture(scope="module")
def moved_out(tmp_path_factory, tiny_llama_bpe) -> Path:
    """The pipeline's output for the tiny LLaMA with a tokenizer, exported without validation and then moved."""
    from topthetaexport.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("deploy")
    run_pipeline(
        str(tiny_llama_bpe), "builtin:pydoc", root / "out", k=6, seq_len=48, num_samples=3, dense_layers=1,
        do_validate=False,
    )  # fmt: skip
    shutil.move(root / "out", root / "moved")
    return root / "moved"


@pytest.fixture(scope="module")
def prompt_ids(moved_out) -> list[int]:
    from topthetaexport.pipeline import tokenizer_for

    return list(tokenizer_for(moved_out)(PROMPT)["input_ids"])


@pytest.fixture(scope="module")
def run_tokens(moved_out, prompt_ids) -> list[int]:
    """What 'topθ-export run' generates (the same generator, without the text streaming)."""
    return [int(t) for t in topthetaexport.generate(moved_out, prompt_ids, NEW_TOKENS, device="cpu").tokens[0]]


def _same_greedy_run(tokens: list[int], reference: list[int], eos: int) -> None:
    """``tokens`` are ``reference``, or its prefix up to an eos where the other runtime stopped."""
    assert tokens == reference[: len(tokens)], (tokens, reference)
    assert len(tokens) == len(reference) or tokens[-1] == eos, (tokens, reference)


def _genai_greedy(og, model, prompt_ids: list[int]) -> list[int]:
    """NEW_TOKENS greedy tokens of an onnxruntime-genai model after ``prompt_ids``."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + NEW_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


@pytest.mark.slow  # exports a model through torch.onnx
def test_out_holds_library_copy_and_genai_config(moved_out):
    names = {p.name for p in moved_out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "genai_config.json", "libtoptheta_ops.so"} <= (
        names
    )
    record = json.loads((moved_out / "library.json").read_text())
    assert hashlib.sha256((moved_out / "libtoptheta_ops.so").read_bytes()).hexdigest() == record["sha256"]
    cfg = json.loads((moved_out / "genai_config.json").read_text())
    decoder = cfg["model"]["decoder"]
    assert decoder["session_options"]["custom_ops_library"] == "libtoptheta_ops.so"  # relative: OUT/ moves
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 3)
    assert cfg["search"]["past_present_share_buffer"] is False  # the concat form on CPU
    hf = json.loads((moved_out / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == hf["vocab_size"] and cfg["model"]["eos_token_id"] == hf["eos_token_id"]
    # session_options(library=OUT) opens the moved folder with plain onnxruntime
    import onnxruntime as ort

    options = topthetaexport.session_options(1, moved_out)
    sess = ort.InferenceSession(str(moved_out / "model.onnx"), sess_options=options)
    assert "logits" in [o.name for o in sess.get_outputs()]


@pytest.fixture(scope="module")
def og():
    """onnxruntime-genai (module scope and first in the arguments: a skip comes before the export)."""
    return pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install '.[genai]')")


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    """optimum's own venv (transformers 4.x): $TOPTHETA_OPTIMUM_PYTHON, else .venv-optimum (make optimum-venv)."""
    env = os.environ.get("TOPTHETA_OPTIMUM_PYTHON")
    path = Path(env) if env else REPO / ".venv-optimum" / "bin" / "python"
    if not path.is_file():
        pytest.skip(f"no optimum venv at {path}: 'make optimum-venv' or set TOPTHETA_OPTIMUM_PYTHON")
    return path


@pytest.mark.slow
def test_genai_greedy_tokens_equal_run(og, moved_out, prompt_ids, run_tokens):
    model = og.Model(str(moved_out))  # genai_config.json registers OUT/libtoptheta_ops.so
    assert list(og.Tokenizer(model).encode(PROMPT)) == prompt_ids  # genai reads the tokenizer saved in OUT/
    _same_greedy_run(_genai_greedy(og, model, prompt_ids), run_tokens, eos=2)


@pytest.mark.slow
def test_optimum_generate_equals_run(optimum_python, moved_out, prompt_ids, run_tokens, tmp_path):
    # only the package itself on optimum's path: its transformers 4.x must not meet this venv's 5.x
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "topthetaexport").symlink_to(Path(topthetaexport.__file__).parent)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "path")}
    res = subprocess.run(
        [str(optimum_python), str(Path(__file__).parent / "_optimum_generate.py"), str(moved_out),
         ",".join(map(str, prompt_ids)), str(NEW_TOKENS)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    tokens = json.loads(res.stdout.strip().splitlines()[-1])["tokens"]
    _same_greedy_run(tokens, run_tokens, eos=2)


def _python_steps(out: Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode with a plain onnxruntime session (1 thread): tokens and each step's last-row logits."""
    sess = topthetaexport.session(out, device="cpu", threads=1)
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = [o.name for o in sess.get_outputs()]
    feed = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    ids, total, tokens, rows = list(prompt), 0, [], []
    for _ in range(steps):
        total += len(ids)
        feed["input_ids"] = np.asarray([ids], np.int64)
        feed["attention_mask"] = np.ones((1, total), np.int64)
        result = dict(zip(outputs, sess.run(outputs, feed)))
        rows.append(result["logits"][0, -1])
        tokens.append(int(rows[-1].argmax()))
        feed.update({i.name: result[i.name.replace("past_key_values.", "present.")] for i in past_inputs})
        ids = [tokens[-1]]
    return tokens, np.stack(rows)


@pytest.mark.slow
def test_cpp_example_logits_equal_python(moved_out, prompt_ids, run_tokens, tmp_path):
    if not shutil.which("cmake"):
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    for cmd in (
        ["cmake", "-S", str(REPO / "examples" / "cpp"), "-B", str(build), f"-DONNXRUNTIME_PYTHON={sys.executable}"],
        ["cmake", "--build", str(build)],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logits_file = tmp_path / "logits.f32"
    res = subprocess.run(
        [str(build / "toptheta_generate"), str(moved_out), ",".join(map(str, prompt_ids)), str(NEW_TOKENS),
         "--logits", str(logits_file)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    cpp_tokens = [int(t) for t in res.stdout.split("tokens:")[1].split()]
    py_tokens, py_logits = _python_steps(moved_out, prompt_ids, NEW_TOKENS)
    cpp_logits = np.fromfile(logits_file, np.float32).reshape(py_logits.shape)
    assert cpp_tokens == py_tokens == run_tokens
    assert float(np.abs(cpp_logits - py_logits).max()) <= 1e-5
    assert "prefill logits[0:8]:" in res.stdout


def test_genai_config_refuses_an_encoder(tiny_bert, tmp_path):
    from topthetaexport.deploy import genai_config
    from topthetaexport.models import load_model

    with pytest.raises(topthetaexport.TopThetaError, match="decoder language models"):
        genai_config(load_model(tiny_bert), tmp_path / "model.onnx", "libtoptheta_ops.so")


def test_missing_onnxruntime_names_the_extras(monkeypatch):
    from topthetaexport.ort.library import import_onnxruntime

    import_onnxruntime.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python does when the module is not installed
    try:
        with pytest.raises(topthetaexport.TopThetaError, match=r"topthetaexport\[cpu\].*topthetaexport\[gpu\]"):
            topthetaexport.session_options()
    finally:
        import_onnxruntime.cache_clear()


@pytest.mark.slow
def test_genai_config_refuses_the_shared_cache(moved_out, tiny_llama_bpe, tmp_path):
    import onnx_ir as ir

    from topthetaexport.deploy import genai_config
    from topthetaexport.models import load_model
    from topthetaexport.onnx.kv_cache import ShareKvBuffer

    model = ir.load(str(moved_out / "model.onnx"))
    ShareKvBuffer()(model)
    ir.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(
        topthetaexport.TopThetaError, match="shared-buffer KV cache.*model.genai.onnx.*--kv-cache concat"
    ):
        genai_config(load_model(tiny_llama_bpe), tmp_path / "model.onnx", "libtoptheta_ops.so")


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory, tiny_llama_bpe) -> Path:
    """The pipeline's output with the shared-buffer cache (the CUDA default), made on the CPU, then moved."""
    from topthetaexport.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("deploy-shared")
    run_pipeline(
        str(tiny_llama_bpe), "builtin:pydoc", root / "out", k=6, seq_len=48, num_samples=3, dense_layers=1,
        do_validate=False, kv_cache="shared",
    )  # fmt: skip
    shutil.move(root / "out", root / "moved")
    return root / "moved"


@pytest.mark.slow
def test_genai_shared_buffer_greedy_tokens_equal_run(og, shared_out, prompt_ids):
    """genai binds one buffer per layer and kind as past and present (past_present_share_buffer) and runs
    model.genai.onnx, the shared form with genai's inputs, which reads model.onnx's weights."""
    cfg = json.loads((shared_out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["filename"] == "model.genai.onnx"
    assert {"model.onnx", "model.onnx.data", "model.genai.onnx"} <= {p.name for p in shared_out.iterdir()}
    want = [int(t) for t in topthetaexport.generate(shared_out, prompt_ids, NEW_TOKENS, device="cpu").tokens[0]]
    _same_greedy_run(_genai_greedy(og, og.Model(str(shared_out)), prompt_ids), want, eos=2)
