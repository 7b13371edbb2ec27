"""How much of K can an exact low-bit shadow copy prune? A measurement on real attention (issue 16, part 2).

Runs on the CPU. SmolLM2-135M (9 query heads, 3 KV heads, head dim 64), windows of S tokens of
builtin:pydoc: θ is calibrated (topthetaexport.torch.calibration, k given) on the first windows, and q/k (after
RoPE) of every layer are captured inside the dense attention of later, held-out windows. The last `--rows`
query rows of each held-out window act as decode steps against their causal prefix.

Shadow K: per block of `block` consecutive keys and per channel, the block's min and max; each key element is
stored as a `bits`-bit code on the grid min + code · step, step = (max - min) / (2^bits - 1), so the stored
value is within step/2 of the true one. For query q the score bound is
    scale · (q·k̂ + Σ_c |q_c| · step_c / 2) + margin
(margin: a float32 rounding allowance, 1e-4 · (1 + |bound|)), which is never below the true score. A key is a
candidate unless its bound is below θ; only candidates have their fp16 K row read, so every kept key
(score >= θ) is a candidate (checked here: `kept_pruned` must be 0). The keys of the last, partial block are
always candidates. Candidates and kept V rows are counted as the union over each GQA group, because one kernel
block serves the group.

Bytes per key and KV head (D = head dim, f_c = candidate fraction, f_v = V-row fraction):
    dense                D·2 (K) + D·2 (V)
    all K + kept V       D·2 + f_v·D·2
    shadow               D·bits/8 + 2·2·D/block (min, step in fp16) + f_c·D·2 + f_v·D·2

Usage: python bench/shadow_k_study.py --seq 4096 --calib 2 --held 2 [--k 64 32] --out docs/results/shadow-k.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import topthetaexport as tt
from topthetaexport.data import as_token_tensor
from topthetaexport.torch import attention as torch_attention


def capture(loaded, tokens):
    """{layer: (q [Hq, S, D], k [Hkv, S, D], scale)} of a dense forward of one window (float32)."""
    got = {}
    orig = torch_attention._dispatch

    def spy(state, layer, q, k, v, mask, scale, causal):
        got[layer] = (q[0].float().clone(), k[0].float().clone(), float(scale))
        return orig(state, layer, q, k, v, mask, scale, causal)

    torch_attention._dispatch = spy
    try:
        with torch.no_grad(), torch_attention.attention_mode(loaded.model, "dense"):
            loaded.model(input_ids=tokens)
    finally:
        torch_attention._dispatch = orig
    return got


def shadow(k, bits, block):
    """(k̂ [Hkv, S, D], step [Hkv, nblocks, D], full) for the `full` keys that lie in complete blocks."""
    hkv, s, d = k.shape
    nb = s // block
    kb = k[:, : nb * block].reshape(hkv, nb, block, d)
    lo, hi = kb.amin(2, keepdim=True), kb.amax(2, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    code = torch.where(step > 0, ((kb - lo) / step.clamp_min(1e-30)).round(), torch.zeros_like(kb))
    khat = lo + code * step
    return khat.reshape(hkv, nb * block, d), step.squeeze(2), nb * block


def study_layer(q, k, scale, theta, rows, settings):
    """Counts for the last `rows` query rows of one layer: per setting, candidates / kept / pruned-kept."""
    hq, s, d = q.shape
    hkv = k.shape[0]
    grp = hq // hkv
    r0 = s - rows
    qr = q[:, r0:]  # [Hq, rows, D]
    pos = torch.arange(r0, s)
    th = theta[:, pos.clamp(max=theta.shape[1] - 1)]  # [Hq, rows]
    kk = k.repeat_interleave(grp, 0)  # [Hq, S, D]
    scores = scale * torch.einsum("hrd,hsd->hrs", qr, kk)
    valid = torch.arange(s)[None, :] <= pos[:, None]  # [rows, S]
    kept = valid[None] & (scores >= th[..., None])
    union = lambda m: m.view(hkv, grp, rows, s).any(1)  # noqa: E731 - [Hkv, rows, S]
    n_valid = float(valid.sum()) * hkv
    out = {"n_valid": n_valid, "v_rows": float(union(kept).sum()), "kept": float(kept.sum()) / grp}
    for bits, block in settings:
        khat, step, full = shadow(k, bits, block)
        kh = khat.repeat_interleave(grp, 0)
        st = step.repeat_interleave(grp, 0)  # [Hq, nb, D]
        approx = torch.einsum("hrd,hsd->hrs", qr, kh)
        err = 0.5 * torch.einsum("hrd,hbd->hrb", qr.abs(), st).repeat_interleave(block, 2)  # [Hq, rows, full]
        bound = scale * (approx + err)
        bound = bound + 1e-4 * (1 + bound.abs())
        cand = torch.ones_like(kept)
        cand[..., :full] = bound >= th[..., None]
        cand &= valid[None]
        out[f"{bits}b/{block}"] = {
            "candidates": float(union(cand).sum()),
            "kept_pruned": int((kept & ~cand).sum()),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=2)
    ap.add_argument("--held", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--out", default="docs/results/shadow-k.json")
    args = ap.parse_args()
    t0 = time.time()
    loaded = tt.load_model("smollm2-135m")
    n = args.calib + args.held
    tokens = as_token_tensor("builtin:pydoc", loaded.tokenizer, seq_len=args.seq, num_samples=n)
    held = [capture(loaded, tokens[i : i + 1]) for i in range(args.calib, n)]
    print(f"captured {args.held} windows of {args.seq} in {time.time() - t0:.0f}s", flush=True)
    settings = [(b, blk) for b in args.bits for blk in args.blocks]
    d = loaded.head_dim
    results = []
    for k in args.k:
        th = tt.calibrate(loaded, tokens[: args.calib], k=k, seq_len=args.seq, num_samples=args.calib, progress=None)
        tot: dict = {}
        for win in held:
            for layer, (q, kk, scale) in win.items():
                theta = th.layer(layer)[0].float()
                if not torch.isfinite(theta).any():
                    continue  # a dense layer
                one = study_layer(q, kk, scale, theta, args.rows, settings)
                for key, val in one.items():
                    if isinstance(val, dict):
                        slot = tot.setdefault(key, {"candidates": 0.0, "kept_pruned": 0})
                        slot["candidates"] += val["candidates"]
                        slot["kept_pruned"] += val["kept_pruned"]
                    else:
                        tot[key] = tot.get(key, 0.0) + val
        fv = tot["v_rows"] / tot["n_valid"]
        allk = 2 * d + 2 * d * fv
        for bits, block in settings:
            slot = tot[f"{bits}b/{block}"]
            fc = slot["candidates"] / tot["n_valid"]
            sh = d * bits / 8 + 4 * d / block + 2 * d * fc + 2 * d * fv
            results.append(
                dict(
                    model="smollm2-135m",
                    seq=args.seq,
                    k=k,
                    bits=bits,
                    block=block,
                    windows=args.held,
                    rows_per_window=args.rows,
                    v_rows_fraction=fv,
                    candidate_fraction=fc,
                    kept_pruned=slot["kept_pruned"],
                    bytes_vs_dense=sh / (4 * d),
                    gain_vs_all_k=allk / sh,
                    gain_vs_dense=4 * d / sh,
                    all_k_gain_vs_dense=4 * d / allk,
                )
            )
            r = results[-1]
            print(
                f"k={k} {bits}b/{block}: V rows {fv:.3f}, candidates {fc:.3f}, kept pruned {slot['kept_pruned']}, "
                f"bytes {r['bytes_vs_dense']:.3f} of dense, {r['gain_vs_all_k']:.2f}x over all-K, "
                f"{r['gain_vs_dense']:.2f}x over dense (all-K: {r['all_k_gain_vs_dense']:.2f}x)",
                flush=True,
            )
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "seconds": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"wrote {out} in {meta['seconds']:.0f}s")


if __name__ == "__main__":
    main()
