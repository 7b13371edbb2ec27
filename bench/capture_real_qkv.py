"""Real attention inputs for the prefill benchmark (runs on the CPU, no GPU needed).

SmolLM2-135M (LLaMA architecture: 9 query heads, 3 KV heads, head dim 64; the project's default model), S tokens
of Python's documentation (builtin:pydoc):
* thresholds θ and ρ: topthetaexport.torch.calibration with k=64 on the first `--calib` windows of S tokens;
* q, k, v (after RoPE) of a later window (not used for calibration) for the chosen layers, captured inside the
  dense attention of a real forward pass; saved as fp16 with each layer's θ [Hq, S] and ρ.

Usage: python bench/capture_real_qkv.py --out .gpubuild/smollm2_qkv.pt [--seq 4096] [--layers 4 15 27]
Then on the GPU: python bench/real_qkv_bench.py --library LIB --data .gpubuild/smollm2_qkv.pt

This is the prefill format (every query row of the window, θ and ρ for every row). At 4k it is 24 MB; at
8k it would be 49 MB, and calibrate's two passes over every row of two 8k windows take over an hour on a
shared 2-core CPU (one 2k window took 404 s). Real decode inputs at 8k (the K/V cache, q of the last rows and
their θ: 19 MB for three layers) come from bench/shadow_k_study.py --seq 8192 --decode-out
.gpubuild/smollm2_decode_8k.pt (docs/cuda-notes.md).
"""

import argparse
import time

import torch

import topthetaexport as tt
from topthetaexport.data import as_token_tensor
from topthetaexport.torch import attention as torch_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=2)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 15, 27])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    loaded = tt.load_model("smollm2-135m")
    tokens = as_token_tensor("builtin:pydoc", loaded.tokenizer, seq_len=args.seq, num_samples=args.calib + 1)
    th = tt.calibrate(loaded, tokens[: args.calib], k=args.k, seq_len=args.seq, num_samples=args.calib, progress=None)
    print(f"calibrated in {time.time() - t0:.0f}s", flush=True)

    captured = {}
    orig = torch_attention._dispatch

    def spy(state, layer, q, k, v, mask, scale, causal):
        if layer in args.layers:
            captured[layer] = dict(
                q=q.half().contiguous(),
                k=k.half().contiguous(),
                v=v.half().contiguous(),
                scale=scale,
                causal=causal,
                mask_none=mask is None,
            )
        return orig(state, layer, q, k, v, mask, scale, causal)

    torch_attention._dispatch = spy
    try:
        with torch.no_grad(), torch_attention.attention_mode(loaded.model, "dense"):
            loaded.model(input_ids=tokens[args.calib :])
    finally:
        torch_attention._dispatch = orig
    out = {
        "model": "smollm2-135m",
        "data": "builtin:pydoc",
        "seq": args.seq,
        "k": args.k,
        "calib_windows": args.calib,
        "layers": {},
    }
    for layer in args.layers:
        c = captured[layer]
        theta, rho = th.layer(layer)
        out["layers"][layer] = dict(
            q=c["q"],
            k=c["k"],
            v=c["v"],
            theta=theta.float().contiguous(),
            sdc=rho.float().contiguous(),
            scale=c["scale"],
            causal=c["causal"],
            mask_none=c["mask_none"],
        )
        print(
            layer,
            tuple(c["q"].shape),
            tuple(c["k"].shape),
            "causal",
            c["causal"],
            "mask None",
            c["mask_none"],
            "theta finite",
            float(torch.isfinite(theta).float().mean()),
        )
    torch.save(out, args.out)
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
