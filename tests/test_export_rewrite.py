"""ONNX export and the TopThetaAttention rewrite, checked end to end against PyTorch.

Tiny random-weight models (conftest) are exported once per module; every comparison runs a real
onnxruntime session (with the custom-op library) against the PyTorch model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tokens, save_tiny_model

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.onnx.summary import format_summary, summarize
from topthetaexport.ort import library as runtime
from topthetaexport.thresholds import Thresholds
from topthetaexport.torch.attention import KeptRecorder, attention_mode

TOL = 1e-4
KINDS = ("llama", "gpt2", "qwen2", "bert")
ROWS = 6  # fewer threshold rows than positions, so rows past R reuse the last one


@dataclass
class Exported:
    loaded: object
    path: Path
    seconds: float


@pytest.fixture(scope="module")
def exported(tiny_models_dir, tmp_path_factory):
    """kind -> Exported (dense ONNX export of the tiny model), built on first use."""
    cache: dict[str, Exported] = {}

    def get(kind: str) -> Exported:
        if kind not in cache:
            loaded = load_model(save_tiny_model(kind, tiny_models_dir))
            out = tmp_path_factory.mktemp(f"dense-{kind}") / "model.onnx"
            t = time.perf_counter()
            export_onnx(loaded, out)
            cache[kind] = Exported(loaded, out, time.perf_counter() - t)
        return cache[kind]

    return get


# -- helpers -----------------------------------------------------------------------------------------


def session(path):
    return runtime.session(path, device="cpu")


def padded_batch(batch: int, seq: int, seed: int = 0):
    """Token ids and an attention mask whose 2nd row is left-padded by 2."""
    ids = make_tokens(batch, seq, seed=seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, :2] = 0
    return ids, mask


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    feed = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            feed[i.name] = np.zeros((batch, heads, 0, dim), np.float32)
    return feed


def ort_run(sess, ids, mask, past: dict | None = None) -> dict[str, np.ndarray]:
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    names = {i.name for i in sess.get_inputs()}
    if any(n.startswith("past_key_values.") for n in names):
        feed.update(past if past is not None else empty_past(sess, ids.shape[0]))
    outs = sess.run(None, feed)
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def next_past(outs: dict) -> dict[str, np.ndarray]:
    return {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}


def main_output(outs: dict) -> np.ndarray:
    return outs["logits"] if "logits" in outs else outs["last_hidden_state"]


def torch_out(out) -> np.ndarray:
    return (out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state).numpy()


def max_diff(a: np.ndarray, b: np.ndarray, rows: torch.Tensor | None = None) -> float:
    d = np.abs(a - b)
    if rows is not None:
        d = d[rows.bool().numpy()]
    return float(d.max())


def compare_steps(
    loaded, sess, *, mode_ctx, steps: int = 2, batch: int = 2, seq: int = 8, seed: int = 0, first: list | None = None
):
    """Prefill + ``steps`` decode steps in ORT and PyTorch; returns the max |Δ| of each call.

    ``first``, if given, receives the ORT prefill output.
    """
    model = loaded.model
    ids, mask = padded_batch(batch, seq, seed)
    diffs = []
    with torch.no_grad(), mode_ctx():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=loaded.causal)
    outs = ort_run(sess, ids, mask)
    if first is not None:
        first.append(main_output(outs))
    diffs.append(max_diff(main_output(outs), torch_out(ref), mask if loaded.causal else None))
    if not loaded.causal:
        return diffs
    past, cache = next_past(outs), ref.past_key_values
    for step in range(steps):
        tok = make_tokens(batch, 1, seed=100 + step)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        with torch.no_grad(), mode_ctx():
            ref = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        outs = ort_run(sess, tok, mask, past)
        diffs.append(max_diff(main_output(outs), torch_out(ref)))
        past, cache = next_past(outs), ref.past_key_values
    return diffs


def thresholds_for(loaded, theta: torch.Tensor, sdc: torch.Tensor | None = None, **meta) -> Thresholds:
    base = {
        "model": loaded.name,
        "model_type": loaded.model_type,
        "causal": loaded.causal,
        "k": 4,
        "num_layers": theta.shape[0],
        "num_heads": theta.shape[1],
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "dense_layers": [],
        "calib_source": "test",
    }
    base.update(meta)
    return Thresholds(theta, torch.zeros_like(theta) if sdc is None else sdc, base)


def dense_thresholds(loaded) -> Thresholds:
    return thresholds_for(loaded, torch.full((loaded.num_layers, loaded.num_heads, ROWS), float("-inf")))


def random_thresholds(loaded, seed: int = 0) -> Thresholds:
    """Random finite θ inside each layer's real score range (30th-85th percentile) and random ρ."""
    ids, mask = padded_batch(2, 8, seed)
    scores: dict[int, torch.Tensor] = {}

    def hook(layer, s, valid):
        scores[layer] = s[valid].flatten()

    with torch.no_grad(), attention_mode(loaded.model, "dense", score_hook=hook):
        loaded.model(input_ids=ids, attention_mask=mask)
    g = torch.Generator().manual_seed(seed)
    shape = (loaded.num_heads, ROWS)
    theta = torch.stack(
        [
            torch.quantile(scores[i], 0.3)
            + torch.rand(shape, generator=g) * (torch.quantile(scores[i], 0.85) - torch.quantile(scores[i], 0.3))
            for i in range(loaded.num_layers)
        ]
    )
    sdc = torch.rand(theta.shape, generator=g) * 0.9
    return thresholds_for(loaded, theta, sdc)


