"""The measurement engine (topthetaexport.eval.measure) and what validation builds on it: the same numbers in
every run, and model-level parity against the PyTorch reference pinned to onnxruntime's keep decisions.

Real onnxruntime sessions with the custom-op library on tiny random-weight LLaMAs (GQA 4/2 heads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokens

from topthetaexport._errors import TopThetaError

SEQ = 48
K = 6


def _export(loaded, th, out: Path) -> Path:
    from topthetaexport.pipeline import export

    export(loaded, th, out)
    return out


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_llama, tmp_path_factory):
    """(loaded model, output folder) of the tiny LLaMA with calibrated θ, layer 0 dense."""
    from topthetaexport.models import load_model
    from topthetaexport.torch.calibration import calibrate

    loaded = load_model(tiny_llama)
    th = calibrate(loaded, make_tokens(3, SEQ, seed=1), k=K, seq_len=SEQ, num_samples=3, dense_layers=1, progress=None)
    return loaded, _export(loaded, th, tmp_path_factory.mktemp("measure") / "out")


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "onnx_seconds_per_window"}


def test_validate_twice_gives_identical_numbers(tiny_calibrated):
    """Two validations of one folder: every number equal (timings aside), threads pinned, reported, restored."""
    from topthetaexport.eval.validation import validate

    loaded, out = tiny_calibrated
    before = torch.get_num_threads()
    data = make_tokens(3, SEQ, seed=2)
    first = validate(out, model=loaded, data=data, decode_steps=4)
    assert torch.get_num_threads() == before
    second = validate(out, model=loaded, data=data, decode_steps=4)
    assert _without_timing(first) == _without_timing(second)
    assert first["threads"] == {"onnxruntime_intra_op": 1, "torch": 1}
    par = first["parity"]
    assert par["pass"] and par["max_abs_diff_vs_torch_toptheta_pinned"] <= par["tolerance"] == 1e-4
    assert par["pinned_rows_differing_from_ort"] == 0
    assert par["decision_flips_rows_compared"] == 3 * 3 * 4 * SEQ  # windows x layers x heads x rows
    assert first["perplexity"]["toptheta_torch_pinned"] == pytest.approx(first["perplexity"]["toptheta_onnx"], rel=1e-5)
    # GQA: a KV group reads the union of what its query heads keep, never less than one head, never above dense
    dec = first["decode"]
    assert dec["v_rows_kept_per_step"] <= dec["v_rows_read_kv_group_union_per_step"] <= dec["v_rows_dense_per_step"]
    assert dec["v_rows_read_kv_group_union_reduction"] >= 1.0


def _thresholds_on_scores(loaded, tokens: torch.Tensor, calibrated):
    """θ of every (layer, head, row) set to the row's K-th largest dense PyTorch score on ``tokens`` itself:
    in layer 0 (whose scores Top-θ does not change) a kept score then equals θ up to float32 rounding."""
    from topthetaexport.thresholds import Thresholds
    from topthetaexport.torch.attention import attention_mode

    theta = torch.full_like(calibrated.theta, float("-inf"))

    def hook(layer: int, s: torch.Tensor, valid: torch.Tensor) -> None:
        kth = s.masked_fill(~valid, float("-inf")).topk(K, dim=-1).values[0, :, :, -1]  # [Hq, S]
        kth[:, :K] = float("-inf")  # rows with <= K keys keep all of them
        theta[layer, :, : kth.shape[1]] = kth

    with torch.no_grad(), attention_mode(loaded.model, "dense", score_hook=hook):
        loaded.model(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    meta = {**calibrated.meta, "dense_layers": []}
    return Thresholds(theta, torch.zeros_like(calibrated.sdc), meta)


def test_pinned_parity_holds_where_scores_sit_on_theta(tiny_calibrated, tmp_path):
    """θ placed on the scores themselves: the unpinned PyTorch run flips keep decisions (and its logits move
    beyond the tolerance), the PyTorch run pinned to onnxruntime's decisions stays within 1e-4."""
    from topthetaexport.eval.measure import fp64_keep_masks, read_op_attrs
    from topthetaexport.eval.validation import validate
    from topthetaexport.ort.sessions import OnnxModel
    from topthetaexport.thresholds import Thresholds

    loaded, calibrated_out = tiny_calibrated
    tokens = make_tokens(1, SEQ, seed=5)
    th = _thresholds_on_scores(loaded, tokens, Thresholds.load(calibrated_out))
    out = _export(loaded, th, tmp_path / "borderline")

    # the setting is what the test claims: many layer-0 scores within 1e-6 of their θ in onnxruntime's run
    om = OnnxModel(out / "model.onnx", expose_io=True, threads=1)
    io = om.run(tokens.numpy()).io
    attrs = read_op_attrs(out / "model.onnx")
    q = torch.from_numpy(io["toptheta.io.0.q"]).double()
    k = torch.from_numpy(io["toptheta.io.0.k"]).double().repeat_interleave(2, dim=1)  # GQA 4/2
    s = (q @ k.transpose(-1, -2)) * float(np.float32(attrs[0].get("scale") or q.shape[-1] ** -0.5))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    near = (((s - th.theta[0, None, :, :SEQ, None].double()).abs() < 1e-6) & causal).sum().item()
    assert near >= 20
    assert fp64_keep_masks(io, attrs, th)[0].any()

    rep = validate(out, model=loaded, thresholds=th, data=tokens, decode_steps=4)
    par = rep["parity"]
    assert par["decision_flips"] >= 5
    assert par["pinned_rows_differing_from_ort"] == 0
    assert par["max_abs_diff_vs_torch_toptheta_pinned"] <= 1e-4 and par["pass"]
    assert par["max_abs_diff_vs_torch_toptheta_pinned_fp32"] <= 1e-4  # tiny models: fp32 floor far below 1e-4
    assert par["max_abs_diff_vs_torch_toptheta"] > 10 * par["max_abs_diff_vs_torch_toptheta_pinned"]


