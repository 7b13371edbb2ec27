"""How well each θ extrapolation predicts calibrated thresholds it did not see (no forward pass: θ only).

Calibrating at R' rows on a window's prefix gives the first R' rows of a calibration at R (causal rows do not
depend on later tokens), so the first R' rows of OUT's thresholds stand for a calibration at R'. Each method
(Thresholds.extended: "fit" with the gauss or log model, "last-row") extends them to R rows; the error is
measured against the calibrated θ of the last 64 rows before m·R' (sparse layers, all heads): bias (mean of
predicted - calibrated; > 0 means θ too high, fewer keys kept than k) and RMSE, in score units.

Usage: python bench/theta_fit_check.py OUT [--out docs/results/theta-fit-check.json]
"""

from __future__ import annotations

import argparse
import json

from topthetaexport._io import write_json
from topthetaexport.thresholds import Thresholds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("thresholds")
    ap.add_argument("--out")
    a = ap.parse_args()
    th = Thresholds.load(a.thresholds)
    full = th.theta.double()
    rows = th.num_rows
    sparse = [i for i in range(th.num_layers) if i not in th.dense_layers]
    results = []
    for short in (rows // 4, rows // 2):
        cut = Thresholds(th.theta[:, :, :short], th.sdc[:, :, :short], dict(th.meta))
        for m in (2, 4, 8):
            end = m * short
            if end > rows:
                continue
            truth = full[sparse, :, end - 64 : end]
            for method, model in (("fit", "gauss"), ("fit", "log"), ("last-row", None)):
                ext = cut.extended(rows, method, model=model or "gauss").theta.double()
                if method == "last-row":
                    ext = cut.theta[..., -1:].double().expand(-1, -1, rows)
                err = ext[sparse, :, end - 64 : end] - truth
                row = {
                    "calibrated_rows": short,
                    "predicted_rows": [end - 64, end],
                    "times_calibrated": m,
                    "method": method if model is None else f"{method}:{model}",
                    "bias": float(err.mean()),
                    "rmse": float(err.pow(2).mean().sqrt()),
                }
                results.append(row)
                print(json.dumps(row))
    if a.out:
        meta = {k: th.meta.get(k) for k in ("model", "k", "seq_len", "num_samples", "calib_source")}
        write_json(a.out, {"thresholds": meta, "results": results})


if __name__ == "__main__":
    main()