def assert_one_line_error(excinfo, *needles: str):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for needle in needles:
        assert needle in msg, msg


# -- dense export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dense_export_matches_pytorch(exported, kind):
    ex = exported(kind)
    sess = session(ex.path)
    diffs = compare_steps(ex.loaded, sess, mode_ctx=_nullctx, steps=2)
    assert max(diffs) <= TOL, diffs
    assert ex.seconds < 120


def test_dense_export_signature(exported):
    ex = exported("llama")
    m = onnx.load(str(ex.path))
    L = ex.loaded.num_layers
    names_in = [i.name for i in m.graph.input]
    names_out = [o.name for o in m.graph.output]
    assert names_in == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")
    ]
    assert names_out == ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    ids_dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    past_dims = [d.dim_param or d.dim_value for d in m.graph.input[2].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in ids_dims)  # dynamic batch and sequence
    assert isinstance(past_dims[0], str) and isinstance(past_dims[2], str)
    assert past_dims[1] == ex.loaded.num_kv_heads and past_dims[3] == ex.loaded.head_dim
    assert sum(n.op_type == "Attention" for n in m.graph.node) == L
    assert {o.domain for o in m.opset_import} == {""} and m.opset_import[0].version == 23
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["toptheta.causal"] == "1" and meta["toptheta.num_layers"] == str(L)
    bert = onnx.load(str(exported("bert").path))
    assert [i.name for i in bert.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in bert.graph.output] == ["last_hidden_state"]


def test_dense_export_dynamic_batch(exported):
    ex = exported("llama")
    sess = session(ex.path)
    for batch in (1, 3):
        ids, mask = padded_batch(batch, 5, seed=batch)
        with torch.no_grad():
            ref = ex.loaded.model(input_ids=ids, attention_mask=mask)
        assert max_diff(ort_run(sess, ids, mask)["logits"], torch_out(ref), mask) <= TOL


