"""One launch of each kernel of interest, for Nsight Compute (see bench/gpu_session.sh `profile`).

PROFILE_WHAT=all (default): prefill B=1, S=8192 (torch SDPA flash, then the three prefill variants, θ=-inf)
and decode B=8, L=32768 (SDPA, then ours with thresholds reading ~1/3 of the V rows). PROFILE_WHAT=prefill:
the default prefill variant only; PROFILE_WHAT=decode: our decode at B=1, L=16384 only; PROFILE_WHAT=gqa:
onnxruntime's GroupQueryAttention decode at B=1, L=32768 (to read its DRAM bytes with ncu); PROFILE_WHAT=b1:
decode at B=1, L=16384 and 32768, one call each of SDPA, ours (V rows 1/3) and onnxruntime's GQA;
PROFILE_WHAT=sm90: prefill B=1, S=8192 without the kept output: SDPA, the default kernel, variant 2;
PROFILE_WHAT=kstages: our decode at B=8, L=32768 (V rows 1/3) with 3 K stages, then 4; PROFILE_WHAT=mask: the
e2e call at B=16, L=32768, GQA 12/2 (keep ~1/10 per head), without and then with a [B, L] key-padding mask.
"""

import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import DT, HKV, HQ, D, decode_scores, theta_for_vrows  # noqa: E402
from toptheta_cuda import Kernels  # noqa: E402

kern = Kernels(sys.argv[1])
what = os.environ.get("PROFILE_WHAT", "all")  # all, prefill (default variant only), decode, gqa, b1
if what == "b1":  # decode B=1, L=16k and 32k: SDPA, ours (V rows 1/3), onnxruntime GQA; one call each
    from attention_bench import Ort, gqa_decode_binding, ort_gqa_model

    ort = Ort(sys.argv[1])
    sess = ort.session(ort_gqa_model(past=True), custom=False)
    for L in (16384, 32768):
        B = 1
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DT)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
        th = theta_for_vrows(decode_scores(q, k), 1 / 3)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        kern.attention(q, k, v, th, causal=True)
        bd, _, _ = gqa_decode_binding(sess, q, k, v)
        sess.run_with_iobinding(bd)
        torch.cuda.synchronize()
    sys.exit(0)
if what == "gqa":  # onnxruntime's dense GroupQueryAttention decode, B=1, L=32768 (bytes it really reads)
    from attention_bench import Ort, gqa_decode_binding, ort_gqa_model

    ort = Ort(sys.argv[1])
    B, L = 1, 32768
    sess = ort.session(ort_gqa_model(past=True), custom=False)
    q = torch.randn(B, 1, HQ * D, device="cuda", dtype=DT)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
    bd, _, _ = gqa_decode_binding(sess, q, k, v)
    for _ in range(3):
        sess.run_with_iobinding(bd)
    torch.cuda.synchronize()
    print("K+V bytes", 2 * k.numel() * 2)
    sys.exit(0)
if what == "mask":  # the e2e call, B=16, L=32768, GQA 12/2, V rows 1/3: without, then with a [B, L] key-padding mask
    B, L, hq, hkv = 16, 32768, 12, 2
    q = torch.randn(B, hq, 1, D, device="cuda", dtype=DT)
    k = torch.randn(B, hkv, L, D, device="cuda", dtype=DT)
    v = torch.randn(B, hkv, L, D, device="cuda", dtype=DT)
    s = (q.float().reshape(B, hkv, hq // hkv, D) @ k.float().transpose(-1, -2)).reshape(B, hq, L) / math.sqrt(D)
    th = torch.quantile(s[0, :, :4096].float(), 0.9, dim=-1).reshape(hq, 1).contiguous()
    pad = torch.ones(B, L, device="cuda", dtype=torch.bool)
    kern.attention(q, k, v, th, causal=True, want_kept=False)
    kern.attention(q, k, v, th, causal=True, attn_mask=pad, want_kept=False)
    torch.cuda.synchronize()
    sys.exit(0)
if what == "kstages":  # our decode at B=8, L=32768, V rows 1/3: 3 K stages, then 4 (the default)
    B, L = 8, 32768
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DT)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
    th = theta_for_vrows(decode_scores(q, k), 1 / 3)
    for stages in ("3", "4"):
        os.environ["TOPTHETA_DECODE_KSTAGES"] = stages
        kern.attention(q, k, v, th, causal=True, want_kept=False)
    torch.cuda.synchronize()
    sys.exit(0)
g = torch.Generator(device="cuda").manual_seed(0)
B, S = 1, 8192
q = torch.randn(B, HQ, S, D, device="cuda", generator=g, dtype=DT)
k = torch.randn(B, HKV, S, D, device="cuda", generator=g, dtype=DT)
v = torch.randn(B, HKV, S, D, device="cuda", generator=g, dtype=DT)
th = torch.full((HQ, 1), float("-inf"), device="cuda")
if what in ("all", "sm90"):
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
if what == "sm90":  # the rewrite's call (no kept output): Hopper kernel, then the mma.sync kernel
    for var in ("-1", "2"):
        os.environ["TOPTHETA_PREFILL_VARIANT"] = var
        kern.attention(q, k, v, th, causal=True, want_kept=False)
    torch.cuda.synchronize()
    sys.exit(0)
for var in ("0", "1", "2") if what == "all" else ("-1",) if what == "prefill" else ():
    os.environ["TOPTHETA_PREFILL_VARIANT"] = var
    kern.attention(q, k, v, th, causal=True)
torch.cuda.synchronize()
B, L = (8, 32768) if what == "all" else (1, 16384)
if what == "prefill":
    sys.exit(0)
q = torch.randn(B, HQ, 1, D, device="cuda", generator=g, dtype=DT)
k = torch.randn(B, HKV, L, D, device="cuda", generator=g, dtype=DT)
v = torch.randn(B, HKV, L, D, device="cuda", generator=g, dtype=DT)
if what == "all":
    torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
th = theta_for_vrows(decode_scores(q, k), 1 / 3)
kern.attention(q, k, v, th, causal=True)
torch.cuda.synchronize()
print("splits", kern.last_splits, "ok", math.isfinite(1.0))
