"""Attention patching (dense / Top-θ / top-k) on tiny HF models, calibration, and the real SmolLM2 (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from topthetaexport._errors import TopThetaError
from topthetaexport.models import load_model
from topthetaexport.thresholds import Thresholds, check_k_growth, k_rows, parse_dense_heads, parse_layer_k
from topthetaexport.torch.attention import KeptRecorder, attention_mode
from topthetaexport.torch.calibration import calibrate

KINDS = ["llama", "qwen2", "mistral", "gpt2", "bert"]


def _out(lm, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    o = lm.model(input_ids=ids, attention_mask=mask)
    return o.logits if lm.is_lm else o.last_hidden_state


def _all_dense(lm, rows=8):
    shape = (lm.num_layers, lm.num_heads, rows)
    return Thresholds(torch.full(shape, float("-inf")), torch.zeros(shape), {})


@pytest.mark.parametrize("kind", KINDS)
def test_dense_and_inf_toptheta_match_sdpa(kind, request, tiny_tokens):
    lm = load_model(request.getfixturevalue(f"tiny_{kind}"))
    ids = tiny_tokens(2, 24)
    pad = torch.ones_like(ids)
    pad[1, :4] = 0  # left padding of the second sequence
    with torch.no_grad():
        before = _out(lm, ids)
        for mask in (None, pad):
            ref = _out(lm, ids, mask)
            with attention_mode(lm, "dense"):
                dense = _out(lm, ids, mask)
            with attention_mode(lm, "toptheta", thresholds=_all_dense(lm), comp_mode=1):
                inf = _out(lm, ids, mask)
            rows = slice(None) if mask is None else slice(4, None)  # padded query rows are undefined
            assert (dense[1, rows] - ref[1, rows]).abs().max() < 1e-5
            assert (dense[0] - ref[0]).abs().max() < 1e-5
            assert (inf - dense).abs().max() < 1e-5  # reference vs torch SDPA
        assert lm.model.config._attn_implementation == "sdpa"  # restored
        assert torch.equal(_out(lm, ids), before)


def test_mode_errors(tiny_llama):
    lm = load_model(tiny_llama)
    with pytest.raises(TopThetaError, match="unknown attention mode"):
        with attention_mode(lm, "sparse"):
            pass
    with pytest.raises(TopThetaError, match="needs thresholds"):
        with attention_mode(lm, "toptheta"):
            pass
    wrong = Thresholds(torch.zeros(5, 4, 3), torch.zeros(5, 4, 3), {})
    with pytest.raises(TopThetaError, match="5 layers"):
        with attention_mode(lm, "toptheta", thresholds=wrong):
            pass
    wrong_heads = Thresholds(torch.zeros(3, 2, 3), torch.zeros(3, 2, 3), {})
    with pytest.raises(TopThetaError, match="2 heads"):
        with attention_mode(lm, "toptheta", thresholds=wrong_heads):
            pass
    with pytest.raises(TopThetaError, match="needs k"):
        with attention_mode(lm, "topk"):
            pass
    # nesting: the inner mode applies inside, the outer one again after it
    ids = torch.arange(3, 19)[None]
    with torch.no_grad(), attention_mode(lm, "dense"):
        dense = _out(lm, ids)
        with attention_mode(lm, "topk", k=2):
            topk = _out(lm, ids)
        again = _out(lm, ids)
    assert torch.equal(dense, again) and (topk - dense).abs().max() > 1e-4
    # an exception inside the block still restores the implementation
    with pytest.raises(RuntimeError):
        with attention_mode(lm, "dense"):
            raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa"


def test_topk_mode_counts(tiny_gpt2, tiny_tokens):
    lm = load_model(tiny_gpt2)
    ids = tiny_tokens(2, 32)
    rec = KeptRecorder()
    with torch.no_grad(), attention_mode(lm, "topk", k=5, recorder=rec):
        _out(lm, ids)
    # causal row r has r+1 keys: kept = min(5, r+1)
    want = sum(min(5, r + 1) for r in range(32)) / 32
    assert set(rec.rows) == {0, 1, 2}
    assert all(abs(p["mean_kept"] - want) < 1e-9 and abs(p["mean_valid"] - 16.5) < 1e-9 for p in rec.per_layer())


def test_kv_cache_decode_matches_prefill(tiny_llama, tiny_tokens):
    """Top-θ with a DynamicCache: decode row positions are bottom-right aligned (r = P for the new token)."""
    lm = load_model(tiny_llama)
    ids = tiny_tokens(1, 40, seed=3)
    th = calibrate(lm, tiny_tokens(4, 40, seed=4), k=6, dense_layers=1, progress=None)
    with torch.no_grad(), attention_mode(lm, "toptheta", thresholds=th, comp_mode=1):
        full = lm.model(input_ids=ids).logits
        pre = lm.model(input_ids=ids[:, :36], use_cache=True)
        cache, steps = pre.past_key_values, []
        for t in range(36, 40):
            o = lm.model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            steps.append(o.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 36:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "bert"])
def test_calibrate_tiny(kind, request, tiny_tokens, tmp_path):
    lm = load_model(request.getfixturevalue(f"tiny_{kind}"))
    k, seq = 12, 96
    toks = tiny_tokens(6, seq, seed=1)
    th = calibrate(lm, toks, k=k, seq_len=seq, num_samples=6, dense_layers=1, progress=None)
    assert th.theta.shape == th.sdc.shape == (3, 4, seq)
    assert th.theta.dtype == torch.float32
    assert torch.all(th.theta[0] == float("-inf")) and th.dense_layers == [0]
    if lm.causal:  # rows with r + 1 <= k keep everything
        assert torch.all(th.theta[1:, :, :k] == float("-inf"))
        assert torch.isfinite(th.theta[1:, :, k:]).all()
    else:
        assert torch.isfinite(th.theta[1:]).all()
    assert torch.all(th.sdc >= 0) and torch.all(th.sdc < 1) and th.sdc[1:].max() > 0
    assert torch.all(th.sdc[th.theta == float("-inf")] == 0)
    m = th.meta
    assert (m["k"], m["seq_len"], m["num_samples"], m["num_layers"], m["num_heads"]) == (k, seq, 6, 3, 4)
    assert m["causal"] == lm.causal and m["model_type"] == kind and m["format_version"] == 1
    assert {"toptheta_version", "num_kv_heads", "head_dim", "calib_source", "created", "model"} <= set(m)

    # on the calibration data itself, rows with many keys keep about k elements
    rec = KeptRecorder(min_valid=2 * k)
    with torch.no_grad(), attention_mode(lm, "toptheta", thresholds=th, recorder=rec):
        _out(lm, toks)
    kept = rec.mean_kept(layers=[1, 2])
    assert k / 1.5 < kept < k * 1.5, kept
    assert rec.mean_kept(layers=[0]) == rec.mean_valid(layers=[0])  # dense layer keeps all

    # file round trip and compatibility
    th.save(tmp_path)
    back = Thresholds.load(tmp_path)
    assert torch.equal(back.theta, th.theta) and back.meta == th.meta
    back.check_compatible(lm)


def test_calibrate_sdc_changes_output(tiny_llama, tiny_tokens):
    lm = load_model(tiny_llama)
    toks = tiny_tokens(4, 64, seed=2)
    th = calibrate(lm, toks, k=8, dense_layers=0, progress=None)
    outs = {}
    with torch.no_grad():
        for mode in (0, 1, 2):
            with attention_mode(lm, "toptheta", thresholds=th, comp_mode=mode):
                outs[mode] = _out(lm, toks)
        with attention_mode(lm, "dense"):
            dense = _out(lm, toks)
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert (outs[0] - outs[1]).abs().max() > 1e-4 and (outs[1] - outs[2]).abs().max() > 1e-4
    assert (outs[0] - dense).abs().max() > 1e-4


def test_calibrate_errors(tmp_path, tiny_llama, tiny_tokens):
    lm = load_model(tiny_llama)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TopThetaError, match="no text found"):
        calibrate(lm, tmp_path / "empty.txt", progress=None)
    with pytest.raises(TopThetaError, match="does not exist"):
        calibrate(lm, tmp_path / "missing.txt", progress=None)
    with pytest.raises(TopThetaError, match="no tokenizer"):
        calibrate(lm, ["some text"], seq_len=8, progress=None)
    with pytest.raises(TopThetaError, match="dense_layers=9"):
        calibrate(lm, tiny_tokens(2, 16), dense_layers=9, progress=None)
    with pytest.raises(TopThetaError, match="exceeds the model's 256 positions"):
        calibrate(lm, tiny_tokens(1, 300), progress=None)
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        str(tmp_path / "t5")
    )
    with pytest.raises(TopThetaError, match="unsupported architecture 't5'"):
        calibrate(str(tmp_path / "t5"), tiny_tokens(2, 16), progress=None)


def test_calibrate_progress_output(tiny_gpt2, tiny_tokens, capsys):
    lm = load_model(tiny_gpt2)
    th = calibrate(lm, tiny_tokens(2, 16), k=4, batch_size=2, progress=None)
    assert th.theta.shape == (3, 4, 16)


# -- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_toptheta_perplexity(smollm2):
    from topthetaexport.data import token_batches

    lm = smollm2
    assert (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.model_type) == (30, 9, 3, 64, "llama")
    th = calibrate(lm, "builtin:pydoc", k=64, seq_len=256, num_samples=4, progress=None)
    assert th.dense_layers == [0, 1] and th.theta.shape == (30, 9, 256)
    held_out = token_batches(lm.tokenizer, "builtin:pydoc", seq_len=256, num_samples=2, skip=4)

    def ppl(mode, **kw):
        rec = KeptRecorder(min_valid=64)
        with torch.no_grad(), attention_mode(lm, mode, recorder=rec, **kw):
            logits = lm.model(input_ids=held_out).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten())
        return math.exp(float(nll)), rec.mean_kept(layers=range(2, 30)), rec.mean_valid(layers=range(2, 30))

    dense, _, valid = ppl("dense")
    assert 3 < dense < 60  # a working language model on Python docs
    for comp in (0, 1):
        sparse, kept, _ = ppl("toptheta", thresholds=th, comp_mode=comp)
        assert abs(sparse / dense - 1) < 0.05, (comp, sparse, dense)
        assert 40 < kept < 100 and kept < valid / 1.5, kept  # about k=64 of ~160 valid keys per row


def _unchunked_reference(lm, toks, k, dense_layers, krow=None):
    """The calibration before chunking (one full [S, S] score matrix per layer, dense SDPA outputs), kept here
    as the oracle of the chunked one. ``krow`` [S]: k per row (default: ``k`` for every row)."""
    layers, heads, rows = lm.num_layers, lm.num_heads, toks.shape[1]
    krow = torch.full((rows,), k) if krow is None else krow
    sums = [torch.zeros(layers, heads, rows, dtype=torch.float64) for _ in range(2)]
    cnts = [torch.zeros(layers, heads, rows, dtype=torch.float64) for _ in range(2)]
    dense = set(range(dense_layers))
    theta = None

    def kth_hook(layer, s, valid):
        if layer in dense or s.shape[-1] <= k:
            return
        ordered = s.masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True).values
        at = (krow - 1).clamp(max=s.shape[-1] - 1).view(1, 1, -1, 1).expand(*s.shape[:3], 1)
        kth = ordered.gather(-1, at)[..., 0]
        ok = valid.sum(-1) > krow
        sums[0][layer] += torch.where(ok, kth.double(), 0.0).sum(0)
        cnts[0][layer] += ok.sum(0).double()

    def sdc_hook(layer, s, valid):
        th = theta[layer][None, :, :, None]
        if not torch.isfinite(th).any():
            return
        pruned = valid & (s < th)
        n = pruned.sum(-1)
        mass = torch.exp(torch.where(pruned, s - th, float("-inf"))).sum(-1) / n.clamp(min=1)
        sums[1][layer] += torch.where(n > 0, mass.double(), 0.0).sum(0)
        cnts[1][layer] += (n > 0).sum(0).double()

    body = getattr(lm.model, "base_model", lm.model)
    for i, hook in enumerate((kth_hook, sdc_hook)):
        with torch.no_grad(), attention_mode(lm.model, "dense", score_hook=hook):
            for row in toks:
                body(input_ids=row[None], attention_mask=torch.ones_like(row[None]))
        mean = torch.where(cnts[i] > 0, sums[i] / cnts[i].clamp(min=1), float("-inf") if i == 0 else 0.0).float()
        if i == 0:
            theta = mean
            theta[list(dense)] = float("-inf")
    return theta, mean


def test_chunked_calibration_equals_unchunked(tiny_llama, tiny_tokens):
    """Chunks of 3 query rows give the θ and ρ of the full-matrix calibration (GQA model)."""
    lm = load_model(tiny_llama)
    k, seq = 7, 40
    toks = tiny_tokens(3, seq, seed=5)
    theta_ref, sdc_ref = _unchunked_reference(lm, toks, k, 1)
    one_chunk = calibrate(lm, toks, k=k, num_samples=3, dense_layers=1, progress=None)
    heads = lm.num_heads
    for budget in (3 * heads * seq,):
        th = calibrate(lm, toks, k=k, num_samples=3, dense_layers=1, chunk_elements=budget, progress=None)
        assert torch.equal(torch.isfinite(th.theta), torch.isfinite(theta_ref))
        fin = torch.isfinite(theta_ref)
        torch.testing.assert_close(th.theta[fin], theta_ref[fin], rtol=0, atol=2e-5)
        torch.testing.assert_close(th.sdc, sdc_ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(th.theta[fin], one_chunk.theta[fin], rtol=0, atol=1e-5)  # fp32 matmul order
    assert fin.sum() > 0 and th.meta["aggregation"] == "mean" and th.meta["calib_device"] == "cpu"


def test_calibration_options(tiny_llama, tiny_tokens):
    """mean + c·σ lies above the mean where rows vary; top-k during calibration changes later layers only."""
    lm = load_model(tiny_llama)
    toks = tiny_tokens(4, 40, seed=6)
    base = calibrate(lm, toks, k=6, dense_layers=1, progress=None)
    sig = calibrate(lm, toks, k=6, dense_layers=1, aggregation="mean+sigma", sigma_c=0.1, progress=None)
    fin = torch.isfinite(base.theta)
    diff = sig.theta[fin] - base.theta[fin]
    assert (diff >= -1e-6).all() and diff.max() > 1e-4 and sig.meta["aggregation"] == "mean+0.1sigma"
    topk = calibrate(lm, toks, k=6, dense_layers=1, calib_topk=True, progress=None)
    torch.testing.assert_close(topk.theta[1], base.theta[1])  # layer 1 sees dense layer 0 in both
    assert (topk.theta[2][fin[2]] - base.theta[2][fin[2]]).abs().max() > 1e-5 and topk.meta["calib_topk"]
    with pytest.raises(TopThetaError, match="aggregation 'median' is unknown"):
        calibrate(lm, toks, aggregation="median", progress=None)
    with pytest.raises(TopThetaError, match="sigma_c"):
        calibrate(lm, toks, aggregation="mean+sigma", sigma_c=-1, progress=None)


def test_k_growth_calibration(tiny_llama, tiny_tokens):
    """--k-growth: θ of row r is the k(r)-th largest score (k(r) = max(k, ⌈F·(r+1)⌉)), chunked as unchunked;
    the fit past the calibrated rows follows k(r) (a kept fraction: a constant θ); bad specs fail in one line."""
    lm = load_model(tiny_llama)
    k, seq = 3, 40
    toks = tiny_tokens(3, seq, seed=7)
    krow = k_rows(torch.arange(seq), k, "fraction:0.25")
    assert krow[:12].tolist() == [3] * 12 and krow[-1] == 10
    theta_ref, _ = _unchunked_reference(lm, toks, k, 1, krow=krow)
    th = calibrate(
        lm,
        toks,
        k=k,
        num_samples=3,
        dense_layers=1,
        k_growth="fraction:0.25",
        chunk_elements=3 * 4 * seq,
        progress=None,
    )
    fin = torch.isfinite(theta_ref)
    assert torch.equal(torch.isfinite(th.theta), fin) and th.meta["k_growth"] == "fraction:0.25"
    torch.testing.assert_close(th.theta[fin], theta_ref[fin], rtol=0, atol=2e-5)
    const = calibrate(lm, toks, k=k, num_samples=3, dense_layers=1, progress=None)
    grown = fin.clone()
    grown[..., :12] = False  # rows with k(r) > k keep more, so their θ is lower
    assert bool((th.theta[grown] <= const.theta[grown] + 1e-6).all()) and const.meta["k_growth"] is None
    ext = th.extended(100, "fit")
    tail = ext.theta[1:, :, seq:]
    want = th.theta[1:, :, seq // 2 :].double().mean(-1, keepdim=True)  # x(r) = Φ⁻¹(0.75) on every fitted row
    torch.testing.assert_close(tail.double(), want.expand_as(tail), rtol=0, atol=1e-4)
    for bad in ("fraction:0", "fraction:2", "power:0.5", "sqrt"):
        with pytest.raises(TopThetaError, match="k growth"):
            check_k_growth(bad)
    assert check_k_growth("power:0.5@512") == "power:0.5@512" and check_k_growth("none") is None
    assert k_rows(torch.tensor([1023, 2047]), 64, "power:0.5@512").tolist() == [91, 128]


def test_fit_range_all_uses_every_row_with_more_than_k_keys():
    """extended(..., "fit", fit_range="all") fits θ = a + b·Φ⁻¹(1 - k/(r+1)) by least squares on every calibrated
    row with more than k keys, the default ("half") on the last half (docs/accuracy.md "θ past R: which fit").
    Rows with at most k keys (θ = -inf) and dense layers are left alone; an unknown range fails in one line."""
    k, rows, new = 4, 40, 64
    r = torch.arange(rows, dtype=torch.float64)
    x = math.sqrt(2.0) * torch.erfinv(2.0 * (1.0 - k / (r + 1.0)).clamp(1e-9, 1 - 1e-12) - 1.0)
    wiggle = torch.where(r < rows // 2, 0.3, -0.1) * torch.sin(r)  # not on the line: the fitted rows matter
    theta = (1.0 + 0.5 * x + wiggle).expand(2, 3, rows).clone()
    theta[..., : k + 1] = float("-inf")  # rows with at most k keys are dense
    theta[0] = float("-inf")
    th = Thresholds(theta.float(), torch.zeros(2, 3, rows), {"k": k, "dense_layers": [0]})
    rn = torch.arange(rows, new, dtype=torch.float64)
    xn = math.sqrt(2.0) * torch.erfinv(2.0 * (1.0 - k / (rn + 1.0)) - 1.0)
    for fit_range, r0 in (("all", k + 1), ("half", rows // 2)):
        ext = th.extended(new, "fit", fit_range=fit_range)
        design = torch.stack([torch.ones(rows - r0, dtype=torch.float64), x[r0:]], -1)
        a, b = torch.linalg.lstsq(design, th.theta[1, 0, r0:].double()[:, None]).solution[:, 0]
        torch.testing.assert_close(ext.theta[1, :, rows:].double(), (a + b * xn).expand(3, -1), rtol=0, atol=1e-4)
        assert ext.meta["theta_fit"]["rows_fitted_from"] == r0 and ext.meta["theta_fit"]["fit_range"] == fit_range
        assert torch.equal(ext.theta[..., :rows], th.theta) and bool(torch.isneginf(ext.theta[0]).all())
    default = th.extended(new, "fit")
    assert torch.equal(default.theta, th.extended(new, "fit", fit_range="half").theta)
    assert (th.extended(new, "fit", fit_range="all").theta[1, :, rows:] - default.theta[1, :, rows:]).abs().max() > 1e-2
    with pytest.raises(TopThetaError, match="unknown θ fit range"):
        th.extended(new, "fit", fit_range="quarter")


def test_layer_k_calibrates_those_layers_for_their_own_k(tiny_llama, tiny_tokens):
    """--layer-k: the named layers get the θ (and ρ) of a calibration at their k, the others that of --k; the fit
    past the calibrated rows uses each layer's own k; layers that do not exist or are dense fail in one line."""
    lm = load_model(tiny_llama)
    toks = tiny_tokens(3, 40, seed=8)
    base = calibrate(lm, toks, k=4, dense_layers=1, progress=None)
    wide = calibrate(lm, toks, k=9, dense_layers=1, progress=None)
    mixed = calibrate(lm, toks, k=4, dense_layers=1, layer_k="2=9", progress=None)
    assert mixed.meta["layer_k"] == {"2": 9} and mixed.layer_k == {2: 9} and mixed.k_of(2) == 9 and mixed.k_of(1) == 4
    assert torch.equal(mixed.theta[:2], base.theta[:2]) and torch.equal(mixed.theta[2], wide.theta[2])
    torch.testing.assert_close(mixed.sdc[2], wide.sdc[2])  # ρ is measured against that layer's own θ
    ext, ext_base, ext_wide = (t.extended(64, "fit") for t in (mixed, base, wide))
    assert torch.equal(ext.theta[1], ext_base.theta[1]) and torch.equal(ext.theta[2], ext_wide.theta[2])
    assert mixed.stats()["layer_k"] == {"2": 9} and "layer_k" not in base.meta
    assert mixed.layer_k_at(8) == {2: 18} and mixed.layer_k_at(1) == {2: 2} and base.layer_k_at(8) == {}
    with pytest.raises(TopThetaError, match="layer 0, which is dense"):
        calibrate(lm, toks, k=4, dense_layers=1, layer_k="0=9", progress=None)
    with pytest.raises(TopThetaError, match=f"has layers 0..{lm.num_layers - 1}"):
        calibrate(lm, toks, k=4, dense_layers=1, layer_k={lm.num_layers: 9}, progress=None)