@pytest.mark.slow  # a second full export
def test_export_external_data_without_cache(tmp_path, tiny_models_dir, monkeypatch):
    """Weights in model.onnx.data (threshold lowered), logits-only signature; rewrite reads it back."""
    import topthetaexport.onnx.exporter as export_mod

    loaded = load_model(save_tiny_model("llama", tiny_models_dir))
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_onnx(loaded, tmp_path / "dense" / "model.onnx", with_cache=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert out.stat().st_size < out.with_name("model.onnx.data").stat().st_size
    sess = session(out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    ids, mask = padded_batch(2, 7)
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, attention_mask=mask)
    assert max_diff(ort_run(sess, ids, mask)["logits"], torch_out(ref), mask) <= TOL

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    th = random_thresholds(loaded)
    rw = rewrite(out, th, tmp_path / "tt" / "model.onnx", comp_mode=1)
    assert sorted(p.name for p in (tmp_path / "tt").iterdir()) == ["model.onnx"]  # back to one file
    assert [b["mask"] for b in rw["layers"]] == ["key_padding"] * loaded.num_layers
    with torch.no_grad(), attention_mode(loaded.model, "toptheta", thresholds=th, comp_mode=1):
        ref = loaded.model(input_ids=ids, attention_mask=mask)
    got = ort_run(session(tmp_path / "tt" / "model.onnx"), ids, mask)["logits"]
    assert max_diff(got, torch_out(ref), mask) <= TOL


# -- rewrite: graph structure ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_structure(exported, tmp_path, kind):
    ex = exported(kind)
    loaded = ex.loaded
    th = random_thresholds(loaded)
    out = tmp_path / "model.onnx"
    report = rewrite(ex.path, th, out, comp_mode=2)
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert "Attention" not in ops
    nodes = [n for n in m.graph.node if n.op_type == "TopThetaAttention"]
    assert len(nodes) == loaded.num_layers and all(n.domain == "ai.toptheta" for n in nodes)
    assert {(o.domain, o.version) for o in m.opset_import} >= {("ai.toptheta", 1)}
    inits = {t.name: t for t in m.graph.initializer}
    gqa = loaded.num_kv_heads != loaded.num_heads
    for layer, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == loaded.num_heads
        assert attrs["num_kv_heads"] == loaded.num_kv_heads
        assert attrs["causal"] == int(loaded.causal) and attrs["comp_mode"] == 2
        assert attrs["scale"] == pytest.approx(loaded.head_dim**-0.5)
        assert node.input[3] == f"toptheta.theta.{layer}" and node.input[7] == f"toptheta.sdc.{layer}"
        assert list(inits[node.input[3]].dims) == [loaded.num_heads, ROWS]
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[node.input[3]]), th.theta[layer].numpy())
        assert node.input[4] == "toptheta.key_padding_mask"
        if loaded.causal:  # K/V are the concatenated caches themselves (GQA expansion peeled)
            assert node.input[1] == f"present.{layer}.key" and node.input[2] == f"present.{layer}.value"
    # one shared Cast for the key-padding mask; the 4-D mask and GQA expansion subgraphs are gone
    mask_producers = [n for n in m.graph.node if "toptheta.key_padding_mask" in n.output]
    assert len(mask_producers) == 1 and mask_producers[0].op_type == "Cast"
    assert "GatherND" not in ops and "LessOrEqual" not in ops
    if gqa:  # the K and V expansions of every layer are gone
        dense_ops = [n.op_type for n in onnx.load(str(ex.path)).graph.node]
        assert ops.count("Expand") <= dense_ops.count("Expand") - 2 * loaded.num_layers
    assert [b["gqa_peeled"] for b in report["layers"]] == [gqa] * loaded.num_layers
    assert [b["layer"] for b in report["layers"]] == list(range(loaded.num_layers))
    assert all(b["mask"] == "key_padding" and b["rows"] == ROWS for b in report["layers"])
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["toptheta.comp_mode"] == "2" and meta["toptheta.k"] == "4"
    assert meta["toptheta.thresholds_source"] == "in-memory" and meta["toptheta.version"]


def test_rewrite_names_layers_from_scopes(exported, tmp_path):
    ex = exported("gpt2")
    report = rewrite(ex.path, random_thresholds(ex.loaded), tmp_path / "m.onnx")
    assert [b["name"] for b in report["layers"]] == [f"transformer.h.{i}.attn" for i in range(3)]
    ex = exported("bert")
    report = rewrite(ex.path, random_thresholds(ex.loaded), tmp_path / "b.onnx")
    assert report["layers"][2]["name"].startswith("encoder.layer.2.")


