"""The architectures added to the registry after llama/qwen2/mistral/gpt2/bert, end to end on tiny configs.

qwen3 (q/k norm), phi3 (fused projections, partial rotary, a window on every layer), gemma2 (attention logit
softcap, alternating sliding / global layers), gemma3 text (q/k norm, sliding and global layers, head dim 256)
and gpt_neox (partial rotary): each is exported, rewritten and run in onnxruntime (CPU, our library) against
the PyTorch model, dense and Top-θ, over a prefill and decode steps that run past the sliding window; and each
is calibrated.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import make_tokens, save_tiny_model
from test_export_rewrite import (
    TOL,
    Exported,
    _nullctx,
    compare_steps,
    max_diff,
    padded_batch,
    random_thresholds,
    session,
    torch_out,
)

from topthetaexport.architectures import ARCHITECTURES
from topthetaexport.models import load_model
from topthetaexport.onnx.exporter import export_onnx
from topthetaexport.onnx.rewriter import rewrite
from topthetaexport.torch.attention import KeptRecorder, attention_mode
from topthetaexport.torch.calibration import calibrate

NEW_KINDS = ("qwen3", "phi3", "gemma2", "gemma3", "gpt_neox")
MODEL_TYPE = {"gemma3": "gemma3_text"}
WINDOW = 6  # the tiny configs' sliding window (phi3, gemma2, gemma3): prefill 10 + 3 steps run past it
KINDS_OF_LAYERS = {
    "qwen3": ["global"] * 3,
    "phi3": ["sliding"] * 3,
    "gemma2": ["sliding", "global", "sliding"],
    "gemma3": ["sliding", "sliding", "global"],
    "gpt_neox": ["global"] * 3,
}


@pytest.fixture(scope="module")
def exported(tiny_models_dir, tmp_path_factory):
    cache: dict[str, Exported] = {}

    def get(kind: str) -> Exported:
        if kind not in cache:
            loaded = load_model(save_tiny_model(kind, tiny_models_dir))
            out = tmp_path_factory.mktemp(f"dense-{kind}") / "model.onnx"
            export_onnx(loaded, out)
            cache[kind] = Exported(loaded, out, 0.0)
        return cache[kind]

    return get


def test_registry_has_one_entry_each():
    for kind in NEW_KINDS:
        arch = ARCHITECTURES[MODEL_TYPE.get(kind, kind)]
        assert arch.causal and arch.layers_attr == "layers"
    assert ARCHITECTURES["gemma2"].attn_implementation == "eager"  # sdpa refuses softcap
    assert all(a.attn_implementation == "sdpa" for t, a in ARCHITECTURES.items() if t != "gemma2")


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_dense_export_matches_pytorch(exported, kind):
    ex = exported(kind)
    loaded = ex.loaded
    assert loaded.model_type == MODEL_TYPE.get(kind, kind)
    assert loaded.architecture.attention_kinds(loaded.config) == KINDS_OF_LAYERS[kind]
    m = onnx.load(str(ex.path))
    meta = {p.key: p.value for p in m.metadata_props}
    windowed = "sliding" in KINDS_OF_LAYERS[kind]
    assert meta["toptheta.sliding_window"] == str(WINDOW if windowed else 0)
    attention = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attention) == loaded.num_layers
    caps = {onnx.helper.get_attribute_value(a) for n in attention for a in n.attribute if a.name == "softcap"}
    assert caps == ({2.0} if kind == "gemma2" else {0.0} if caps else set())
    diffs = compare_steps(loaded, session(ex.path), mode_ctx=_nullctx, steps=3, seq=10)
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_auto_kv_cache_on_cuda_is_concat_for_windowed_models(exported, kind):
    """`--device cuda` picks the shared cache, which needs every layer on the key-padding mask: a model with
    sliding-window layers (4-D masks kept) gets the concat form, from the loaded model and from its dense export."""
    try:
        from topthetaexport.cli.main import _dense_sliding_window
    except ImportError:  # a source checkout without installing
        from cli.main import _dense_sliding_window
    from topthetaexport.pipeline import _kv_cache_form

    ex = exported(kind)
    windowed = "sliding" in KINDS_OF_LAYERS[kind]
    assert _dense_sliding_window(ex.path) == windowed
    assert bool(ex.loaded.architecture.sliding_window(ex.loaded.config)) == windowed
    assert _kv_cache_form("auto", "cpu", ex.loaded) == "concat"


@pytest.mark.parametrize("comp_mode", (0, 2))
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_rewrite_toptheta_matches_reference(exported, tmp_path, kind, comp_mode):
    ex = exported(kind)
    loaded = ex.loaded
    th = random_thresholds(loaded, seed=10 + comp_mode)
    out = tmp_path / "model.onnx"
    report = rewrite(ex.path, th, out, comp_mode=comp_mode)
    windowed = "sliding" in KINDS_OF_LAYERS[kind]
    # a windowed model keeps each layer's exported mask (sliding or global); the others share the key padding
    assert {b["mask"] for b in report["layers"]} == {"4d" if windowed else "key_padding"}
    gqa = loaded.num_kv_heads != loaded.num_heads
    assert [b["form"] for b in report["layers"]] == ["CachedGqaAttention" if gqa else "CachedMhaAttention"] * 3
    nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "TopThetaAttention"]
    caps = [onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "softcap"]
    assert caps == ([2.0] * 3 if kind == "gemma2" else [])

    def ctx():
        return attention_mode(loaded.model, "toptheta", thresholds=th, comp_mode=comp_mode)

    got = []
    diffs = compare_steps(loaded, session(out), mode_ctx=ctx, steps=3, seq=10, first=got)
    assert max(diffs) <= TOL, diffs
    ids, mask = padded_batch(2, 10, 0)
    with torch.no_grad():
        dense = torch_out(loaded.model(input_ids=ids, attention_mask=mask))
    assert max_diff(got[0], dense, mask) > 1e-3  # the pruning really changes the result


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_calibrate_thresholds_both_kinds_of_layers(tiny_models_dir, kind):
    loaded = load_model(save_tiny_model(kind, tiny_models_dir))
    k, seq = 4, 48
    toks = make_tokens(4, seq, seed=2)
    th = calibrate(loaded, toks, k=k, seq_len=seq, num_samples=4, dense_layers=0, progress=None)
    kinds = KINDS_OF_LAYERS[kind]
    assert th.theta.shape == (3, loaded.num_heads, seq)
    assert th.meta["attention_kinds"] == kinds
    assert th.meta["sliding_window"] == (WINDOW if "sliding" in kinds else 0)
    assert torch.isfinite(th.theta[:, :, k:]).all()  # every layer, sliding or global, has rows with > k keys
    stats = th.stats()
    assert sorted(stats["by_attention"]) == sorted(set(kinds))
    assert [p["attention"] for p in stats["per_layer"]] == kinds

    rec = KeptRecorder(min_valid=k)
    with torch.no_grad(), attention_mode(loaded, "toptheta", thresholds=th, recorder=rec):
        loaded.model(input_ids=toks)
    for which in set(kinds):
        layers = [i for i, kd in enumerate(kinds) if kd == which]
        kept, valid = rec.mean_kept(layers), rec.mean_valid(layers)
        if which == "sliding":  # a sliding row sees at most the window
            assert valid <= WINDOW
        else:
            assert valid > 2 * WINDOW
        assert k / 2 < kept < k * 2 and kept < valid, (which, kept, valid)


def test_gemma2_topk_variant_caps_scores(exported, tmp_path):
    """The exact top-k twin of a softcapped model caps its scores too (the PyTorch top-k mode does)."""
    import onnx_ir as ir

    from topthetaexport.onnx.variants import ReplaceWithTopK

    ex = exported("gemma2")
    rewritten = tmp_path / "tt.onnx"
    rewrite(ex.path, random_thresholds(ex.loaded), rewritten)
    model = ir.load(rewritten)
    ReplaceWithTopK(3)(model)
    assert "Tanh" in {n.op_type for n in model.graph}
    topk = tmp_path / "topk.onnx"
    ir.save(model, topk)

    def ctx():
        return attention_mode(ex.loaded.model, "topk", k=3)

    diffs = compare_steps(ex.loaded, session(topk), mode_ctx=ctx, steps=2, seq=10)
    assert max(diffs) <= TOL, diffs


@pytest.mark.slow  # the whole pipeline (calibrate, export, rewrite, validate) on two tiny models
@pytest.mark.parametrize("kind", ("gemma2", "gemma3"))
def test_pipeline_reports_sliding_and_global_layers(tmp_path, tiny_models_dir, kind):
    from topthetaexport.pipeline import run_pipeline

    report = run_pipeline(
        str(save_tiny_model(kind, tiny_models_dir)),
        make_tokens(3, 48, seed=1),
        tmp_path / "out",
        k=4,
        seq_len=48,
        num_samples=3,
        dense_layers=0,
        comp_mode=1,
        eval_data=make_tokens(2, 48, seed=2),
        eval_windows=2,
        decode_steps=4,
    )
    v = report["validation"]
    assert v["parity"]["pass"] and v["parity"]["max_abs_diff_vs_torch_toptheta_pinned"] <= TOL
    assert v["parity"]["keep_decisions_window0"]["rows_with_different_kept_count"] == 0
    by_kind = v["attention_elements"]["sparse_layers_kept_fraction_by_attention"]
    assert set(by_kind) == {"sliding", "global"}
    # both kinds prune, each against the keys it sees (a sliding row: at most the window of 6)
    assert 0.3 < by_kind["sliding"] < 0.95 and 0.0 < by_kind["global"] < 0.5, by_kind
    assert v["decode"]["max_abs_diff_decode_vs_prefill"] <= TOL
