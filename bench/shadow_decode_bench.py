"""Decode past the "read all K" ceiling: the shadow-K path of the decode kernel vs the plain one, ORT GQA and SDPA.

Same setting as bench/decode_bench.py (one query token per batch row, fp16, head dim 128, CUDA-graph replays
between events for our kernels and SDPA, CUPTI busy time for onnxruntime GroupQueryAttention, inputs rotated over
more copies than the L2 holds, the event-timed copy ceiling of the same run), with the 4-bit shadow K of
``toptheta_cuda.shadow_k`` (blocks of 64 keys, per-channel min/step) passed to the kernel:

* ``theta = "random"``: random q/k (GQA 32/8 and 12/2), θ set so that 1/3 or 7% of the V rows are read. Random
  keys have no structure for the bound to use, so this shows the scan's cost rather than its gain.
* ``theta = "real"``: q, K, V and θ (k = 64) of real layers at the last row of a window (``--real FILE``, written
  by ``bench/shadow_k_study.py --decode-out``: ``{"model", "seq", "layers": {layer: {"q" [1, Hq, R, D], "k" /
  "v" [1, Hkv, S, D], "theta" {k: [Hq, R]}, "scale"}}}``), each layer's cache copied to every batch row.

Per row: the V-row fraction (union over each GQA group), the candidate fraction (keys whose fp16 row the shadow
path reads; computed here with the kernel's bound in float32), ``k_bytes_fraction`` = (shadow bytes + candidate
rows) / all K bytes, the times, and the bytes floors: plain = all K + kept V, shadow = codes + ranges +
candidate K rows + kept V.

Usage: python bench/shadow_decode_bench.py --library LIB --out DIR [--real FILE] [--quick]
Writes DIR/shadow-decode.json (issue 16's decode keys plus shadow ones) and DIR/shadow-decode.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import n_sets, time_graph  # noqa: E402
from decode_bench import gqa_time, open_run, sdpa_time, theta_for_vrows  # noqa: E402
from toptheta_cuda import SHADOW_BLOCK, shadow_k  # noqa: E402

DT = torch.float16


def candidates(q, k, codes_range, theta, scale, hkv):
    """Fraction of keys (union over each GQA group) whose float32 bound reaches θ, as the scan decides it."""
    B, hq, _, d = q.shape
    L = k.shape[2]
    full = L // SHADOW_BLOCK * SHADOW_BLOCK
    rng = codes_range[1][:, :, : full // SHADOW_BLOCK].float()  # [B, Hkv, nb, 2, D]
    lo, step = rng[:, :, :, 0], rng[:, :, :, 1]
    kb = k[:, :, :full].float().view(B, hkv, -1, SHADOW_BLOCK, d)
    code = torch.where(
        step.unsqueeze(3) > 0, torch.round((kb - lo.unsqueeze(3)) / step.unsqueeze(3).clamp_min(1e-30)), 0.0
    )
    khat = (lo.unsqueeze(3) + code.clamp(0, 15) * step.unsqueeze(3)).view(B, hkv, full, d)
    qg = q.float().view(B, hkv, hq // hkv, d)
    approx = torch.einsum("bgjd,bgld->bgjl", qg, khat)
    err = 0.5 * torch.einsum("bgjd,bgnd->bgjn", qg.abs(), step)
    mag = torch.einsum("bgjd,bgnd->bgjn", qg.abs(), lo.abs() + 16 * step)
    bias = (err + mag / 128).repeat_interleave(SHADOW_BLOCK, 3)
    bound = scale * (approx + bias)  # [B, Hkv, G, full]
    th = theta.view(1, hkv, hq // hkv, 1)
    cand = (bound >= th).any(2)  # [B, Hkv, full]
    n_cand = float(cand.sum()) + B * hkv * (L - full)
    return n_cand / (B * hkv * L)


COPY_GBPS = float("nan")  # the run's copy ceiling (main sets it first)


def measure(kern, ort, sets, th, scale, hq, hkv, theta_kind, extra=None):
    B, _, L, d = sets[0][1].shape
    ns = len(sets)
    out = torch.empty(B, hq, 1, d, device="cuda", dtype=DT)
    shadows = [shadow_k(k) for _, k, _ in sets]
    q0, k0, _ = sets[0]
    s0 = torch.einsum("bgjd,bgld->bgjl", q0.float().view(B, hkv, hq // hkv, d), k0.float()) * scale
    kept = s0 >= th.view(1, hkv, hq // hkv, 1)
    fv = float(kept.any(2).float().mean())
    fc = candidates(q0, k0, shadows[0], th, scale, hkv)
    thr = th[:, None].contiguous()

    def plain(i):
        kern.attention(*sets[i], thr, scale=scale, causal=True, out=out, want_kept=False)

    def shadow(i):
        kern.attention(*sets[i], thr, scale=scale, causal=True, out=out, want_kept=False, shadow=shadows[i])

    shadow(0)
    torch.cuda.synchronize()
    assert kern.last_shadow, "the shadow path did not run"
    ref = out.clone()
    plain(0)
    torch.cuda.synchronize()
    err = float((out.float() - ref.float()).norm() / out.float().norm().clamp_min(1e-30))
    t_plain = time_graph(plain, ns)
    t_shadow = time_graph(shadow, ns)

    t_sdpa = sdpa_time(sets, scale)
    t_gqa = gqa_time(ort, sets, hq, hkv)[0] if ort is not None and ort.ok else float("nan")
    kb = B * hkv * L * d * 2  # all K (or all V) bytes
    shadow_bytes = B * hkv * L * d // 2 + B * hkv * ((L + SHADOW_BLOCK - 1) // SHADOW_BLOCK) * 2 * d * 2
    floor_plain = kb * (1 + fv)
    floor_shadow = shadow_bytes + kb * (fc + fv)
    return dict(
        B=B,
        L=L,
        hq=hq,
        hkv=hkv,
        d=d,
        theta=theta_kind,
        v_rows_fraction=fv,
        candidate_fraction=fc,
        k_bytes_fraction=(shadow_bytes + kb * fc) / kb,
        toptheta_us=t_shadow * 1e6,
        toptheta_plain_us=t_plain * 1e6,
        sdpa_us=t_sdpa * 1e6,
        gqa_us=t_gqa * 1e6,
        copy_GBps=COPY_GBPS,
        achieved_GBps=floor_shadow / t_shadow / 1e9,
        plain_achieved_GBps=floor_plain / t_plain / 1e9,
        vs_gqa=t_gqa / t_shadow,
        plain_vs_gqa=t_gqa / t_plain,
        vs_sdpa=t_sdpa / t_shadow,
        vs_plain=t_plain / t_shadow,
        ceiling_vs_dense=2 * kb / floor_shadow,
        out_rel_diff_vs_plain=err,
        **(extra or {}),
    )


def random_rows(kern, ort, hq, hkv, B, L, targets):
    g = torch.Generator(device="cuda").manual_seed(B * 7 + L + hq)
    d = 128
    ns = n_sets(2 * B * hkv * L * d * 2 * 1.3)
    sets = [
        tuple(
            torch.randn(*shape, device="cuda", generator=g, dtype=DT)
            for shape in ((B, hq, 1, d), (B, hkv, L, d), (B, hkv, L, d))
        )
        for _ in range(ns)
    ]
    scale = d**-0.5
    s0 = (
        torch.einsum("bgjd,bgld->bgjl", sets[0][0].float().view(B, hkv, hq // hkv, d), sets[0][1].float()) * scale
    ).reshape(B, hq, L)
    rows = [measure(kern, ort, sets, theta_for_vrows(s0, t, hkv)[:, 0], scale, hq, hkv, "random") for t in targets]
    sets.clear()
    torch.cuda.empty_cache()
    return rows


def real_rows(kern, ort, data, batches, k_target=64):
    """Rows of the captured layers: the last captured query row (it sees the whole window) with its θ."""
    rows = []
    for name, layer in sorted(data["layers"].items()):
        q1 = layer["q"][0, :, -1].to("cuda", DT)  # [Hq, D]
        k1, v1 = layer["k"][0].to("cuda", DT), layer["v"][0].to("cuda", DT)  # [Hkv, L, D]
        hq, d = q1.shape
        hkv, L, _ = k1.shape
        theta = layer["theta"]
        th = theta[k_target if k_target in theta else sorted(theta)[0]][:, -1].to("cuda", torch.float32)
        for B in batches:
            ns = n_sets(2 * B * hkv * L * d * 2 * 1.3)
            sets = [
                (
                    q1.view(1, hq, 1, d).expand(B, -1, -1, -1).contiguous(),
                    k1.unsqueeze(0).expand(B, -1, -1, -1).contiguous(),
                    v1.unsqueeze(0).expand(B, -1, -1, -1).contiguous(),
                )
                for _ in range(ns)
            ]
            extra = {"model": data.get("model"), "layer": int(name), "k": k_target}
            rows.append(measure(kern, ort, sets, th, float(layer["scale"]), hq, hkv, "real", extra))
            sets.clear()
            torch.cuda.empty_cache()
    return rows


def fmt(rows):
    head = (
        "| θ | layer | hq/hkv | B | L | V rows | candidates | K bytes | shadow µs | plain µs | GQA µs | SDPA µs "
        "| shadow vs GQA | plain vs GQA | shadow vs plain | % of copy |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['theta']} | {r.get('layer', '-')} | {r['hq']}/{r['hkv']} | {r['B']} | {r['L'] // 1024}k | "
            f"{r['v_rows_fraction']:.3f} | {r['candidate_fraction']:.3f} | {r['k_bytes_fraction']:.3f} | "
            f"{r['toptheta_us']:.1f} | {r['toptheta_plain_us']:.1f} | {r['gqa_us']:.1f} | {r['sdpa_us']:.1f} | "
            f"{r['vs_gqa']:.2f}x | {r['plain_vs_gqa']:.2f}x | {r['vs_plain']:.2f}x | "
            f"{100 * r['achieved_GBps'] / r['copy_GBps']:.0f}% |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", required=True)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--real", default=None, help="captured real layers (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="random: B 8 at 32k only")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    global COPY_GBPS
    t0 = time.time()
    kern, ort, info = open_run(args.library)
    copy = COPY_GBPS = info["copy_GBps"]
    rows = []
    if args.real:
        data = torch.load(args.real, map_location="cpu")
        rows += real_rows(kern, ort, data, (8, 16))
        print(fmt(rows), flush=True)
    shapes = [(8, 32768)] if args.quick else [(B, L) for B in (8, 16) for L in (16384, 32768)]
    for hq, hkv in ((32, 8), (12, 2)):
        for B, L in shapes:
            rows += random_rows(kern, ort, hq, hkv, B, L, (1 / 3, 0.07))
            print(fmt(rows[-2:]).split("\n", 2)[-1], flush=True)
    info["seconds"] = time.time() - t0
    (out_dir / "shadow-decode.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    md = [
        f"Device: {info['device']}, {info['date']}; torch {info['torch']}, onnxruntime {info['onnxruntime']}; "
        f"copy ceiling {copy:.0f} GB/s; {info['seconds']:.0f} s",
        "",
        fmt(rows),
        "",
    ]
    (out_dir / "shadow-decode.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
