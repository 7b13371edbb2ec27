"""How much of K can an exact low-bit shadow copy prune? A measurement on real attention (issue 16, part 2).

Runs on the CPU. A real model (SmolLM2-135M by default: 9 query heads, 3 KV heads, head dim 64), windows of S
tokens of builtin:pydoc, each run through the model once (dense attention). The last `--rows` query rows of a
window act as decode steps at context ~S against their causal prefix. Held out by leave-one-out: θ of window i's
rows is calibrated on the other `--windows` - 1 windows, as topthetaexport.torch.calibration.calibrate defines it
(per layer, head and row the mean over the windows of the k-th largest score; the first `--dense-layers` layers
dense), computed for the studied rows only, because calibrate's two passes over every row take hours at 8k on a
shared CPU (`--check-calibrate` runs calibrate on windows 2..N and prints the largest difference from window 1's
θ). q/k (after RoPE) of every layer are captured inside the dense attention and rounded to fp16, as the device's
cache holds them.

Shadow K, the layout of the planned CUDA kernel: per block of `block` consecutive keys and per channel, an fp16
min (the block's min rounded down to fp16) and an fp16 step (step = (max - min) / (2^bits - 1) rounded up to fp16),
and per element a `bits`-bit code on the grid min + code · step; so the stored value is within step/2 of the true
one (checked here: `max_quant_excess`, at most float32 rounding). For query q the score bound is
    scale · (q·k̂ + Σ_c |q_c| · step_c / 2) + margin
(margin: a float32 rounding allowance, 1e-4 · (1 + |bound|)), which is never below the true score. A key is a
candidate unless its bound is below θ; only candidates have their fp16 K row read, so every kept key
(score >= θ) is a candidate (checked here: `kept_pruned` must be 0). Keys of the row's last, incomplete block
(the keys appended since the last block boundary, which have no shadow yet) are always candidates. Candidates
and kept V rows are counted as the union over each GQA group, because one kernel block serves the group. Layers
left dense by calibration (θ = -inf) read everything and are not counted.

Bytes per key and KV head (D = head dim, f_c = candidate fraction, f_v = V-row fraction):
    dense                D·2 (K) + D·2 (V)
    all K + kept V       D·2 + f_v·D·2
    shadow               D·bits/8 + 2·2·D/block (min, step in fp16) + f_c·D·2 + f_v·D·2

Usage: python bench/shadow_k_study.py --seq 4096 --windows 3 [--rows 32] [--model smollm2-135m]
       [--k 64 32] [--bits 2 3 4 8] [--blocks 16 32 64] [--out docs/results/shadow-k.json]
       [--decode-out .gpubuild/smollm2_decode_8k.pt [--decode-layers 4 15 27]]
The rows of one (model, seq) replace that pair's rows in --out; other rows there are kept. --decode-out also
writes the real decode inputs of the first window for the device bench (save_decode: K/V cache, q of
the studied rows, their θ per k).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import topthetaexport as tt
from topthetaexport._errors import TopThetaError
from topthetaexport._io import atomic_path
from topthetaexport.data import as_token_tensor
from topthetaexport.torch import attention as torch_attention
from topthetaexport.torch import reference


def capture(loaded, tokens, *, with_v: bool = False):
    """{layer: (q [Hq, S, D], k [Hkv, S, D], v [Hkv, S, D] or None, scale)} of a dense forward of one window
    (float32). Runs the decoder without the LM head: only attention inputs are wanted."""
    got = {}
    orig = torch_attention._dispatch

    def cast(t):
        return t[0].float().clone()

    def spy(state, layer, q, k, v, mask, scale, causal, softcap=None):
        got[layer] = (cast(q), cast(k), cast(v) if with_v else None, float(scale))
        return orig(state, layer, q, k, v, mask, scale, causal, softcap)

    decoder = loaded.model.get_decoder()
    torch_attention._dispatch = spy
    try:
        with torch.no_grad(), torch_attention.attention_mode(loaded.model, "dense"):
            decoder(input_ids=tokens)
    finally:
        torch_attention._dispatch = orig
    return got


def kth_scores(q, k, scale, rows, kvals):
    """{k: the k-th largest valid score [Hq, rows] of each of the last ``rows`` query rows} (causal)."""
    s, valid = reference.valid_and_scores(q[None, :, -rows:], k[None], scale=scale, causal=True)
    top = s.masked_fill(~valid, float("-inf"))[0].topk(max(kvals), dim=-1).values
    return {kv: top[..., kv - 1].double() for kv in kvals}


def window_stats(loaded, tokens, rows, kvals, dense_layers, v_layers=()):
    """One dense forward of one window: ({layer: (q of the last ``rows`` rows, k, v or None, scale)} in fp16
    values, as the device's cache holds them; {layer: {k: the k-th largest score of those rows [Hq, rows]}} from
    the float32 q/k, as calibrate sees them) for the layers after the first ``dense_layers``."""
    inputs, kth = {}, {}
    for layer, (q, k, v, scale) in capture(loaded, tokens, with_v=bool(v_layers)).items():
        if layer < dense_layers:
            continue
        kth[layer] = kth_scores(q, k, scale, rows, kvals)
        half = v.half().float() if layer in v_layers else None
        inputs[layer] = (q[:, -rows:].half().float(), k.half().float(), half, scale)
    return inputs, kth


def leave_one_out(kths, i):
    """θ of window ``i``'s rows, {layer: {k: [Hq, rows]}}: the mean over the other windows of each row's k-th
    largest score (calibrate's θ with aggregation "mean", computed for these rows only)."""
    others = [w for j, w in enumerate(kths) if j != i]
    return {
        layer: {kv: (sum(w[layer][kv] for w in others) / len(others)).float() for kv in kths[i][layer]}
        for layer in kths[i]
    }


def fp16_down(x):
    """x rounded to a float16 value <= x (returned as float32)."""
    h = x.half()
    h = torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)
    return h.float()


