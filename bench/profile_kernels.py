"""One launch of each kernel of interest, for Nsight Compute (see bench/gpu_session.sh `profile`).

Prefill B=1, S=8192 (torch SDPA flash, then the three prefill variants, θ=-inf) and decode B=8, L=32768
(SDPA, then ours with thresholds reading ~1/3 of the V rows).
"""

import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import D, DT, HKV, HQ, decode_scores, theta_for_vrows  # noqa: E402
from toptheta_cuda import Kernels  # noqa: E402

kern = Kernels(sys.argv[1])
g = torch.Generator(device="cuda").manual_seed(0)
B, S = 1, 8192
q = torch.randn(B, HQ, S, D, device="cuda", generator=g, dtype=DT)
k = torch.randn(B, HKV, S, D, device="cuda", generator=g, dtype=DT)
v = torch.randn(B, HKV, S, D, device="cuda", generator=g, dtype=DT)
th = torch.full((HQ, 1), float("-inf"), device="cuda")
torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
for var in ("0", "1", "2"):
    os.environ["TOPTHETA_PREFILL_VARIANT"] = var
    kern.attention(q, k, v, th, causal=True)
torch.cuda.synchronize()
B, L = 8, 32768
q = torch.randn(B, HQ, 1, D, device="cuda", generator=g, dtype=DT)
k = torch.randn(B, HKV, L, D, device="cuda", generator=g, dtype=DT)
v = torch.randn(B, HKV, L, D, device="cuda", generator=g, dtype=DT)
torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
th = theta_for_vrows(decode_scores(q, k), 1 / 3)
kern.attention(q, k, v, th, causal=True)
torch.cuda.synchronize()
print("splits", kern.last_splits, "ok", math.isfinite(1.0))
