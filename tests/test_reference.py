"""The PyTorch reference (parity oracle) against an independent loop implementation of docs/op.md and SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from topthetaexport._errors import TopThetaError
from topthetaexport.thresholds import Thresholds
from topthetaexport.torch.reference import dense_attention, topk_attention, toptheta_attention


def loop_reference(
    q, k, v, thr, *, scale=None, causal=False, mask=None, past_k=None, past_v=None, sdc=None, comp_mode=0
):
    """Row-by-row, key-by-key transcription of docs/op.md in Python floats (mask: None, bool or additive)."""
    if past_k is not None:
        k = torch.cat([past_k, k], 2)
        v = torch.cat([past_v, v], 2)
    b_, hq, sq, d = q.shape
    hkv, ktot, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = scale or 1 / math.sqrt(d)
    rows = thr.shape[1]
    out = torch.zeros(b_, hq, sq, dv, dtype=torch.float64)
    kept_all = torch.zeros(b_, hq, sq, dtype=torch.int32)
    for b in range(b_):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(sq):
                r = ktot - sq + i
                rr = min(r, rows - 1)
                th = float(thr[h, rr])
                rho = float(sdc[h, rr]) if sdc is not None else 0.0
                valid, s = [], []
                for j in range(ktot):
                    ok = (not causal) or j <= r
                    a = 0.0
                    if mask is not None:
                        mv = (
                            mask[b, j]
                            if mask.dim() == 2
                            else mask[
                                b if mask.shape[0] > 1 else 0,
                                h if mask.shape[1] > 1 else 0,
                                i if mask.shape[2] > 1 else 0,
                                j,
                            ]
                        )
                        if mask.dtype == torch.bool:
                            ok = ok and bool(mv)
                        elif float(mv) <= -1e30:
                            ok = False
                        else:
                            a = float(mv)
                    valid.append(ok)
                    s.append(scale * float(q[b, h, i] @ k[b, g, j]) + a)
                kept = [j for j in range(ktot) if valid[j] and s[j] >= th]
                nv = sum(valid)
                npr = nv - len(kept)
                m = max([th] + [s[j] for j in kept])
                dk = sum(math.exp(s[j] - m) for j in kept)
                zero = torch.zeros(dv, dtype=torch.float64)
                num = sum((math.exp(s[j] - m) * v[b, g, j].double() for j in kept), zero)
                dp = npr * rho * math.exp(th - m) if (comp_mode >= 1 and sdc is not None and npr > 0) else 0.0
                if comp_mode == 2 and nv:
                    vbar = sum((v[b, g, j].double() for j in range(ktot) if valid[j]), zero) / nv
                    num = num + dp * vbar
                den = dk + dp
                if den > 0:
                    out[b, h, i] = num / den
                kept_all[b, h, i] = len(kept)
    return out, kept_all


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


CASES = [
    # b, hq, hkv, sq, sk, past, causal, mask kind
    (2, 4, 2, 5, 5, 0, True, None),
    (1, 3, 3, 6, 6, 0, False, "pad_bool"),
    (2, 4, 1, 1, 1, 6, True, "pad_bool"),  # decode with a cache (row position = P)
    (2, 2, 2, 3, 3, 4, True, "add4d"),  # chunked prefill with a past and an additive 4-D mask
    (1, 4, 2, 4, 4, 0, False, "bool4d_head"),  # per-head 4-D bool mask
]


def _mask(kind, b, hq, sq, ktot, seed):
    g = torch.Generator().manual_seed(seed + 7)
    if kind is None:
        return None
    if kind == "pad_bool":
        m = torch.ones(b, ktot, dtype=torch.bool)
        m[0, 0] = False
        if b > 1:
            m[1, :2] = False
        return m
    if kind == "add4d":
        m = torch.randn(b, 1, sq, ktot, generator=g, dtype=torch.float64) * 0.5
        m[0, 0, 0, 1] = float("-inf")
        m[-1, 0, -1, 0] = -1e30
        return m
    if kind == "bool4d_head":
        return torch.rand(b, hq, sq, ktot, generator=g) > 0.3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("comp_mode", [0, 1, 2])
def test_matches_loop(case, comp_mode):
    b, hq, hkv, sq, sk, past, causal, kind = case
    d = 8
    seed = CASES.index(case) * 10 + comp_mode
    q, k, v = _rand(b, hq, sq, d, seed=seed), _rand(b, hkv, sk, d, seed=seed + 1), _rand(b, hkv, sk, d, seed=seed + 2)
    pk = _rand(b, hkv, past, d, seed=seed + 3) if past else None
    pv = _rand(b, hkv, past, d, seed=seed + 4) if past else None
    ktot = past + sk
    rows = max(2, ktot - 2)  # fewer rows than positions: the last rows are reused
    thr = (_rand(hq, rows, seed=seed + 5) * 0.4).float()
    thr[0, 0] = float("-inf")
    sdc = torch.rand(hq, rows, generator=torch.Generator().manual_seed(seed)).float() * 0.9
    mask = _mask(kind, b, hq, sq, ktot, seed)
    got, kept = toptheta_attention(
        q,
        k,
        v,
        thr,
        causal=causal,
        attn_mask=mask,
        past_key=pk,
        past_value=pv,
        sdc=sdc,
        comp_mode=comp_mode,
        return_kept=True,
    )
    want, want_kept = loop_reference(
        q, k, v, thr.double(), causal=causal, mask=mask, past_k=pk, past_v=pv, sdc=sdc.double(), comp_mode=comp_mode
    )
    assert got.dtype == torch.float64 and kept.dtype == torch.int32
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(kept, want_kept)
    # thresholds actually pruned something in this case, and something was kept
    assert 0 < int(kept.sum()) < b * hq * sq * ktot


def test_zero_rows_and_nothing_kept():
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 3, 4, seed=1), _rand(1, 2, 3, 4, seed=2)
    thr = torch.full((2, 3), 1e6)  # nothing passes
    out, kept = toptheta_attention(q, k, v, thr, return_kept=True)
    assert torch.all(out == 0) and torch.all(kept == 0)
    # with SDC the denominator is positive but nothing is kept and mode 1 has no numerator -> zeros
    out1 = toptheta_attention(q, k, v, thr, sdc=torch.full((2, 3), 0.5), comp_mode=1)
    assert torch.all(out1 == 0)
    # mode 2 returns the valid-V mean when nothing is kept
    out2 = toptheta_attention(q, k, v, thr, sdc=torch.full((2, 3), 0.5), comp_mode=2)
    torch.testing.assert_close(out2, v.mean(2, keepdim=True).expand_as(out2))
    # fully masked row outputs zeros even with θ = -inf
    mask = torch.ones(1, 3, dtype=torch.bool)
    mask[0, :] = False
    out3 = dense_attention(q, k, v, attn_mask=mask)
    assert torch.all(out3 == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "hkv,causal,masked,past", [(2, True, False, 0), (1, True, True, 3), (4, False, True, 0), (2, False, False, 2)]
)
def test_dense_equals_sdpa(dtype, hkv, causal, masked, past):
    b, hq, s, d = 2, 4, 7, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    pk = torch.randn(b, hkv, past, d, generator=g, dtype=dtype)
    pv = torch.randn(b, hkv, past, d, generator=g, dtype=dtype)
    ktot = s + past
    full = torch.ones(b, 1, s, ktot, dtype=torch.bool)
    if causal:  # bottom-right aligned
        full = full & torch.ones(s, ktot, dtype=torch.bool).tril(past)
    mask = None
    if masked:
        mask = torch.ones(b, ktot, dtype=torch.bool)
        mask[1, :2] = False
        full = full & mask[:, None, None, :]
    rep = hq // hkv
    kk = torch.cat([pk, k], 2).repeat_interleave(rep, 1)
    vv = torch.cat([pv, v], 2).repeat_interleave(rep, 1)
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=full)
    got = dense_attention(
        q, k, v, causal=causal, attn_mask=mask, past_key=pk if past else None, past_value=pv if past else None
    )
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # additive float form of the same mask gives the same output
    add = torch.zeros(full.shape, dtype=dtype).masked_fill(~full, float("-inf"))
    got2 = dense_attention(q, k, v, attn_mask=add, past_key=pk if past else None, past_value=pv if past else None)
    torch.testing.assert_close(got2, want, rtol=tol, atol=tol)


def test_float16_mask_limit_and_dtype():
    q, k, v = (_rand(1, 1, 2, 4, seed=i).half() for i in range(3))
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.float16)
    mask[0, 0, 0, 1] = -65504.0  # excludes for a float16 mask
    out = dense_attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out[0, 0, 0].float(), v[0, 0, 0].float(), rtol=1e-3, atol=1e-3)


def test_topk_keeps_k_with_index_ties():
    q = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0], [2, 0], [1, 0], [2, 0], [0, 0]]]], dtype=torch.float64)
    v = torch.arange(5, dtype=torch.float64).reshape(1, 1, 5, 1)
    out, kept = topk_attention(q, k, v, 3, return_kept=True)
    assert int(kept) == 3
    # keys 1 and 3 (score 2) then key 0 (score 1, lower index than key 2)
    s = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    w = torch.softmax(s, 0)
    want = w[0] * 1 + w[1] * 3 + w[2] * 0
    assert abs(float(out) - float(want)) < 1e-12


def test_topk_large_k_equals_dense_and_counts():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(topk_attention(q, k, v, 100, causal=True), dense_attention(q, k, v, causal=True))
    _, kept = topk_attention(q, k, v, 3, causal=True, return_kept=True)
    assert kept[0, 0].tolist() == [1, 2, 3, 3, 3, 3]


# -- thresholds file format --------------------------------------------------------------------------


def _thresholds(layers=3, heads=2, rows=5):
    theta = torch.randn(layers, heads, rows)
    theta[0] = float("-inf")
    sdc = torch.rand(layers, heads, rows) * 0.9
    meta = {
        "format_version": 1,
        "model": "tiny",
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": 1,
        "head_dim": 8,
        "k": 2,
        "dense_layers": [0],
    }
    return Thresholds(theta, sdc, meta)


def test_thresholds_roundtrip(tmp_path):
    t = _thresholds()
    path = t.save(tmp_path / "th")
    assert path.name == "thresholds.safetensors" and (tmp_path / "th" / "thresholds.json").is_file()
    for src in (tmp_path / "th", path):
        u = Thresholds.load(src)
        assert torch.equal(u.theta, t.theta) and torch.equal(u.sdc, t.sdc)
        assert u.meta["k"] == 2 and u.dense_layers == [0]
    th1, rho1 = u.layer(1)
    assert torch.equal(th1, t.theta[1]) and torch.equal(rho1, t.sdc[1])
    st = u.stats()
    assert st["per_layer"][0]["dense"] and not st["per_layer"][1]["dense"]
    assert abs(st["finite_fraction"] - 2 / 3) < 1e-6
    # the safetensors file alone carries the metadata too
    (tmp_path / "th" / "thresholds.json").unlink()
    assert Thresholds.load(path).meta["model"] == "tiny"
    # no temp leftovers
    assert sorted(p.name for p in (tmp_path / "th").iterdir()) == ["thresholds.safetensors"]


def test_thresholds_bad_files(tmp_path):
    with pytest.raises(TopThetaError, match="does not exist"):
        Thresholds.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "thresholds.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(TopThetaError, match="cannot read"):
        Thresholds.load(bad)
    t = _thresholds()
    t.save(tmp_path / "ok")
    (tmp_path / "ok" / "thresholds.json").write_text("{not json")
    with pytest.raises(TopThetaError, match="not valid JSON"):
        Thresholds.load(tmp_path / "ok")
    (tmp_path / "ok" / "thresholds.json").write_text('{"format_version": 1, "num_layers": 7, "num_heads": 2}')
    with pytest.raises(TopThetaError, match="num_layers"):
        Thresholds.load(tmp_path / "ok")
    with pytest.raises(TopThetaError, match="sdc shape"):
        Thresholds(torch.zeros(2, 2, 3), torch.zeros(2, 2, 4), {})


def test_check_compatible():
    from types import SimpleNamespace

    t = _thresholds()
    t.check_compatible(SimpleNamespace(name="m", num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8))
    with pytest.raises(TopThetaError, match="3 layers"):
        t.check_compatible(SimpleNamespace(name="m", num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8))
    with pytest.raises(TopThetaError, match="query heads"):
        t.check_compatible(SimpleNamespace(name="m", num_layers=3, num_heads=3, num_kv_heads=1, head_dim=8))
