"""The shadow-K quantiser (bench/toptheta_cuda.shadow_k, the layout the CUDA scan reads; docs/cuda-notes.md):
every stored code reconstructs its key within half a grid step, in the lane order the kernel unpacks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from toptheta_cuda import SHADOW_BLOCK, _shadow_lane_order, shadow_k  # noqa: E402


def _unpack(codes: torch.Tensor, d: int) -> torch.Tensor:
    slots = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)  # nibble slots in order
    out = torch.empty_like(slots)
    out[..., _shadow_lane_order(d)] = slots
    return out


@pytest.mark.parametrize("d", [64, 128])
def test_lane_order_is_a_permutation_of_the_channels(d):
    assert sorted(_shadow_lane_order(d).tolist()) == list(range(d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_codes_reconstruct_keys_within_half_a_step(dtype, d):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 200, d, generator=g) * torch.linspace(0.01, 20, d)  # channels of very different ranges
    k[0, 0, :64, 5] = 1.5  # a constant channel: step 0
    k = k.to(dtype)
    codes, rng = shadow_k(k)
    assert codes.shape == (2, 3, 200, d // 2) and codes.dtype == torch.uint8
    assert rng.shape == (2, 3, (200 + SHADOW_BLOCK - 1) // SHADOW_BLOCK, 2, d) and rng.dtype == dtype
    full = 200 // SHADOW_BLOCK * SHADOW_BLOCK
    c = _unpack(codes, d)[:, :, :full].float().view(2, 3, -1, SHADOW_BLOCK, d)
    lo, step = rng[:, :, : full // SHADOW_BLOCK, 0].float(), rng[:, :, : full // SHADOW_BLOCK, 1].float()
    approx = lo.unsqueeze(3) + c * step.unsqueeze(3)
    err = (k[:, :, :full].float().view_as(approx) - approx).abs()
    assert bool((err <= step.unsqueeze(3) / 2 * (1 + 1e-6) + 1e-30).all())
    assert int(c.max()) <= 15 and float(step[0, 0, 0, 5]) == 0.0
    assert bool((_unpack(codes, d)[:, :, full:] == 0).all()) and bool((rng[:, :, full // SHADOW_BLOCK :] == 0).all())
