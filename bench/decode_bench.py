"""Decode at the memory limit: Top-θ decode kernel vs torch SDPA and onnxruntime GroupQueryAttention (issue 16).

One query token per batch row against a K/V cache of L keys, fp16, for GQA 32/8 and 12/2 (Qwen2.5-1.5B) with
head dim 128, B = 1, 8, 16 and L = 16k .. 128k. θ per head is set on random q/k so that the union over each GQA
group reads 1/3 or 7% of the V rows (``theta = "random"``).

Bytes moved per call (the floor): dense reads all K and V; Top-θ reads all K plus the kept V rows; both read
Q and write the output. ``achieved_GBps`` = Top-θ floor / Top-θ time; ``copy_GBps`` is an event-timed
device-to-device copy of 2 GiB launched plainly (not inside a CUDA graph), the median of 20, measured in the
same run. Timing of SDPA and our kernel: CUDA graphs of several calls replayed between events; onnxruntime:
CUPTI busy time (attention_bench.time_kernels). Inputs rotate over enough copies to exceed the L2.

Side by side in the same run: the kernel's default K pipeline (4 stages, ``toptheta_us``), the earlier 3-stage
one (``toptheta_k3_us``, TOPTHETA_DECODE_KSTAGES=3), and the default with an all-true ``[B, L]`` key-padding
mask (``toptheta_masked_us``), which is what a rewritten decoder passes the op. Every Top-θ call is the one a
rewritten model makes: no ``kept`` output, no compensation (so the kernel keeps no counts).

A/B of two builds in one run: ``--baseline LIB2`` also times LIB2's kernel on the same inputs, alternating with
LIB's (two rounds each, the faster of each kept): ``base_us`` / ``base_masked_us``. ``--splits 16,32,..`` times
the masked call at each forced split count (TOPTHETA_DECODE_SPLITS): ``splits_us``. ``--baseline-env VAR=VALUE``
makes the baseline LIB itself (or LIB2) with VAR set for its calls, e.g. TOPTHETA_SHADOW=0.

Usage: python bench/decode_bench.py --library LIB --out DIR [--quick] [--baseline LIB2] [--baseline-env VAR=VALUE]
       [--splits N,..]
       [--configs 12/2,32/8] [--batches 1,8,16] [--lengths 16384,32768] [--vrows 0.333]
Writes DIR/decode.json (a list of rows with the keys of issue 16) and DIR/decode.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import (  # noqa: E402
    Ort,
    gqa_decode_binding,
    kernel_note,
    n_sets,
    ort_gqa_model,
    time_graph,
    time_kernels,
)
from toptheta_cuda import Kernels  # noqa: E402

DT = torch.float16
D = 128
CONFIGS = [(32, 8), (12, 2)]


def copy_ceiling() -> float:
    """GB/s (read + write) of a plain event-timed 2 GiB device copy, median of 20."""
    x = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return 2 * 2**31 / statistics.median(ts) / 1e9


def sdpa_time(sets, scale=None) -> float:
    """Seconds per call of torch SDPA (flash / efficient / cuDNN, GQA) over the input sets, CUDA-graph timed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(i):
        q, k, v = sets[i]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=scale)

    return time_graph(sdpa, len(sets))


def open_run(library: str):
    """(kernels, onnxruntime or None, run info with the copy ceiling measured now) of a decode benchmark run."""
    kern = Kernels(library)
    if not kern.available:
        sys.exit(f"{library} has no CUDA kernels")
    try:
        ort = Ort(library)
    except Exception as e:
        print("onnxruntime unavailable:", e)
        ort = None
    info = {
        "device": torch.cuda.get_device_properties(0).name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "onnxruntime": getattr(ort, "version", None),
        "copy_GBps": copy_ceiling(),
    }
    print(json.dumps(info), flush=True)
    return kern, ort, info


def scores(q, k, hkv):
    """scale * q k^T: [B, Hq, L] fp32."""
    b, hq = q.shape[0], q.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, D)
    return (torch.einsum("bgjd,bgld->bgjl", qg, k.float()) / math.sqrt(D)).reshape(b, hq, -1)


def theta_for_keep(s, keep):
    hq = s.shape[1]
    flat = s.transpose(0, 1).reshape(hq, -1)
    if flat.shape[1] > 2**22:
        flat = flat[:, torch.randperm(flat.shape[1], device=flat.device)[: 2**22]]
    return torch.quantile(flat, 1 - keep, dim=1)[:, None].contiguous()