def test_kv_group_union_counts_each_v_row_once_per_group():
    from topthetaexport.eval.measure import kv_group_union

    keep = torch.zeros(1, 4, 1, 5, dtype=torch.bool)  # 4 query heads on 2 KV heads
    keep[0, 0, 0, [0, 1]] = True
    keep[0, 1, 0, [1, 2]] = True  # group 0: keys {0, 1, 2}
    keep[0, 3, 0, [4]] = True  # group 1: key {4}
    assert kv_group_union(keep, 2).tolist() == [[[3], [1]]]


def test_pinned_keep_masks_are_checked(tiny_calibrated):
    """A pinned run needs a mask of the call's shape for every layer, and only in Top-θ mode."""
    from topthetaexport.thresholds import Thresholds
    from topthetaexport.torch.attention import attention_mode

    loaded, out = tiny_calibrated
    th = Thresholds.load(out)
    ids = make_tokens(1, 8)
    full = {layer: torch.ones(1, 4, 8, 8, dtype=torch.bool) for layer in range(3)}
    with torch.no_grad():
        with attention_mode(loaded.model, "toptheta", thresholds=th, keep_masks=full):
            pinned = loaded.model(input_ids=ids).logits
        with attention_mode(loaded.model, "dense"):
            dense = loaded.model(input_ids=ids).logits
        # causal validity still applies: "keep everything" pinned is dense attention
        assert (pinned - dense).abs().max() < 1e-5
        with (
            pytest.raises(TopThetaError, match="no mask for layer 2"),
            attention_mode(loaded.model, "toptheta", thresholds=th, keep_masks={0: full[0], 1: full[1]}),
        ):
            loaded.model(input_ids=ids)
        with (
            pytest.raises(TopThetaError, match="queries and 8 keys"),
            attention_mode(
                loaded.model, "toptheta", thresholds=th, keep_masks={i: m[..., :5] for i, m in full.items()}
            ),
        ):
            loaded.model(input_ids=ids)
    with (
        pytest.raises(TopThetaError, match="use them with mode 'toptheta'"),
        attention_mode(loaded.model, "dense", keep_masks=full),
    ):
        pass
