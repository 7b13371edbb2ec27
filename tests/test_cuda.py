"""GPU tests of the CUDA kernels of TopThetaAttention (marked ``cuda``; skipped without a GPU).

* kernels (through the library's C entry point) vs the PyTorch reference on random shapes: fp16/bf16
  tensor-core prefill and decode kernels, the generic kernel (fp32, other head dims), masks, GQA,
  compensation modes, kept counts;
* the op in onnxruntime's CUDA execution provider vs the CPU kernel on the same inputs (past/present,
  masks, SDC/VMC), bf16 vs the reference;
* an exported tiny LLaMA (fp32 and fp16, head dim 64) run end to end on CUDAExecutionProvider vs PyTorch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from topthetaexport.ort import library as runtime  # noqa: E402
from topthetaexport.torch import reference  # noqa: E402

pytestmark = pytest.mark.cuda

REL_TOL = 1e-2


# -- fixtures ----------------------------------------------------------------------------------------------


def _require_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")


@pytest.fixture(scope="module")
def kernels():
    _require_gpu()
    lib = runtime.library_path(required=False)
    if lib is None:
        pytest.skip("custom-op library not built")
    from toptheta_cuda import Kernels

    k = Kernels(lib)
    if not k.available:
        pytest.skip(f"{lib} was built without CUDA (no nvcc at build time)")
    return k


@pytest.fixture(scope="module")
def ort_cuda(kernels):
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN libraries of the pip packages (torch's, here)
        try:
            ort.preload_dlls()
        except Exception:
            pass
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ort


@pytest.fixture
def env(monkeypatch):
    """Sets environment variables read by the library at each call (kernel path, decode splits)."""
    return monkeypatch.setenv


# -- random cases ------------------------------------------------------------------------------------------

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def make_mask(kind, B, Hq, Sq, Ktot, dtype, g):
    """None, 'pad' (bool [B, Ktot]), 'bool4' ([B,1,Sq,Ktot]), 'add32' (f32 [B,1,1,Ktot]), 'addT' (T [B,Hq,Sq,Ktot])."""
    if kind is None:
        return None
    if kind == "pad":
        m = torch.ones(B, Ktot, dtype=torch.bool)
        for b in range(B):
            m[b, : int(torch.randint(0, max(1, Ktot // 4), (1,), generator=g))] = False
        return m
    if kind == "bool4":
        return torch.rand(B, 1, Sq, Ktot, generator=g) > 0.3
    if kind == "add32":
        a = torch.randn(B, 1, 1, Ktot, generator=g) * 0.5
        a[torch.rand(B, 1, 1, Ktot, generator=g) < 0.2] = float("-inf")
        return a
    if kind == "addT":
        a = torch.randn(B, Hq, Sq, Ktot, generator=g) * 0.5
        a[torch.rand(B, Hq, Sq, Ktot, generator=g) < 0.2] = -65504.0 if dtype == torch.float16 else -1e30
        return a.to(dtype)
    raise ValueError(kind)


def untie(theta, scores, valid, gap=3e-5):
    """Moves finite θ[h, rr] away from every valid score compared with it, so that kernels (fp32
    accumulation in any order) and the reference agree on which keys are kept."""
    B, Hq, Sq, Ktot = scores.shape
    R = theta.shape[1]
    rr = (torch.arange(Sq, device=scores.device) + Ktot - Sq).clamp(0, R - 1)
    h_idx = torch.arange(Hq, device=scores.device)[:, None].expand(Hq, Sq)
    theta = theta.clone()
    for _ in range(5000):
        th_rows = theta[:, rr]  # [Hq, Sq]
        d = (scores - th_rows[None, :, :, None]).abs().masked_fill(~valid, float("inf")).amin(-1).amin(0)
        bad = (d < gap) & torch.isfinite(th_rows)
        if not bad.any():
            return theta
        hit = torch.zeros_like(theta, dtype=torch.bool)
        hit[h_idx[bad], rr[None, :].expand(Hq, Sq)[bad]] = True
        theta[hit] += gap
    raise AssertionError("could not untie thresholds")


def make_case(
    dtype="f16",
    B=1,
    Hq=4,
    Hkv=2,
    Sq=64,
    Ktot=64,
    D=64,
    Dv=None,
    causal=True,
    mask=None,
    comp_mode=0,
    keep=0.3,
    R=None,
    dense_frac=0.1,
    seed=0,
    device="cuda",
):
    """Random GPU inputs and thresholds keeping about ``keep`` of the valid keys per row."""
    g = torch.Generator().manual_seed(seed)
    dt, dev = DT[dtype], device
    Dv = Dv or D
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dev, dt)
    k = torch.randn(B, Hkv, Ktot, D, generator=g).to(dev, dt)
    v = torch.randn(B, Hkv, Ktot, Dv, generator=g).to(dev, dt)
    m = make_mask(mask, B, Hq, Sq, Ktot, dt, g)
    m = None if m is None else m.to(dev)
    s, valid = reference.valid_and_scores(q, k, causal=causal, attn_mask=m)
    s = s.float()
    R = R or Ktot
    # θ per (head, row position): the (1 - keep) quantile of the row's valid scores, averaged over batch.
    qs = torch.nanquantile(s.masked_fill(~valid, float("nan")), 1 - keep, dim=-1).nan_to_num(0.0).mean(0)
    full = torch.randn(Hq, Ktot, generator=g).to(dev)
    full[:, Ktot - Sq :] = qs
    theta = full[:, :R].clone()
    if R < Ktot:
        rows = torch.arange(Ktot - Sq, Ktot, device=dev) >= R - 1
        if rows.any():
            theta[:, R - 1] = qs[:, rows].mean(-1)
    theta[torch.rand(theta.shape, generator=g).to(dev) < dense_frac] = float("-inf")
    theta = untie(theta, s, valid)
    sdc = (torch.rand(Hq, R, generator=g) * 0.9).to(dev) if comp_mode else None
    return dict(q=q, k=k, v=v, thresholds=theta, attn_mask=m, sdc=sdc, causal=causal, comp_mode=comp_mode)


def ref_of(case):
    args = {k: v for k, v in case.items() if k not in ("q", "k", "v", "thresholds")}
    return reference.toptheta_attention(
        case["q"].float(), case["k"].float(), case["v"].float(), case["thresholds"], return_kept=True, **args
    )


def run_kernel(kernels, case):
    B, Hq, Sq, _ = case["q"].shape
    out = torch.full((B, Hq, Sq, case["v"].shape[3]), float("nan"), device="cuda", dtype=case["q"].dtype)
    kept = torch.full((B, Hq, Sq), -1, device="cuda", dtype=torch.int32)
    kernels.attention(
        case["q"],
        case["k"],
        case["v"],
        case["thresholds"],
        causal=case["causal"],
        attn_mask=case["attn_mask"],
        sdc=case["sdc"],
        comp_mode=case["comp_mode"],
        out=out,
        kept=kept,
    )
    torch.cuda.synchronize()
    return out, kept


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def check(kernels, case, path):
    out, kept = run_kernel(kernels, case)
    assert kernels.last_path == path
    ref_out, ref_kept = ref_of(case)
    assert torch.isfinite(out.float()).all(), "unwritten or non-finite output"
    err = rel_err(out, ref_out)
    assert err <= REL_TOL, err
    assert torch.equal(kept.cpu(), ref_kept.cpu()), (kept - ref_kept).abs().max()
    return err


# -- kernels vs the PyTorch reference ------------------------------------------------------------------------

PREFILL = [
    dict(dtype="f16", B=2, Hq=8, Hkv=2, Sq=300, Ktot=300, D=128, causal=True),
    dict(dtype="bf16", B=3, Hq=4, Hkv=4, Sq=200, Ktot=333, D=64, causal=True, mask="pad", comp_mode=1),
    dict(dtype="f16", B=1, Hq=4, Hkv=1, Sq=129, Ktot=129, D=128, causal=False, mask="bool4", comp_mode=2, R=50),
    dict(dtype="bf16", B=2, Hq=6, Hkv=3, Sq=77, Ktot=1000, D=128, causal=True, mask="add32", comp_mode=2),
    dict(dtype="f16", B=2, Hq=2, Hkv=1, Sq=65, Ktot=190, D=64, causal=False, mask="addT", comp_mode=1, keep=0.1),
    dict(dtype="bf16", B=1, Hq=4, Hkv=2, Sq=517, Ktot=517, D=128, causal=True, keep=0.05, dense_frac=0.0, R=100),
]


@pytest.mark.parametrize("variant", ["0", "1", "2"])
@pytest.mark.parametrize("cfg", PREFILL, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_prefill_kernel_matches_reference(kernels, env, cfg, variant):
    env("TOPTHETA_PREFILL_VARIANT", variant)  # 8 warps x 16 rows, 4 x 16, 4 x 32
    check(kernels, make_case(**cfg, seed=1), "prefill")


@pytest.mark.parametrize("variant", ["0", "2"])
@pytest.mark.parametrize("cfg", PREFILL, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_prefill_without_kept_output(kernels, env, cfg, variant):
    """The `kept` output left out (the rewrite's default): same output bits as with it, and the reference's."""
    env("TOPTHETA_PREFILL_VARIANT", variant)
    case = make_case(**{**cfg, "comp_mode": 0}, seed=11)
    with_counts, _ = run_kernel(kernels, case)
    out = torch.full_like(with_counts, float("nan"))
    _, none = kernels.attention(
        case["q"],
        case["k"],
        case["v"],
        case["thresholds"],
        causal=case["causal"],
        attn_mask=case["attn_mask"],
        out=out,
        want_kept=False,
    )
    torch.cuda.synchronize()
    assert none is None and kernels.last_path == "prefill"
    assert torch.equal(out, with_counts)
    ref_out, _ = ref_of(case)
    assert rel_err(out, ref_out) <= REL_TOL


# The Hopper (wgmma) prefill kernel: calls without `kept` output or compensation, with no mask or a [B, Ktot]
# key-padding mask (what a rewritten decoder passes), on sm_90.
HOPPER = [
    dict(dtype="f16", B=2, Hq=8, Hkv=2, Sq=300, Ktot=300, D=128, causal=True),
    dict(dtype="bf16", B=1, Hq=4, Hkv=4, Sq=200, Ktot=333, D=64, causal=True, R=120),
    dict(dtype="f16", B=1, Hq=4, Hkv=1, Sq=129, Ktot=129, D=64, causal=False, keep=0.05),
    dict(dtype="bf16", B=2, Hq=6, Hkv=3, Sq=77, Ktot=1000, D=128, causal=True),
    dict(dtype="f16", B=1, Hq=8, Hkv=2, Sq=1029, Ktot=1029, D=128, causal=True, keep=1 / 3, dense_frac=0.0),
    dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=256, Ktot=640, D=128, causal=False, keep=0.5),
    dict(dtype="f16", B=3, Hq=8, Hkv=1, Sq=5, Ktot=700, D=64, causal=True),
    dict(dtype="f16", B=3, Hq=8, Hkv=2, Sq=300, Ktot=300, D=128, causal=True, mask="pad"),
    dict(dtype="bf16", B=2, Hq=4, Hkv=1, Sq=150, Ktot=700, D=64, causal=True, mask="pad", keep=0.1),
]


def _hopper(kernels):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma prefill kernel runs on sm_90 (Hopper) only")


@pytest.mark.parametrize("cfg", HOPPER, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_prefill_hopper_kernel_matches_reference(kernels, env, cfg):
    """Default on an H100 for the rewrite's call: matches the reference and the mma.sync kernel."""
    _hopper(kernels)
    case = make_case(**cfg, seed=21)
    out = torch.full((*case["q"].shape[:3], case["v"].shape[3]), float("nan"), device="cuda", dtype=case["q"].dtype)
    kernels.attention(
        case["q"],
        case["k"],
        case["v"],
        case["thresholds"],
        causal=case["causal"],
        attn_mask=case["attn_mask"],
        out=out,
        want_kept=False,
    )
    torch.cuda.synchronize()
    assert (kernels.last_path, kernels.last_variant) == ("prefill", 3)
    assert torch.isfinite(out.float()).all(), "unwritten or non-finite output"
    ref_out, _ = ref_of(case)
    assert rel_err(out, ref_out) <= REL_TOL
    env("TOPTHETA_PREFILL_VARIANT", "2")
    other = torch.full_like(out, float("nan"))
    kernels.attention(
        case["q"],
        case["k"],
        case["v"],
        case["thresholds"],
        causal=case["causal"],
        attn_mask=case["attn_mask"],
        out=other,
        want_kept=False,
    )
    torch.cuda.synchronize()
    assert kernels.last_variant == 2
    assert rel_err(out, other) <= 2e-3


def test_prefill_hopper_dense_and_all_pruned(kernels):
    """θ = -inf: dense causal attention (SDPA); θ above every score: zeros (comp_mode 0)."""
    _hopper(kernels)
    case = make_case(dtype="bf16", B=2, Hq=8, Hkv=2, Sq=777, Ktot=777, D=128, dense_frac=1.0, seed=22)
    q, k, v = case["q"], case["k"], case["v"]
    out, _ = kernels.attention(q, k, v, case["thresholds"], causal=True, want_kept=False)
    torch.cuda.synchronize()
    assert kernels.last_variant == 3
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, sdpa) <= REL_TOL
    out, _ = kernels.attention(q, k, v, torch.full_like(case["thresholds"], 1e4), causal=True, want_kept=False)
    torch.cuda.synchronize()
    assert float(out.float().abs().max()) == 0.0