def test_rewrite_thresholds_from_path_and_inspect(exported, tmp_path):
    ex = exported("llama")
    th = random_thresholds(ex.loaded)
    th.theta[0] = float("-inf")
    th.meta["dense_layers"] = [0]
    th_dir = tmp_path / "th"
    th.save(th_dir)
    out = tmp_path / "model.onnx"
    rewrite(ex.path, th_dir, out, comp_mode=1)
    s = summarize(out)
    assert s["dense_attention_nodes"] == 0 and s["opset"]["ai.toptheta"] == 1
    assert s["op_counts"]["ai.toptheta::TopThetaAttention"] == 3
    nodes = s["toptheta_nodes"]
    assert [n["layer"] for n in nodes] == [0, 1, 2]
    assert nodes[0]["dense"] and not nodes[1]["dense"]
    assert all(
        n["num_heads"] == 4 and n["num_kv_heads"] == 2 and n["rows"] == ROWS and n["comp_mode"] == 1 for n in nodes
    )
    assert nodes[1]["theta_mean"] == pytest.approx(float(th.theta[1].mean()), rel=1e-5)
    assert s["metadata"]["toptheta.thresholds_source"] == str(th_dir)
    text = format_summary(s)
    assert "TopThetaAttention: 3 nodes" in text and "model.layers.2.self_attn" in text
    assert "no TopThetaAttention nodes (3 dense Attention nodes)" in format_summary(summarize(ex.path))


# -- rewrite: numerics in onnxruntime -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_dense_thresholds_equal_dense_pytorch(exported, tmp_path, kind):
    ex = exported(kind)
    out = tmp_path / "model.onnx"
    rewrite(ex.path, dense_thresholds(ex.loaded), out)
    diffs = compare_steps(ex.loaded, session(out), mode_ctx=_nullctx, steps=2)
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("comp_mode", (0, 1, 2))
@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_toptheta_matches_reference(exported, tmp_path, kind, comp_mode):
    ex = exported(kind)
    th = random_thresholds(ex.loaded, seed=comp_mode)
    out = tmp_path / "model.onnx"
    rewrite(ex.path, th, out, comp_mode=comp_mode)

    def ctx():
        return attention_mode(ex.loaded.model, "toptheta", thresholds=th, comp_mode=comp_mode)

    got = []
    diffs = compare_steps(ex.loaded, session(out), mode_ctx=ctx, steps=3, first=got)
    assert max(diffs) <= TOL, diffs
    ids, mask = padded_batch(2, 8, 0)
    with torch.no_grad():
        dense = torch_out(ex.loaded.model(input_ids=ids, attention_mask=mask))
    assert max_diff(got[0], dense, mask) > 1e-3  # the pruning really changes the result


@pytest.mark.parametrize("kind", ("llama", "bert"))
def test_rewrite_kept_counts_match_reference(exported, tmp_path, kind):
    """The op's kept output (exposed as toptheta.kept.{l}) equals the reference's kept counts, and θ prunes."""
    ex = exported(kind)
    th = random_thresholds(ex.loaded, seed=7)
    out = tmp_path / "model.onnx"
    rewrite(ex.path, th, out, comp_mode=1, expose_kept=True)
    sess = session(out)
    kept_names = [o.name for o in sess.get_outputs() if o.name.startswith("toptheta.kept.")]
    assert kept_names == [f"toptheta.kept.{i}" for i in range(ex.loaded.num_layers)]
    ids, mask = padded_batch(2, 8, seed=3)
    rec = KeptRecorder()
    with torch.no_grad(), attention_mode(ex.loaded.model, "toptheta", thresholds=th, comp_mode=1, recorder=rec):
        ex.loaded.model(input_ids=ids, attention_mask=mask)
    outs = ort_run(sess, ids, mask)
    for layer in range(ex.loaded.num_layers):
        kept = outs[f"toptheta.kept.{layer}"]
        assert kept.dtype == np.int32 and kept.shape == (2, ex.loaded.num_heads, 8)
        assert int(kept.sum()) == int(rec.kept[layer])
    frac = sum(int(outs[n].sum()) for n in kept_names) / sum(rec.valid.values())
    assert 0.05 < frac < 0.95, frac  # the thresholds really prune, and keep something


