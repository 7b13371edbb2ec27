"""GPU benchmark: TopThetaAttention at the head dims the first kernels did not cover: 256 (gemma-3), and 80 / 96
(GPT-NeoX, Phi-3), which run the head dim 128 tiles zero-padded. The tensor-core kernels against the generic kernel
that ran before they covered them, and against dense attention at the same shapes.

Shapes (--head-dim): 256: gemma-3-270m's attention (4 query heads, 1 KV head) and gemma-3-4b's (8 / 4); 96:
phi-3-mini's (32 / 32); 80: pythia-2.8b's (32 / 32); fp16.
* decode: one query token against L = 8k and 32k keys, B = 1 and 8; θ per head set so that the union over each GQA
  group reads ~1/3 of the V rows (random q/k/v: the per-head quantile of the step's own scores);
* causal prefill over S = 2k and 8k tokens, B = 1; θ per head keeps 1/3 or 1/8 of the causal scores.
Baselines: torch SDPA (its own backend choice), onnxruntime's GroupQueryAttention (CUDA EP, decode with past and
present sharing one buffer), our kernel at θ = -inf (dense), and the generic kernel (TOPTHETA_CUDA_PATH=generic)
at the smaller shapes. Timing as bench/attention_bench.py: CUDA graphs between events for torch and the direct
kernel calls, CUPTI busy time for onnxruntime sessions. Floors: decode reads K plus the V rows it keeps at the copy
bandwidth measured here (decode_bench.copy_ceiling: event-timed, no graph; the 2026-12-03 results took a 1 GiB
copy, median of 10); prefill's dense causal FLOP at the bf16 GEMM rate measured here (at D, not at the padded tile).

Usage: python bench/head_dim_bench.py --library path/to/libtoptheta_ops.so --out DIR [--head-dim 256|96|80]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import (  # noqa: E402
    Ort,
    gqa_decode_binding,
    gqa_prefill_binding,
    ort_gqa_model,
    time_graph,
    time_kernels,
)
from decode_bench import copy_ceiling  # noqa: E402
from toptheta_cuda import Kernels  # noqa: E402

DT = torch.float16
SHAPES = {  # head dim -> {model: (query heads, KV heads)}
    256: {"gemma-3-270m": (4, 1), "gemma-3-4b": (8, 4)},
    96: {"phi-3-mini": (32, 32)},
    80: {"pythia-2.8b": (32, 32)},
}
D = 256  # set by main
HEADS = SHAPES[D]
L2_BYTES = 50 * 2**20


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    c = torch.empty_like(a)
    return 2 * 8192**3 / time_graph(lambda i: torch.mm(a, b, out=c), 1, inner=5, reps=10) / 1e12


def scores(q, k):
    """scale * q k^T, [B, Hq, Sq, L] fp32 (GQA: each query head against its KV head)."""
    hq, hkv = q.shape[1], k.shape[1]
    return (q.float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(2, 3)) / math.sqrt(D)


def theta_for_vrows(s, hkv: int, target: float) -> torch.Tensor:
    """θ per head (the same keep fraction for every head) whose union over each GQA group reads ~target of V."""
    B, hq, _, L = s.shape
    flat = s.transpose(0, 1).reshape(hq, -1)

    def theta(keep):
        return torch.quantile(flat, 1 - keep, dim=1)[:, None].contiguous()

    def vrows(th):
        return float((s[:, :, 0] >= th[None, :, 0:1]).view(B, hkv, hq // hkv, L).any(2).float().mean())

    lo, hi = 1e-4, target
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if vrows(theta(mid)) > target else (mid, hi)
    return theta(lo), vrows(theta(lo))


def result(phase, model, B, L, method, seconds, floor_us, note, **extra) -> dict:
    """One row of the results (a time in seconds, its floor in µs)."""
    hq, hkv = HEADS[model]
    row = dict(phase=phase, model=model, Hq=hq, Hkv=hkv, B=B, L=L, method=method, time_us=seconds * 1e6)
    return row | extra | dict(floor_us=floor_us, note=note)


def with_env(name: str, value: str, fn):
    os.environ[name] = value
    try:
        return fn()
    finally:
        del os.environ[name]


def bench_decode(kern, ort, model, B, L, floor_bw, generic: bool) -> list[dict]:
    hq, hkv = HEADS[model]
    g = torch.Generator(device="cuda").manual_seed(B * 7919 + L + hq)
    kv_bytes = 2 * B * hkv * L * D * 2
    ns = max(1, min(16, math.ceil(4 * L2_BYTES / kv_bytes)))
    sets = [
        tuple(torch.randn(B, h, n, D, device="cuda", generator=g, dtype=DT) for h, n in ((hq, 1), (hkv, L), (hkv, L)))
        for _ in range(ns)
    ]
    out = torch.empty(B, hq, 1, D, device="cuda", dtype=DT)
    th, fv = theta_for_vrows(scores(sets[0][0], sets[0][1]), hkv, 1 / 3)
    dense_th = torch.full((hq, 1), float("-inf"), device="cuda")
    rows = []

    def row(method, t, v_rows, note=""):
        floor_us = B * hkv * L * D * 2 * (1 + v_rows) / floor_bw / 1e3
        rows.append(result("decode", model, B, L, method, t, floor_us, note, v_rows=v_rows))

    def top(theta):
        return lambda i: kern.attention(*sets[i], theta, causal=True, out=out, want_kept=False)

    def sdpa(i):
        q, k, v = sets[i]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    row("torch SDPA (dense)", time_graph(sdpa, ns), 1.0)
    row("Top-θ kernel, θ=-inf (dense)", time_graph(top(dense_th), ns), 1.0, f"path={kern.last_path}")
    row("Top-θ kernel, V rows 1/3", time_graph(top(th), ns), fv, f"path={kern.last_path}, splits={kern.last_splits}")
    if generic:
        t = with_env("TOPTHETA_CUDA_PATH", "generic", lambda: time_graph(top(th), ns))
        row("Top-θ generic kernel (before), V rows 1/3", t, fv, f"path={kern.last_path}")
    if ort is not None and ort.ok:
        gqa = ort.session(ort_gqa_model(past=True, hq=hq, hkv=hkv, d=D), custom=False)
        binds = [gqa_decode_binding(gqa, q, k, v) for q, k, v in sets]
        t, _ = time_kernels(lambda i: gqa.run_with_iobinding(binds[i][0]), ns)
        ref = sdpa(0)
        gqa.run_with_iobinding(binds[0][0])
        torch.cuda.synchronize()
        o = binds[0][1].view(B, hq, D).float()
        err = float((o - ref.view(B, hq, D).float()).norm() / ref.float().norm())
        row("ORT GroupQueryAttention (dense)", t, 1.0, f"CUPTI busy time; rel. diff to SDPA {err:.1e}")
    return rows


def bench_prefill(kern, ort, model, B, S, flop_rate, generic: bool) -> list[dict]:
    hq, hkv = HEADS[model]
    g = torch.Generator(device="cuda").manual_seed(S + hq)
    q = torch.randn(B, hq, S, D, device="cuda", generator=g, dtype=DT)
    k = torch.randn(B, hkv, S, D, device="cuda", generator=g, dtype=DT)
    v = torch.randn(B, hkv, S, D, device="cuda", generator=g, dtype=DT)
    out = torch.empty_like(q)
    kept = torch.empty(B, hq, S, device="cuda", dtype=torch.int32)
    flops = 4 * B * hq * D * S * (S + 1) / 2
    inner, reps = (10, 20) if S <= 2048 else (3, 10)
    rows = []

    def row(method, t, frac, note=""):
        floor_us = flops / flop_rate / 1e6
        rows.append(result("prefill", model, B, S, method, t, floor_us, note, kept=frac, TFLOPs=flops / t / 1e12))

    def top(theta):
        return lambda i: kern.attention(q, k, v, theta, causal=True, out=out, want_kept=False)

    def sdpa(i):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    row("torch SDPA (dense)", time_graph(sdpa, 1, inner, reps), 1.0)
    dense_th = torch.full((hq, 1), float("-inf"), device="cuda")
    row("Top-θ kernel, θ=-inf (dense)", time_graph(top(dense_th), 1, inner, reps), 1.0)
    idx = torch.randint(0, S, (256,), device="cuda", generator=g)
    s = scores(q[:1, :, idx], k[:1])[0]  # [Hq, 256, S]
    valid = torch.arange(S, device="cuda")[None, :] <= idx[:, None]
    for keep in (1 / 3, 1 / 8):
        th = torch.stack([torch.quantile(s[h][valid][: 2**22], 1 - keep) for h in range(hq)])[:, None].contiguous()
        kern.attention(q, k, v, th, causal=True, out=out, kept=kept)
        torch.cuda.synchronize()
        frac = float(kept.float().sum()) / (B * hq * S * (S + 1) / 2)
        name = f"keep 1/{round(1 / keep)}"
        row(f"Top-θ kernel, {name}", time_graph(top(th), 1, inner, reps), frac, f"variant={kern.last_variant}")
        if generic and keep == 1 / 3:
            t = with_env("TOPTHETA_CUDA_PATH", "generic", lambda: time_graph(top(th), 1, 1, 3))
            row(f"Top-θ generic kernel (before), {name}", t, frac, f"path={kern.last_path}")
    if ort is not None and ort.ok:
        gqa = ort.session(ort_gqa_model(past=False, hq=hq, hkv=hkv, d=D), custom=False)
        bd, o, keep = gqa_prefill_binding(gqa, q, k, v)  # keep: the bound inputs, alive while bd runs
        t, _ = time_kernels(lambda i: gqa.run_with_iobinding(bd), 1, runs=5, groups=3)
        ref = sdpa(0)
        err = float((o.float() - ref.float()).norm() / ref.float().norm())
        row("ORT GroupQueryAttention (dense)", t, 1.0, f"CUPTI busy time; rel. diff to SDPA {err:.1e}")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| phase | model (Hq/Hkv) | B | L | method | µs | V rows / kept | floor µs | floor / time | vs SDPA "
        "| vs ORT GQA | note |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        same = [x for x in rows if (x["phase"], x["model"], x["B"], x["L"]) == (r["phase"], r["model"], r["B"], r["L"])]
        base = {x["method"]: x["time_us"] for x in same}
        sdpa, gqa = base.get("torch SDPA (dense)"), base.get("ORT GroupQueryAttention (dense)")
        frac = r.get("v_rows", r.get("kept"))
        lines.append(
            f"| {r['phase']} | {r['model']} ({r['Hq']}/{r['Hkv']}) | {r['B']} | {r['L']} | {r['method']} | "
            f"{r['time_us']:.1f} | {frac:.3f} | {r['floor_us']:.1f} | {r['floor_us'] / r['time_us']:.2f} | "
            f"{sdpa / r['time_us']:.2f}x | {(gqa / r['time_us']) if gqa else float('nan'):.2f}x | {r['note']} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", required=True)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--head-dim", type=int, default=256, choices=sorted(SHAPES))
    args = ap.parse_args()
    global D, HEADS
    D, HEADS = args.head_dim, SHAPES[args.head_dim]
    kern = Kernels(args.library)
    if not kern.available:
        sys.exit(f"{args.library} has no CUDA kernels")
    try:
        ort = Ort(args.library)
    except Exception as e:  # onnxruntime missing: torch-only numbers
        print("onnxruntime unavailable:", e)
        ort = None
    prop = torch.cuda.get_device_properties(0)
    info = {
        "device": prop.name,
        "date": datetime.date.today().isoformat(),
        "head_dim": D,
        "torch": torch.__version__,
        "onnxruntime": getattr(ort, "version", None),
        "copy_GBps": copy_ceiling(),
        "bf16_mm_TFLOPs": gemm_tflops(),
    }
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    for model in HEADS:
        for B in (1, 8):
            for L in (8192, 32768):
                rows += bench_decode(kern, ort, model, B, L, info["copy_GBps"], generic=(B, L) == (1, 8192))
                print(f"decode {model} B={B} L={L} done", flush=True)
        for S in (2048, 8192):
            rows += bench_prefill(kern, ort, model, 1, S, info["bf16_mm_TFLOPs"], generic=S == 2048)
            print(f"prefill {model} S={S} done", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"head-dim-{D}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    md = f"{json.dumps(info)}\n\n{table(rows)}\n"
    (out / f"head-dim-{D}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