def v_fraction(s, th, hkv):
    kept = s >= th[None]
    b, hq, L = kept.shape
    return float(kept.view(b, hkv, hq // hkv, L).any(2).float().mean())


def theta_for_vrows(s, target, hkv):
    lo, hi = 1e-5, target
    for _ in range(16):
        mid = (lo + hi) / 2
        if v_fraction(s, theta_for_keep(s, mid), hkv) > target:
            hi = mid
        else:
            lo = mid
    return theta_for_keep(s, lo)


def gqa_time(ort, sets, hq, hkv):
    """CUPTI busy time per call of GQA decode with past/present sharing one buffer (L-1 cached + 1 new)."""
    sess = ort.session(ort_gqa_model(True, hq, hkv), custom=False)
    binds = [gqa_decode_binding(sess, q, k, v) for q, k, v in sets]
    t, names = time_kernels(lambda i: sess.run_with_iobinding(binds[i][0]), len(sets))
    return t, names


def ab_times(calls, rounds: int = 2) -> list[float]:
    """Seconds per call of each of `calls` (functions of the input set i, with their set count), timed in
    alternation `rounds` times; the fastest round of each."""
    best = [math.inf] * len(calls)
    for _ in range(rounds):
        for j, (fn, ns) in enumerate(calls):
            best[j] = min(best[j], time_graph(fn, ns))
    return best


def with_env(fn, setting: str | None):
    """fn with the environment variable of `setting` ("VAR=VALUE") set for each of its calls."""
    if not setting:
        return fn
    var, value = setting.split("=", 1)

    def call(i):
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn(i)
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old

    return call


def bench(kern, ort, hq, hkv, B, L, quick, targets=None, base=None, split_counts=(), base_env=None):
    g = torch.Generator(device="cuda").manual_seed(B * 1000003 + L + hq)
    kv_bytes = 2 * B * hkv * L * D * 2
    ns = n_sets(kv_bytes)
    sets = [
        (
            torch.randn(B, hq, 1, D, device="cuda", generator=g, dtype=DT),
            torch.randn(B, hkv, L, D, device="cuda", generator=g, dtype=DT),
            torch.randn(B, hkv, L, D, device="cuda", generator=g, dtype=DT),
        )
        for _ in range(ns)
    ]
    out = torch.empty(B, hq, 1, D, device="cuda", dtype=DT)
    s0 = scores(sets[0][0], sets[0][1], hkv)
    pad = torch.ones(B, L, device="cuda", dtype=torch.bool)

    t_sdpa = sdpa_time(sets)
    t_gqa, gqa_names = (float("nan"), {})
    if ort is not None and ort.ok:
        t_gqa, gqa_names = gqa_time(ort, sets, hq, hkv)
    dense_floor = 2 * B * hkv * L * D * 2 + 2 * B * hq * D * 2
    rows = []
    if targets is None:
        targets = (1 / 3,) if quick else (1 / 3, 0.07)
    for target in targets:
        th = theta_for_vrows(s0, target, hkv)
        kern.attention(*sets[0], th, causal=True, out=out, want_kept=False)
        torch.cuda.synchronize()
        fv = v_fraction(s0, th, hkv)
        t = time_graph(lambda i, th=th: kern.attention(*sets[i], th, causal=True, out=out, want_kept=False), ns)
        splits = kern.last_splits
        os.environ["TOPTHETA_DECODE_KSTAGES"] = "3"
        t_k3 = time_graph(lambda i, th=th: kern.attention(*sets[i], th, causal=True, out=out, want_kept=False), ns)
        del os.environ["TOPTHETA_DECODE_KSTAGES"]
        t_mask = time_graph(
            lambda i, th=th: kern.attention(*sets[i], th, causal=True, attn_mask=pad, out=out, want_kept=False), ns
        )
        floor = B * hkv * L * D * 2 * (1 + fv) + 2 * B * hq * D * 2
        extra = {}
        if base is not None:

            def call(kk, mask, setting=None, th=th):
                fn = lambda i: kk.attention(*sets[i], th, causal=True, attn_mask=mask, out=out, want_kept=False)  # noqa: E731
                return with_env(fn, setting)

            t_new, t_base, t_new_m, t_base_m = ab_times(
                [
                    (call(kern, None), ns),
                    (call(base, None, base_env), ns),
                    (call(kern, pad), ns),
                    (call(base, pad, base_env), ns),
                ]
            )
            t, t_mask = t_new, t_new_m
            extra.update(base_us=t_base * 1e6, base_masked_us=t_base_m * 1e6)
        if split_counts:
            sweep = {}
            for n in split_counts:
                os.environ["TOPTHETA_DECODE_SPLITS"] = str(n)
                sweep[str(n)] = 1e6 * time_graph(
                    lambda i, th=th: kern.attention(*sets[i], th, causal=True, attn_mask=pad, out=out, want_kept=False),
                    ns,
                )
                del os.environ["TOPTHETA_DECODE_SPLITS"]
            extra["splits_us"] = sweep
        rows.append(
            dict(
                B=B,
                L=L,
                hq=hq,
                hkv=hkv,
                d=D,
                theta="random",
                v_rows_fraction=fv,
                k_bytes_fraction=1.0,
                toptheta_us=t * 1e6,
                toptheta_k3_us=t_k3 * 1e6,
                toptheta_masked_us=t_mask * 1e6,
                sdpa_us=t_sdpa * 1e6,
                gqa_us=t_gqa * 1e6,
                copy_GBps=None,  # filled in by main
                achieved_GBps=floor / t / 1e9,
                dense_floor_us=None,
                vs_gqa=t_gqa / t,
                vs_sdpa=t_sdpa / t,
                ceiling=dense_floor / floor,
                splits=splits,
                gqa_kernels=kernel_note(gqa_names),
                **extra,
            )
        )
    sets.clear()
    torch.cuda.empty_cache()
    return rows


def fmt(rows):
    head = (
        "| hq/hkv | B | L | V rows | Top-θ µs | 3 K stages µs | masked µs | SDPA µs | GQA µs | vs GQA | vs SDPA "
        "| ceiling | GB/s | % of copy |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['hq']}/{r['hkv']} | {r['B']} | {r['L'] // 1024}k | {r['v_rows_fraction']:.3f} | "
            f"{r['toptheta_us']:.1f} | {r['toptheta_k3_us']:.1f} | {r['toptheta_masked_us']:.1f} | "
            f"{r['sdpa_us']:.1f} | {r['gqa_us']:.1f} | {r['vs_gqa']:.2f}x | "
            f"{r['vs_sdpa']:.2f}x | {r['ceiling']:.2f}x | {r['achieved_GBps']:.0f} | "
            f"{100 * r['achieved_GBps'] / r['copy_GBps']:.0f}% |"
        )
    return "\n".join(lines)


def fmt_ab(rows):
    """The A/B and split-count columns, where the run has them."""
    sweep = sorted({int(n) for r in rows for n in r.get("splits_us", {})})
    if not any("base_us" in r for r in rows) and not sweep:
        return ""
    head = "| hq/hkv | B | L | splits | Top-θ µs | baseline µs | masked µs | baseline masked µs | new/base (masked) |"
    head += "".join(f" {n} splits µs |" for n in sweep)
    lines = [head, "|" + "---|" * (9 + len(sweep))]
    for r in rows:
        bm = r.get("base_masked_us")
        cells = [
            f"{r['hq']}/{r['hkv']}",
            str(r["B"]),
            f"{r['L'] // 1024}k",
            str(r["splits"]),
            f"{r['toptheta_us']:.1f}",
            f"{r.get('base_us', float('nan')):.1f}",
            f"{r['toptheta_masked_us']:.1f}",
            f"{bm if bm is not None else float('nan'):.1f}",
            f"{r['toptheta_masked_us'] / bm:.3f}" if bm else "-",
        ] + [f"{r.get('splits_us', {}).get(str(n), float('nan')):.1f}" for n in sweep]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", required=True)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="B 1 and 8 at 16k/32k, V rows 1/3 only")
    ap.add_argument("--baseline", help="a second library, timed against --library on the same inputs")
    ap.add_argument("--baseline-env", help="VAR=VALUE set for the baseline's calls (baseline: --library if not given)")
    ap.add_argument("--splits", type=ints, default=[], help="forced split counts to time (masked call)")
    ap.add_argument("--configs", help="hq/hkv pairs, e.g. 12/2,32/8")
    ap.add_argument("--batches", type=ints)
    ap.add_argument("--lengths", type=ints)
    ap.add_argument("--vrows", type=float, help="one V-row fraction instead of 1/3 and 7%%")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kern, ort, info = open_run(args.library)
    copy = info["copy_GBps"]
    shapes = [(B, L) for B in (1, 8, 16) for L in (16384, 32768, 65536, 131072)]
    if args.quick:
        shapes = [(B, L) for B in (1, 8) for L in (16384, 32768)]
    if args.batches or args.lengths:
        shapes = [(B, L) for B in args.batches or (1, 8, 16) for L in args.lengths or (16384, 32768, 65536, 131072)]
    configs = CONFIGS
    if args.configs:
        configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
    base = None
    if args.baseline or args.baseline_env:
        base = Kernels(args.baseline) if args.baseline else kern
        info["baseline"] = args.baseline or args.library
        info["baseline_env"] = args.baseline_env
    targets = (args.vrows,) if args.vrows else None
    rows = []
    for hq, hkv in configs:
        for B, L in shapes:
            if B * hkv * L * D * 2 * 2 > 24 * 2**30:  # the cache of one input set
                continue
            new = bench(kern, ort, hq, hkv, B, L, args.quick, targets, base, args.splits, args.baseline_env)
            for r in new:
                r["copy_GBps"] = copy
                r["dense_floor_us"] = (2 * B * hkv * L * D * 2) / (copy * 1e9) * 1e6
            rows += new
            print(fmt(new).split("\n", 2)[-1], flush=True)
    info["seconds"] = time.time() - t0
    (out_dir / "decode.json").write_text(json.dumps(rows, indent=1))
    md = [
        f"Device: {info['device']}, {info['date']}; torch {info['torch']}, onnxruntime {info['onnxruntime']}; "
        f"copy ceiling (plain launch, event-timed, 2 GiB) {copy:.0f} GB/s; {info['seconds']:.0f} s",
        "",
        fmt(rows),
        "",
        fmt_ab(rows),
        "",
    ]
    (out_dir / "decode.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
