"""Kept elements per row beyond the calibrated length: θ extrapolated by the log fit vs the last row reused.

PyTorch measurement (the model's Top-θ forward computed in chunks of query rows, so that an 8k-row layer never
holds an [S, S] matrix; the keep rule of docs/op.md, comp_mode 0): calibrate SmolLM2-135M at --calib-len on
--calib, extend θ to --context rows with each method (Thresholds.extended), run --windows held-out windows of
--context tokens of --data, and report the kept elements per row of the sparse layers (mean over layers, heads,
windows) in row bands: the calibrated rows, and the last --band rows before 4x and 16x the calibrated length.

Usage: python bench/theta_extrapolation.py --out docs/results/theta-extrapolation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from topthetaexport._io import write_json
from topthetaexport.data import token_batches
from topthetaexport.models import load_model
from topthetaexport.torch.attention import attention_mode
from topthetaexport.torch.calibration import _chunk_scores, _row_chunks, calibrate
from topthetaexport.torch.reference import _expand_kv


class ChunkedTopTheta:
    """Top-θ attention (comp_mode 0) per chunk of query rows; records the kept count of every row."""

    def __init__(self, thresholds, budget: int = 1 << 23):
        self.th, self.budget = thresholds, budget
        self.kept: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, v, mask, scale, causal):
        b, hq, sq, _ = q.shape
        theta = self.th.theta[layer]
        offset = k.shape[2] - sq
        out = torch.empty(b, hq, sq, v.shape[-1])
        kept = torch.empty(b, hq, sq, dtype=torch.int64)
        for r0, r1 in _row_chunks(b, hq, sq, k.shape[2], self.budget):
            s, valid, kend = _chunk_scores(q, k, mask, scale, causal, r0, r1)
            rr = (torch.arange(r0, r1) + offset).clamp(max=theta.shape[1] - 1)
            keep = valid & ~(s < theta[:, rr][None, :, :, None])
            kept[:, :, r0:r1] = keep.sum(-1)
            p = torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), -1), nan=0.0)
            out[:, :, r0:r1] = torch.matmul(p, _expand_kv(v[:, :, :kend], hq).float())
        self.kept[layer] = kept
        return out.to(q.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="austen:emma")
    ap.add_argument("--data", default="austen:persuasion")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--band", type=int, default=256)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    lm = load_model(a.model)
    th = calibrate(lm, a.calib, k=a.k, seq_len=a.calib_len, num_samples=a.samples, dense_layers=2, progress=None)
    t_cal = time.perf_counter() - t0
    ids = token_batches(lm.tokenizer, a.data, seq_len=a.context, num_samples=a.windows)
    sparse = [i for i in range(lm.num_layers) if i not in th.dense_layers]
    bands = {"calibrated": (a.calib_len - a.band, a.calib_len)}
    for m in (2, 4, 8, 16):
        if m * a.calib_len <= a.context:
            bands[f"{m}x"] = (m * a.calib_len - a.band, m * a.calib_len)
    results = []
    for method in ("fit", "last-row"):
        ext = th.extended(a.context, method)
        fn = ChunkedTopTheta(ext)
        sums = {name: 0.0 for name in bands}
        t1 = time.perf_counter()
        for w in range(ids.shape[0]):
            with torch.no_grad(), attention_mode(lm.model, "dense", attention_fn=fn):
                lm.model.base_model(input_ids=ids[w : w + 1], attention_mask=torch.ones_like(ids[w : w + 1]))
            per_row = torch.stack([fn.kept[i].double().mean((0, 1)) for i in sparse]).mean(0)  # [S]
            for name, (r0, r1) in bands.items():
                sums[name] += float(per_row[r0:r1].mean())
        row = {
            "theta_extrapolation": method,
            "kept_per_row_sparse_layers": {n: v / ids.shape[0] for n, v in sums.items()},
            "ratio_to_k": {n: v / ids.shape[0] / a.k for n, v in sums.items()},
            "seconds": time.perf_counter() - t1,
        }
        print(json.dumps(row))
        results.append(row)
    write_json(
        a.out,
        {
            "what": "kept elements per row, sparse layers, PyTorch chunked Top-θ forward (comp 0), by row band",
            "model": lm.name,
            "k": a.k,
            "calib": a.calib,
            "calib_len": a.calib_len,
            "calib_samples": a.samples,
            "data": a.data,
            "context": a.context,
            "windows": ids.shape[0],
            "bands": {n: list(b) for n, b in bands.items()},
            "results": results,
            "calibrate_s": t_cal,
            "machine": platform.processor() or platform.machine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


if __name__ == "__main__":
    main()