def test_prefill_hopper_not_used_where_it_does_not_apply(kernels, env):
    """A `kept` output, compensation or a mask other than key padding need the mma.sync kernel, also when
    variant 3 is asked for."""
    _hopper(kernels)
    env("TOPTHETA_PREFILL_VARIANT", "3")
    case = make_case(dtype="f16", B=1, Hq=4, Hkv=2, Sq=200, Ktot=200, D=128, mask="pad", comp_mode=1, seed=23)
    check(kernels, case, "prefill")
    assert kernels.last_variant == -1
    case = make_case(dtype="f16", B=1, Hq=4, Hkv=2, Sq=200, Ktot=200, D=128, seed=24)
    check(kernels, case, "prefill")  # kept output requested
    assert kernels.last_variant == -1
    case = make_case(dtype="f16", B=1, Hq=4, Hkv=2, Sq=200, Ktot=200, D=128, mask="bool4", seed=25)
    out, _ = kernels.attention(
        case["q"], case["k"], case["v"], case["thresholds"], causal=True, attn_mask=case["attn_mask"], want_kept=False
    )
    torch.cuda.synchronize()
    assert kernels.last_variant == -1
    assert rel_err(out, ref_of(case)[0]) <= REL_TOL


DECODE = [
    dict(dtype="f16", B=2, Hq=32, Hkv=8, Sq=1, Ktot=5000, D=128, causal=True, keep=1 / 3),
    dict(dtype="bf16", B=3, Hq=8, Hkv=2, Sq=3, Ktot=2049, D=64, causal=True, mask="pad", comp_mode=2),
    dict(dtype="f16", B=1, Hq=16, Hkv=1, Sq=1, Ktot=700, D=128, causal=True, mask="add32", comp_mode=1),
    dict(dtype="bf16", B=2, Hq=4, Hkv=4, Sq=4, Ktot=37, D=128, causal=False, mask="bool4", comp_mode=1),
    dict(dtype="f16", B=1, Hq=8, Hkv=8, Sq=1, Ktot=9000, D=64, causal=True, keep=1 / 8, R=4096),
]