def fp16_up(x):
    """x rounded to a float16 value >= x (returned as float32)."""
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def shadow(k, bits, block):
    """(k̂ [Hkv, full, D], step [Hkv, nblocks, D], max excess of |k - k̂| over step/2) for the ``full`` keys that
    lie in complete blocks; min and step are fp16 values, as the kernel stores them."""
    hkv, s, d = k.shape
    nb = s // block
    kb = k[:, : nb * block].reshape(hkv, nb, block, d)
    lo = fp16_down(kb.amin(2, keepdim=True))
    step = fp16_up((kb.amax(2, keepdim=True) - lo) / (2**bits - 1))
    code = torch.where(step > 0, ((kb - lo) / step.clamp_min(1e-30)).round(), torch.zeros_like(kb))
    khat = lo + code.clamp(0, 2**bits - 1) * step
    excess = float(((kb - khat).abs() - step / 2).max())
    return khat.reshape(hkv, nb * block, d), step.squeeze(2), excess


def unmargin(theta):
    """The b below which b + 1e-4·(1 + |b|) (the bound with its float32 rounding margin) is below θ."""
    return torch.where(theta >= 1e-4, (theta - 1e-4) / (1 + 1e-4), (theta - 1e-4) / (1 - 1e-4))


def study_layer(q, k, scale, thetas, settings):
    """Counts of the last R query rows (R = θ's row count; q may hold only those) of one layer, per k: valid
    keys, V rows, per-head kept keys and, per (bits, block) setting, candidates and kept keys that the bound
    pruned (candidates and V rows as the union over each GQA group)."""
    hq, d = q.shape[0], q.shape[2]
    hkv, s = k.shape[:2]
    grp = hq // hkv
    rows = next(iter(thetas.values())).shape[1]
    pos = torch.arange(s - rows, s)
    sc, valid = reference.valid_and_scores(q[None, :, -rows:], k[None], scale=scale, causal=True)
    sc, valid = sc[0].view(hkv, grp, rows, s), valid[0, 0]
    qr = q[:, -rows:].reshape(hkv, grp, rows, d)
    n_valid = float(valid.sum()) * hkv
    kept, out = {}, {}
    for kv, th in thetas.items():
        m = valid & (sc >= th.view(hkv, grp, rows, 1))
        # in raw units (q·k, before the scale), the margin folded into the threshold
        t = (unmargin(th) / scale).view(hkv, grp, rows, 1)
        kept[kv] = (m.nonzero(as_tuple=True), t)
        v_rows = float(torch.count_nonzero(m.any(1)))
        out[kv] = {"n_valid": n_valid, "v_rows": v_rows, "kept": float(torch.count_nonzero(m)) / grp}
    excess = float("-inf")
    keys = torch.arange(s)
    for bits, block in settings:
        khat, step, e = shadow(k, bits, block)
        excess = max(excess, e)
        full = khat.shape[1]
        # keys of complete blocks before the row's own incomplete one have a shadow; the rest are candidates
        tail0 = (pos + 1) // block * block
        shadowed = keys[None, :full] < tail0[:, None]  # [rows, full]
        n_tail = float((pos + 1 - tail0).sum()) * hkv
        raw = torch.einsum("hgrd,hsd->hgrs", qr, khat).view(hkv, grp, rows, full // block, block)
        raw += 0.5 * torch.einsum("hgrd,hbd->hgrb", qr.abs(), step)[..., None]
        raw = raw.view(hkv, grp, rows, full)
        for kv, (idx, t) in kept.items():
            cand = float(torch.count_nonzero((raw >= t).any(1) & shadowed)) + n_tail
            # kept keys whose bound fell below θ (a key of the incomplete block is read anyway)
            h, g, r, j = idx
            inside = j < full
            h, g, r, j = h[inside], g[inside], r[inside], j[inside]
            pruned = int(torch.count_nonzero((raw[h, g, r, j] < t[h, g, r, 0]) & shadowed[r, j]))
            out[kv][(bits, block)] = (cand, pruned)
    return out, excess


def save_decode(path, win, thetas, layers, kvals, meta):
    """The device bench's real decode inputs: per layer the K/V cache of the window, q of its last rows and θ."""
    rows = next(iter(thetas.values()))[kvals[0]].shape[1]
    # row i of q and θ is the query at position first_row + i: it sees keys 0 .. first_row + i
    data = dict(meta, rows=rows, first_row=meta["seq"] - rows, layers={})
    for layer in layers:
        q, k, v, scale = win[layer]
        data["layers"][layer] = dict(
            q=q[None].half().contiguous(),  # [1, Hq, R, D]
            k=k[None].half().contiguous(),  # [1, Hkv, S, D]
            v=v[None].half().contiguous(),
            theta={kv: thetas[layer][kv].contiguous() for kv in kvals},  # [Hq, R]
            scale=scale,
        )
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=3, help="windows; θ of each is calibrated on the others")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--out", default="docs/results/shadow-k.json")
    ap.add_argument("--decode-out", default=None, help="also write the first window's decode inputs here")
    ap.add_argument("--decode-layers", type=int, nargs="+", default=[4, 15, 27])
    ap.add_argument(
        "--check-calibrate", action="store_true", help="compare θ with topthetaexport's calibrate (slow: all rows)"
    )
    args = ap.parse_args()
    if any(not 1 <= b <= 8 for b in args.bits):
        raise TopThetaError(f"--bits must lie in 1..8 (got {args.bits}): codes are packed into bytes")
    if args.windows < 2 or not max(args.k) <= args.seq - args.rows:
        raise TopThetaError(
            f"need --windows >= 2 and every --k <= --seq - --rows (got {args.windows}, {args.k}, "
            f"{args.seq} - {args.rows})"
        )
    t0 = time.time()
    loaded = tt.load_model(args.model)
    layers_ok = args.dense_layers <= min(args.decode_layers) <= max(args.decode_layers) < loaded.num_layers
    if args.decode_out and not layers_ok:
        raise TopThetaError(
            f"--decode-layers must lie in {args.dense_layers}..{loaded.num_layers - 1} (the layers with a θ)"
        )
    if loaded.max_positions and args.seq > loaded.max_positions:
        raise TopThetaError(f"--seq {args.seq} exceeds the model's {loaded.max_positions} positions")
    n = args.windows
    tokens = as_token_tensor("builtin:pydoc", loaded.tokenizer, seq_len=args.seq, num_samples=n)
    if tokens.shape[0] < n:
        raise TopThetaError(f"builtin:pydoc holds only {tokens.shape[0]} windows of {args.seq}: lower --windows")
    inputs, kths = [], []
    for i in range(n):
        v_layers = args.decode_layers if args.decode_out and i == 0 else ()
        got, kth = window_stats(loaded, tokens[i : i + 1], args.rows, args.k, args.dense_layers, v_layers)
        inputs.append(got)
        kths.append(kth)
        print(f"window {i + 1}/{n} captured at {time.time() - t0:.0f}s", flush=True)
    if args.check_calibrate:
        th0 = leave_one_out(kths, 0)
        for kv in args.k:
            ref = tt.calibrate(loaded, tokens[1:n], k=kv, dense_layers=args.dense_layers, progress=None)
            diff = max(float((ref.layer(i)[0][:, -args.rows :] - th[kv]).abs().max()) for i, th in th0.items())
            print(f"k={kv}: largest |θ - calibrate's θ| over the studied rows: {diff:.3g}", flush=True)
    settings = [(b, blk) for b in args.bits for blk in args.blocks]
    per_win: dict = {kv: [] for kv in args.k}  # per k: the totals of each window
    worst_excess = float("-inf")
    for i in range(n):
        thetas = leave_one_out(kths, i)
        if args.decode_out and i == 0:
            meta = dict(model=args.model, data="builtin:pydoc", seq=args.seq, window=0, calib_windows=n - 1)
            save_decode(args.decode_out, inputs[0], thetas, args.decode_layers, args.k, meta)
            print(f"wrote {args.decode_out} ({Path(args.decode_out).stat().st_size / 1e6:.1f} MB)", flush=True)
        tot: dict = {kv: {} for kv in args.k}
        for layer, th in sorted(thetas.items()):
            q, k, _, scale = inputs[i][layer]
            one, excess = study_layer(q, k, scale, th, settings)
            worst_excess = max(worst_excess, excess)
            for kv, counts in one.items():
                for key, val in counts.items():
                    if isinstance(val, tuple):
                        c, p = tot[kv].get(key, (0.0, 0))
                        tot[kv][key] = (c + val[0], p + val[1])
                    else:
                        tot[kv][key] = tot[kv].get(key, 0.0) + val
        inputs[i] = {}
        for kv in args.k:
            per_win[kv].append(tot[kv])
        print(f"window {i + 1}/{n} studied at {time.time() - t0:.0f}s", flush=True)
    d, hq, hkv = loaded.head_dim, loaded.num_heads, loaded.num_kv_heads
    results = []
    for kv in args.k:
        wins = per_win[kv]
        n_valid = sum(w["n_valid"] for w in wins)
        fv = sum(w["v_rows"] for w in wins) / n_valid
        fv_win = [w["v_rows"] / w["n_valid"] for w in wins]
        fk = sum(w["kept"] for w in wins) / n_valid
        allk = 2 * d + 2 * d * fv
        for bits, block in settings:
            fc = sum(w[(bits, block)][0] for w in wins) / n_valid
            fc_win = [w[(bits, block)][0] / w["n_valid"] for w in wins]
            pruned = sum(w[(bits, block)][1] for w in wins)
            shadow_bytes = d * bits / 8 + 4 * d / block
            sh = shadow_bytes + 2 * d * fc + 2 * d * fv
            r = dict(
                model=args.model,
                hq=hq,
                hkv=hkv,
                d=d,
                seq=args.seq,
                k=kv,
                bits=bits,
                block=block,
                windows=n,
                calib_windows_per_theta=n - 1,
                rows_per_window=args.rows,
                sparse_layers=len(kths[0]),
                kept_fraction_per_head=fk,
                v_rows_fraction=fv,
                v_rows_fraction_per_window=fv_win,
                candidate_fraction=fc,
                candidate_fraction_per_window=fc_win,
                candidates_per_v_row=fc / fv,
                kept_pruned=pruned,
                shadow_bytes_per_key=shadow_bytes,
                k_memory_overhead=shadow_bytes / (2 * d),
                bytes_vs_dense=sh / (4 * d),
                bytes_vs_all_k=sh / allk,
                gain_vs_all_k=allk / sh,
                gain_vs_dense=4 * d / sh,
                all_k_gain_vs_dense=4 * d / allk,
            )
            results.append(r)
            print(
                f"k={kv} {bits}b/{block}: V rows {fv:.3f}, candidates {fc:.3f} "
                f"({min(fc_win):.3f}-{max(fc_win):.3f}), kept pruned {pruned}, bytes {r['bytes_vs_dense']:.3f} of "
                f"dense = {r['bytes_vs_all_k']:.3f} of all-K, {r['gain_vs_all_k']:.2f}x over all-K, "
                f"{r['gain_vs_dense']:.2f}x over dense (all-K: {r['all_k_gain_vs_dense']:.2f}x)",
                flush=True,
            )
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "data": "builtin:pydoc",
        "seconds": round(time.time() - t0),
        "max_quant_excess": worst_excess,
    }
    print(f"largest |k - k̂| - step/2: {worst_excess:.3g} (k̂ in float32: its rounding, which the margin covers)")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {"runs": [], "rows": []}

    def same(r):
        return r["model"] == args.model and r["seq"] == args.seq

    runs = [m for m in old["runs"] if not same(m)] + [dict(model=args.model, seq=args.seq, **meta)]
    rows = [r for r in old["rows"] if not same(r)] + results
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out} in {meta['seconds']}s")


if __name__ == "__main__":
    main()