def test_dense_heads_keep_every_key(tiny_llama, tiny_tokens):
    """--dense-heads: θ = -inf for those heads in every calibrated and fitted row (they keep every key), the other
    heads as without the option; heads or layers out of range, or already dense, fail in one line."""
    lm = load_model(tiny_llama)
    toks = tiny_tokens(3, 40, seed=9)
    base = calibrate(lm, toks, k=4, dense_layers=1, progress=None)
    th = calibrate(lm, toks, k=4, dense_layers=1, dense_heads="1:0+2", progress=None)
    assert th.meta["dense_heads"] == {"1": [0, 2]}
    assert bool(torch.isneginf(th.theta[1, [0, 2]]).all()) and bool((th.sdc[1, [0, 2]] == 0).all())
    others = [h for h in range(lm.num_heads) if h not in (0, 2)]
    assert torch.equal(th.theta[1, others], base.theta[1, others]) and torch.equal(th.theta[2:], base.theta[2:])
    ext = th.extended(64, "fit")
    assert bool(torch.isneginf(ext.theta[1, [0, 2]]).all()) and bool(torch.isfinite(ext.theta[1, others, -1]).all())
    with pytest.raises(TopThetaError, match="dense already"):
        calibrate(lm, toks, k=4, dense_layers=1, dense_heads="0:1", progress=None)
    with pytest.raises(TopThetaError, match=f"heads are 0..{lm.num_heads - 1}"):
        calibrate(lm, toks, k=4, dense_layers=1, dense_heads={1: [lm.num_heads]}, progress=None)


def test_layer_k_and_dense_heads_specs():
    """The --layer-k and --dense-heads grammars: lists, ranges, dicts; each malformed spec fails in one line."""
    assert parse_layer_k("2+4+15=384,7-9=256") == {2: 384, 4: 384, 15: 384, 7: 256, 8: 256, 9: 256}
    assert parse_layer_k({"3": 8}) == {3: 8} and parse_layer_k("") == {} and parse_layer_k(None) == {}
    assert parse_dense_heads("1:5+7,3:0-2") == {1: [5, 7], 3: [0, 1, 2]} and parse_dense_heads({2: [1]}) == {2: [1]}
    for bad, message in (
        ("2+4", "no LAYERS=K"),
        ("a=3", "is not integers"),
        ("2=x", "not two integers"),
        ("2=0", "k >= 1"),
        ("2=8,2=9", "two k"),
    ):
        with pytest.raises(TopThetaError, match=message):
            parse_layer_k(bad)
    for bad, message in (
        ("1", "no LAYER:HEADS"),
        ("1:x", "is not integers"),
        ("y:1", "not two integers"),
        ({1: [-2]}, ">= 0"),
    ):
        with pytest.raises(TopThetaError, match=message):
            parse_dense_heads(bad)