@pytest.mark.parametrize("cfg", DECODE, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_decode_kernel_matches_reference(kernels, cfg):
    check(kernels, make_case(**cfg, seed=2), "decode")


@pytest.mark.parametrize("splits", ["1", "3", "64"])
def test_decode_splits_agree(kernels, env, splits):
    env("TOPTHETA_DECODE_SPLITS", splits)
    case = make_case(dtype="f16", B=2, Hq=8, Hkv=2, Sq=2, Ktot=3001, D=128, comp_mode=2, seed=3)
    check(kernels, case, "decode")
    assert kernels.last_splits == min(int(splits), (3001 + 15) // 16)


GENERIC = [
    dict(dtype="f32", B=2, Hq=4, Hkv=2, Sq=50, Ktot=120, D=128, causal=True, mask="pad", comp_mode=2),
    dict(dtype="f16", B=1, Hq=3, Hkv=1, Sq=33, Ktot=70, D=96, Dv=80, causal=False, mask="addT", comp_mode=1),
    dict(dtype="bf16", B=1, Hq=2, Hkv=2, Sq=1, Ktot=300, D=32, causal=True, comp_mode=2),
    dict(dtype="f32", B=1, Hq=8, Hkv=2, Sq=1, Ktot=1000, D=64, causal=True, mask="bool4"),
]


@pytest.mark.parametrize("cfg", GENERIC, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_generic_kernel_matches_reference(kernels, cfg):
    check(kernels, make_case(**cfg, seed=4), "generic")


def test_forced_generic_equals_fast_path(kernels, env):
    case = make_case(dtype="bf16", B=2, Hq=4, Hkv=2, Sq=150, Ktot=200, D=128, mask="pad", comp_mode=2, seed=5)
    fast, kept_fast = run_kernel(kernels, case)
    assert kernels.last_path == "prefill"
    env("TOPTHETA_CUDA_PATH", "generic")
    slow, kept_slow = run_kernel(kernels, case)
    assert kernels.last_path == "generic"
    assert torch.equal(kept_fast, kept_slow)
    assert rel_err(fast, slow) <= REL_TOL


def test_dense_thresholds_match_sdpa(kernels):
    """θ = -inf everywhere is exactly dense causal attention (GQA via enable_gqa)."""
    for Sq, Ktot in ((1, 4000), (257, 257)):
        case = make_case(dtype="f16", B=2, Hq=8, Hkv=2, Sq=Sq, Ktot=Ktot, D=128, dense_frac=1.0, seed=6)
        out, kept = run_kernel(kernels, case)
        q, k, v = case["q"], case["k"], case["v"]
        mask = torch.ones(Sq, Ktot, dtype=torch.bool, device="cuda").tril(Ktot - Sq)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert rel_err(out, sdpa) <= REL_TOL
        assert torch.equal(kept[0, 0].cpu(), torch.arange(Ktot - Sq + 1, Ktot + 1, dtype=torch.int32))


def test_pruned_everything_outputs_zero_or_compensation(kernels):
    """θ above every score: comp_mode 0 gives zeros, comp_mode 2 gives the V mean (Dk = 0, Dp > 0)."""
    case = make_case(dtype="f16", B=1, Hq=4, Hkv=2, Sq=1, Ktot=1000, D=128, dense_frac=0.0, seed=7)
    case["thresholds"] = torch.full_like(case["thresholds"], 1e4)
    out, kept = run_kernel(kernels, case)
    assert int(kept.sum()) == 0 and float(out.float().abs().max()) == 0.0
    case.update(comp_mode=2, sdc=torch.full_like(case["thresholds"], 0.5))
    out, _ = run_kernel(kernels, case)
    vbar = case["v"].float().mean(2).repeat_interleave(2, dim=1)[:, :, None, :]
    assert rel_err(out, vbar) <= REL_TOL


# -- NaN (docs/op.md, "NaN"): a NaN score is kept and makes its row NaN; pruned V rows are not read ---------------

NAN_CASES = [
    dict(dtype="f16", B=1, Hq=4, Hkv=2, Sq=200, Ktot=200, D=128, causal=True),  # prefill
    dict(dtype="bf16", B=2, Hq=4, Hkv=1, Sq=150, Ktot=300, D=64, causal=True, mask="pad"),  # prefill, key padding
    dict(dtype="bf16", B=2, Hq=8, Hkv=2, Sq=1, Ktot=1500, D=64, causal=True),  # decode
    dict(dtype="f32", B=1, Hq=4, Hkv=2, Sq=40, Ktot=90, D=64, causal=True),  # generic
]
PATH_OF = {1: "decode", 40: "generic"}


def _run_nan(kernels, case, want_kept):
    """The kernel's (out, kept) on a case; without the `kept` output kept is None (on sm_90: the Hopper kernel
    for prefill)."""
    if want_kept:
        return run_kernel(kernels, case)
    out, _ = kernels.attention(
        case["q"],
        case["k"],
        case["v"],
        case["thresholds"],
        causal=case["causal"],
        attn_mask=case["attn_mask"],
        sdc=case["sdc"],
        comp_mode=case["comp_mode"],
        want_kept=False,
    )
    torch.cuda.synchronize()
    return out, None


def _check_nan_rows(kernels, case, nan_rows, want_kept):
    """The rows of nan_rows [B, Hq, Sq] are NaN, the others finite and as the reference; kept counts equal."""
    out, kept = _run_nan(kernels, case, want_kept)
    ref_out, ref_kept = ref_of(case)
    nan_rows = nan_rows.to(out.device)
    assert bool(nan_rows.any()) and bool((~nan_rows).any())
    assert torch.equal(torch.isnan(ref_out).any(-1), nan_rows)  # the reference agrees on which rows
    o = out.float()
    assert torch.isnan(o[nan_rows]).all()
    assert torch.isfinite(o[~nan_rows]).all()
    assert rel_err(out[~nan_rows], ref_out[~nan_rows]) <= REL_TOL
    if kept is not None:
        assert torch.equal(kept.cpu(), ref_kept.cpu())


@pytest.mark.parametrize("want_kept", [True, False], ids=["kept", "no-kept"])
@pytest.mark.parametrize("cfg", NAN_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_nan_in_query_row_gives_nan_row_only(kernels, cfg, want_kept):
    case = make_case(**cfg, seed=31)
    B, Hq, Sq, _ = case["q"].shape
    case["q"][B - 1, Hq - 1, Sq // 2, 5] = float("nan")
    rows = torch.zeros(B, Hq, Sq, dtype=torch.bool)
    rows[B - 1, Hq - 1, Sq // 2] = True
    _check_nan_rows(kernels, case, rows, want_kept)
    assert kernels.last_path == PATH_OF.get(Sq, "prefill")


@pytest.mark.parametrize("variant", ["0", "1", "2"])
@pytest.mark.parametrize("want_kept", [True, False], ids=["kept", "no-kept"])
def test_nan_in_query_row_prefill_variants(kernels, env, variant, want_kept):
    """Every mma.sync prefill kernel, with counts (COUNT) and without (live tiles found from the row max)."""
    env("TOPTHETA_PREFILL_VARIANT", variant)
    case = make_case(dtype="f16", B=1, Hq=2, Hkv=1, Sq=130, Ktot=130, D=64, causal=True, seed=32)
    case["q"][0, 1, 100, 0] = float("nan")
    rows = torch.zeros(1, 2, 130, dtype=torch.bool)
    rows[0, 1, 100] = True
    _check_nan_rows(kernels, case, rows, want_kept)
    assert (kernels.last_path, kernels.last_variant) == ("prefill", int(variant))


def test_nan_in_query_row_alone_in_its_tile(kernels):
    """θ above every score except in the NaN row: its tiles are live only through the NaN (no-kept prefill,
    the Hopper kernel on sm_90), and the row is still NaN."""
    case = make_case(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=256, Ktot=256, D=128, causal=True, seed=33)
    case["thresholds"] = torch.full_like(case["thresholds"], 1e4)
    case["q"][0, 0, 200, 0] = float("nan")
    out, _ = _run_nan(kernels, case, want_kept=False)
    o = out.float()
    assert torch.isnan(o[0, 0, 200]).all()
    o[0, 0, 200] = 0.0
    assert float(o.abs().max()) == 0.0


@pytest.mark.parametrize("want_kept", [True, False], ids=["kept", "no-kept"])
@pytest.mark.parametrize("cfg", NAN_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_nan_in_key_row_gives_nan_in_the_rows_that_see_it(kernels, cfg, want_kept):
    case = make_case(**cfg, seed=34)
    B, Hq, Sq, _ = case["q"].shape
    Hkv, Ktot = case["k"].shape[1], case["k"].shape[2]
    j = Ktot - Sq + Sq // 3  # visible (causal) to the rows from query index Sq // 3 on
    case["k"][0, Hkv - 1, j, 3] = float("nan")
    _, valid = reference.valid_and_scores(case["q"], case["k"], causal=case["causal"], attn_mask=case["attn_mask"])
    rows = torch.zeros(B, Hq, Sq, dtype=torch.bool)
    rows[0, (Hkv - 1) * (Hq // Hkv) :] = valid[0, (Hkv - 1) * (Hq // Hkv) :, :, j].cpu()
    _check_nan_rows(kernels, case, rows, want_kept)


@pytest.mark.parametrize("want_kept", [True, False], ids=["kept", "no-kept"])
@pytest.mark.parametrize("cfg", NAN_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_nan_in_pruned_value_rows_is_not_read(kernels, cfg, want_kept):
    """Keys 64-79 (one 16-key chunk of every kernel's tiles) are pruned in every row; NaN in their V rows does
    not reach the output (the tile kernels skip a chunk nothing of the tile keeps; decode does not gather it)."""
    case = make_case(**{**cfg, "dense_frac": 0.0}, seed=35)
    case["k"][:, :, 64:80] = 0.0  # score 0 in every row, below every θ
    s, valid = reference.valid_and_scores(case["q"], case["k"], causal=case["causal"], attn_mask=case["attn_mask"])
    case["thresholds"] = untie(case["thresholds"].clamp(min=0.05), s.float(), valid)
    case["v"][:, :, 64:80] = float("nan")
    out, kept = _run_nan(kernels, case, want_kept)
    ref_out, ref_kept = ref_of(case)
    assert torch.isfinite(ref_out).all()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref_out) <= REL_TOL
    if kept is not None:
        assert torch.equal(kept.cpu(), ref_kept.cpu())


# -- the op in onnxruntime: CUDA EP vs CPU EP -----------------------------------------------------------------


def _sessions(ort, model, cpu=True):
    """(CPU session or None, CUDA session) of a model; the CUDA one may not fall back to the CPU."""
    from _onnx_single import session as cpu_session

    so = runtime.session_options()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # the op must run on CUDA
    gpu = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CUDAExecutionProvider"])
    return (cpu_session(model) if cpu else None), gpu


def _np_case(case):
    def npy(t):
        if t is None:
            return None
        return t.cpu().numpy() if t.dtype != torch.bfloat16 else t.float().cpu().numpy()

    return {k: npy(v) for k, v in case.items() if isinstance(v, torch.Tensor) or v is None}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_onnxruntime_cuda_matches_cpu_kernel(ort_cuda, dtype, shape):
    from _onnx_single import make_model, run

    B, Hq, Hkv, D = 2, 8, 2, 64
    Sq, P = (70, 30) if shape == "prefill" else (1, 2500)
    case = make_case(dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Ktot=P + Sq, D=D, mask="pad", comp_mode=2, seed=8)
    x = _np_case(case)
    feeds = dict(
        query=x["q"],
        key=x["k"][:, :, P:],
        value=x["v"][:, :, P:],
        past_key=x["k"][:, :, :P],
        past_value=x["v"][:, :, :P],
        thresholds=x["thresholds"],
        sdc=x["sdc"],
        attn_mask=x["attn_mask"],
    )
    model = make_model(
        {"f32": "float32", "f16": "float16"}[dtype],
        mask="bool",
        past=True,
        sdc=True,
        present=True,
        kept=True,
        causal=1,
        comp_mode=2,
    )
    cpu, gpu = _sessions(ort_cuda, model)
    want, got = run(cpu, **feeds), run(gpu, **feeds)
    np.testing.assert_array_equal(got["present_key"], x["k"])
    np.testing.assert_array_equal(got["present_value"], x["v"])
    np.testing.assert_array_equal(got["kept"], want["kept"])
    tol = 1e-4 if dtype == "f32" else REL_TOL
    a, b = got["output"].astype(np.float64), want["output"].astype(np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= tol


def _bf16_model(**kw):
    """The single-node bf16 model behind float32 graph inputs/outputs (Cast nodes run on CUDA too)."""
    from _onnx_single import make_model
    from onnx import TensorProto, helper

    m = make_model("bfloat16", **kw)
    g = m.graph
    node = g.node[0]
    casts = []
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type != TensorProto.BFLOAT16:
            continue
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
        inner = vi.name + "_bf16"
        if any(vi.name == x.name for x in g.input):
            casts.append(helper.make_node("Cast", [vi.name], [inner], to=TensorProto.BFLOAT16))
            node.input[list(node.input).index(vi.name)] = inner
        else:
            node.output[list(node.output).index(vi.name)] = inner
            casts.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT))
    g.node.extend(casts)
    nodes = sorted(
        g.node,
        key=lambda n: 0 if n.op_type == "Cast" and n.output[0].endswith("_bf16") else (1 if n.op_type != "Cast" else 2),
    )
    del g.node[:]
    g.node.extend(nodes)
    return m


def test_onnxruntime_cuda_bf16_matches_reference(ort_cuda):
    """bf16 exists on CUDA only: the op through the CUDA EP vs the PyTorch reference."""
    from _onnx_single import run

    case = make_case(dtype="bf16", B=1, Hq=8, Hkv=2, Sq=200, Ktot=200, D=128, mask="pad", comp_mode=1, seed=9)
    _, gpu = _sessions(ort_cuda, _bf16_model(mask="bool", sdc=True, kept=True, causal=1, comp_mode=1), cpu=False)
    x = _np_case(case)
    got = run(
        gpu, query=x["q"], key=x["k"], value=x["v"], thresholds=x["thresholds"], attn_mask=x["attn_mask"], sdc=x["sdc"]
    )
    ref_out, ref_kept = ref_of(case)
    assert rel_err(torch.from_numpy(got["output"]), ref_out.cpu()) <= REL_TOL
    np.testing.assert_array_equal(got["kept"], ref_kept.cpu().numpy())


# -- an exported model end to end on CUDAExecutionProvider ------------------------------------------------------

LAYERS, HEADS, KV_HEADS, ROWS = 2, 4, 2, 24


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A random-weight LLaMA with head dim 64 (GQA 4/2), saved once."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=128,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    cfg._attn_implementation = "sdpa"
    out = tmp_path_factory.mktemp("llama64") / "model"
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(str(out))
    return out


def _thresholds(loaded, model, ids, mask):
    """θ per layer drawn inside the 40th-90th percentile of the model's own scores; ρ in [0, 0.9)."""
    from topthetaexport.thresholds import Thresholds
    from topthetaexport.torch.attention import attention_mode

    scores = {}

    def hook(layer, s, valid):
        scores[layer] = s[valid].flatten().float()

    with torch.no_grad(), attention_mode(model, "dense", score_hook=hook):
        model(input_ids=ids, attention_mask=mask)
    g = torch.Generator().manual_seed(0)
    theta = torch.stack(
        [
            torch.quantile(scores[i], 0.4)
            + torch.rand(HEADS, ROWS, generator=g) * (torch.quantile(scores[i], 0.9) - torch.quantile(scores[i], 0.4))
            for i in range(LAYERS)
        ]
    )
    meta = {
        "model": loaded.name,
        "model_type": loaded.model_type,
        "causal": True,
        "k": 8,
        "num_layers": LAYERS,
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS,
        "head_dim": loaded.head_dim,
        "dense_layers": [],
        "calib_source": "test",
    }
    return Thresholds(theta, torch.rand(theta.shape, generator=g) * 0.9, meta)


def _node_providers(sess) -> set[str]:
    """Execution providers that ran TopThetaAttention nodes, read from onnxruntime's profile."""
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    os.unlink(prof)
    return {
        e["args"].get("provider")
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and e.get("args", {}).get("op_name") == "TopThetaAttention"
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_exported_model_on_cuda_matches_pytorch(ort_cuda, llama64, tmp_path, dtype):
    """Prefill (40 tokens, one left-padded row) and 3 decode steps with the KV cache: logits of the ONNX model
    on CUDAExecutionProvider vs the PyTorch model with Top-θ attention (float32, same weights)."""
    from topthetaexport.models import load_model
    from topthetaexport.onnx.exporter import export_onnx
    from topthetaexport.onnx.rewriter import rewrite
    from topthetaexport.torch.attention import attention_mode

    loaded = load_model(llama64, dtype=dtype)
    ref_model = load_model(llama64, dtype=dtype).model.float()  # same (rounded) weights, fp32 math
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :3] = 0
    th = _thresholds(loaded, ref_model, ids, mask)
    dense = export_onnx(loaded, tmp_path / "dense.onnx")
    rewrite(dense, th, tmp_path / "model.onnx", comp_mode=1)

    so = runtime.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    # fp32: no TF32 in onnxruntime's own CUDA matmuls (its default), so the rest of the network stays at
    # float32 rounding like the PyTorch side and borderline keep decisions stay rare.
    cuda_opts = {"use_tf32": "0"} if dtype == torch.float32 else {}
    sess = ort_cuda.InferenceSession(
        str(tmp_path / "model.onnx"),
        sess_options=so,
        providers=[("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"],
    )
    np_dt = np.float32 if dtype == torch.float32 else np.float16
    feed_past = {
        i.name: np.zeros((2, KV_HEADS, 0, loaded.head_dim), np_dt)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    names = [o.name for o in sess.get_outputs()]
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    cache = None
    for step in range(4):
        tok = ids if step == 0 else torch.randint(3, 128, (2, 1), generator=g)
        if step:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        with torch.no_grad(), attention_mode(ref_model, "toptheta", thresholds=th, comp_mode=1):
            ref = ref_model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = ref.past_key_values
        outs = dict(
            zip(names, sess.run(names, {"input_ids": tok.numpy(), "attention_mask": mask.numpy(), **feed_past}))
        )
        feed_past = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
        got, want = outs["logits"].astype(np.float64), ref.logits.double().numpy()
        if step == 0:
            got, want = got[mask.bool().numpy()], want[mask.bool().numpy()]
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= tol, (step, err)
    assert _node_providers(sess) == {"CUDAExecutionProvider"}