def test_rewrite_keeps_4d_mask_for_sliding_window(exported, tmp_path):
    """A sliding-window model keeps the exported 4-D mask (causal=0); results still match the reference."""
    ex = exported("llama")
    th = random_thresholds(ex.loaded, seed=5)
    th.meta["sliding_window"] = 4096
    out = tmp_path / "model.onnx"
    report = rewrite(ex.path, th, out, comp_mode=1)
    assert {b["mask"] for b in report["layers"]} == {"4d"} and {b["causal"] for b in report["layers"]} == {0}
    m = onnx.load(str(out))
    assert "toptheta.key_padding_mask" not in {o for n in m.graph.node for o in n.output}

    def ctx():
        return attention_mode(ex.loaded.model, "toptheta", thresholds=th, comp_mode=1)

    assert max(compare_steps(ex.loaded, session(out), mode_ctx=ctx, steps=1)) <= TOL


# -- errors ----------------------------------------------------------------------------------------------


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_rewrite_wrong_head_count_is_one_line_error(exported, tmp_path):
    ex = exported("llama")
    bad = thresholds_for(ex.loaded, torch.zeros(3, 3, ROWS))
    with pytest.raises(TopThetaError) as ei:
        rewrite(ex.path, bad, tmp_path / "model.onnx")
    assert_one_line_error(ei, "layer 0", "model.layers.0.self_attn", "[3, 6]", "4 query heads")
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "layers,needles",
    [
        (2, ("layers [2]", "only 2 layers")),
        (4, ("layer 3 (model.layers.3.self_attn)", "not found in the exported graph", "re-export")),
    ],
)
def test_rewrite_layer_count_mismatch(exported, tmp_path, layers, needles):
    ex = exported("llama")
    bad = thresholds_for(ex.loaded, torch.zeros(layers, 4, ROWS))
    with pytest.raises(TopThetaError) as ei:
        rewrite(ex.path, bad, tmp_path / "model.onnx")
    assert_one_line_error(ei, *needles)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_rewrite_corrupt_onnx(exported, tmp_path, content):
    ex = exported("gpt2")
    bad = tmp_path / "in" / "dense.onnx"
    bad.parent.mkdir()
    data = ex.path.read_bytes()
    bad.write_bytes(b"this is not an ONNX protobuf\x00\xff" * 8 if content == "garbage" else data[: len(data) // 3])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TopThetaError) as ei:
        rewrite(bad, random_thresholds(ex.loaded), out_dir / "model.onnx")
    assert_one_line_error(ei, str(bad), "is not a valid ONNX model", "re-export")
    assert _files(out_dir) == []


def test_rewrite_missing_input(tmp_path, exported):
    ex = exported("gpt2")
    with pytest.raises(TopThetaError) as ei:
        rewrite(tmp_path / "nope.onnx", dense_thresholds(ex.loaded), tmp_path / "model.onnx")
    assert_one_line_error(ei, "does not exist")


def test_rewrite_unsupported_softcap(exported, tmp_path):
    ex = exported("gpt2")
    m = onnx.load(str(ex.path))
    node = [n for n in m.graph.node if n.op_type == "Attention"][1]
    for a in node.attribute:
        if a.name == "softcap":
            a.f = -30.0  # a positive cap is carried to the op (gemma2, tests/test_architectures.py)
    src = tmp_path / "in" / "softcap.onnx"
    src.parent.mkdir()
    onnx.save(m, str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(TopThetaError) as ei:
        rewrite(src, dense_thresholds(ex.loaded), out_dir / "model.onnx")
    assert_one_line_error(ei, "layer 1", "transformer.h.1.attn", "softcap")
    assert _files(out_dir) == []


def test_rewrite_rejects_bad_comp_mode_and_rewritten_input(exported, tmp_path):
    ex = exported("gpt2")
    with pytest.raises(TopThetaError) as ei:
        rewrite(ex.path, dense_thresholds(ex.loaded), tmp_path / "m.onnx", comp_mode=3)
    assert_one_line_error(ei, "comp_mode")
    once = tmp_path / "once.onnx"
    rewrite(ex.path, dense_thresholds(ex.loaded), once)
    with pytest.raises(TopThetaError) as ei:
        rewrite(once, dense_thresholds(ex.loaded), tmp_path / "twice.onnx")
    assert_one_line_error(ei, "already contains TopThetaAttention")
    assert not (tmp_path / "twice.onnx").exists()


def test_export_bad_arguments(exported, tmp_path):
    ex = exported("bert")
    with pytest.raises(TopThetaError) as ei:
        export_onnx(ex.loaded, tmp_path / "model.onnx", with_cache=True)
    assert_one_line_error(ei, "not a causal language model", "with_cache=False")
    with pytest.raises(TopThetaError) as ei:
        export_onnx(ex.loaded, tmp_path / "model.txt")
    assert_one_line_error(ei, "must be a file ending in .onnx")
    assert _files(tmp_path) == []


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_rewrite_materialises_fitted_theta(exported, tmp_path):
    """--theta-extrapolation fit: the graph carries θ for max_context rows (the calibrated ones unchanged, the
    rest a + b·Φ⁻¹(1 - k/(r+1)) per head), and onnxruntime keeps what the PyTorch reference keeps with it."""
    ex = exported("llama")
    lm = ex.loaded

    def z(r):  # Φ⁻¹(1 - k/(r+1)) with k = 3 (clamped like the fit for rows with at most k keys)
        return math.sqrt(2.0) * torch.erfinv(2.0 * (1.0 - 3.0 / (r + 1.0)).clamp(1e-9, 1 - 1e-12) - 1.0)

    r = torch.arange(ROWS, dtype=torch.float64)
    a = torch.linspace(-1.0, 0.5, lm.num_layers * lm.num_heads, dtype=torch.float64).view(lm.num_layers, -1)
    theta = (a[..., None] + 0.3 * z(r)).float()
    theta[0] = float("-inf")  # a dense layer stays dense
    th = Thresholds(theta, torch.full_like(theta, 0.25), {"dense_layers": [0], "k": 3})
    out = tmp_path / "model.onnx"
    rewrite(ex.path, th, out, expose_kept=True, theta_extrapolation="fit", max_context=24)
    m = onnx.load(str(out))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["toptheta.theta_extrapolation"] == "fit" and meta["toptheta.theta_rows"] == "24"
    ext = th.extended(24, "fit")
    want = a[1, :, None] + 0.3 * z(torch.arange(ROWS, 24, dtype=torch.float64))
    torch.testing.assert_close(ext.theta[1, :, ROWS:].double(), want, rtol=0, atol=1e-5)
    log = th.extended(24, "fit", model="log")  # the other model: a + b·ln(r+1), fitted on rows 3..5
    assert (log.theta[1, :, ROWS:] - ext.theta[1, :, ROWS:]).abs().max() > 1e-3
    assert torch.equal(ext.theta[:, :, :ROWS], th.theta) and bool(torch.isneginf(ext.theta[0]).all())
    ids, mask = padded_batch(1, 20, seed=2)
    rec = KeptRecorder()
    with torch.no_grad(), attention_mode(lm.model, "toptheta", thresholds=ext, recorder=rec):
        lm.model(input_ids=ids, attention_mask=mask)
    outs = ort_run(session(out), ids, mask)
    for layer in range(lm.num_layers):
        assert int(outs[f"toptheta.kept.{layer}"].sum()) == int(rec.kept[layer])
    with pytest.raises(TopThetaError, match="--max-context"):
        rewrite(ex.path, th, tmp_path / "m2.onnx", theta_extrapolation="fit")
    with pytest.raises(TopThetaError, match="unknown --theta-extrapolation"):
        rewrite(ex.path, th, tmp_path / "m2.onnx", theta_extrapolation="spline")
