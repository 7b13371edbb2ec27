"""Which θ extrapolation past the calibrated rows keeps the kept count near k (issue 15): captures and offline
evaluation.

``capture``: dense PyTorch forwards of ``--context`` tokens with an attention hook (the calibrator's chunked
scores: scaled, masked, as the operator compares them) that records

* ``kth``: the k-th largest valid score of every row, per (layer, head), for each k of ``--k``, on the
  ``--truth`` window (by default the second ``--context``-token window of *Emma*: calibration at 4 × 2048
  used the first 8192 tokens) and on the held-out window; -inf where the row has <= k keys. This is the curve a
  perfect extrapolation would reproduce (one window, where calibration averages several);
* ``top``: on the held-out ``--heldout`` window (the first ``--context`` tokens, as ``eval --context`` takes
  it), the ``--top`` largest scores (float16, sorted, -inf padded) of selected rows: every ``--band-step``-th
  row of the ``BAND_ROWS`` rows before m·R (m = 1, 2, 4, ...) and every ``--curve-step``-th row from R/2, so
  that the kept count of any θ can be counted offline.

Each window is saved (``--out``, torch.save) as soon as it is done; a rerun skips finished windows.

``evaluate``: extends calibrated thresholds (``--thresholds``: the first ``calibrated_rows`` rows) with every
candidate extrapolation and prints, per candidate, kept/k by band on the held-out window (sparse layers,
heads and the captured rows of the band: the mean of the kept counts) and the θ error against the k-th
largest curve of the truth window (bias = predicted - true, mean over sparse layers and heads of the band's
rows; > 0: θ too high, fewer than k kept). Writes JSON with ``--json``.

    nice -n 10 python bench/theta_fit_study.py capture --model qwen2.5-coder-1.5b --k 720 --out /tmp/qwen-cap.pt
    python bench/theta_fit_study.py evaluate --capture /tmp/qwen-cap.pt --thresholds out/qwen-k720
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topthetaexport.thresholds import Thresholds, _fit_x  # noqa: E402

BUDGET = 1 << 23
BAND_ROWS = 256  # as eval --context: kept per row at m·R is the mean of the 256 rows before m·R


def selected_rows(context: int, calib_rows: int, band_step: int, curve_step: int) -> list[int]:
    rows = set(range(calib_rows // 2, context, curve_step))
    m = 1
    while m * calib_rows <= context:
        end = m * calib_rows
        rows.update(range(end - BAND_ROWS, end, band_step))
        m *= 2
    return sorted(r for r in rows if r < context)


def capture_window(model, ids, ks: list[int], sel: list[int] | None, top_n: int, theta=None, dense=()):
    """(kth {k: [L, H, S] float32}, top [L, H, len(sel), top_n] float16 or None, kept [L, H, S] or None) of one
    forward: dense, or with ``theta`` [L, H, >=S] the operator's rule s >= θ (comp 0) in the layers not in
    ``dense`` (the scores recorded are all valid scores of the row, kept or not)."""
    from topthetaexport.torch.attention import attention_mode
    from topthetaexport.torch.calibration import _chunk_scores, _row_chunks
    from topthetaexport.torch.reference import _expand_kv

    cfg = model.config
    layers, heads, s_len = cfg.num_hidden_layers, cfg.num_attention_heads, ids.shape[1]
    kth = {k: torch.full((layers, heads, s_len), float("-inf")) for k in ks}
    top = None
    sel_t = torch.tensor(sel or [], dtype=torch.long)
    if sel:
        top = torch.full((layers, heads, len(sel), top_n), float("-inf"), dtype=torch.float16)
    kmax = max(ks, default=0)
    kept = None if theta is None else torch.zeros(layers, heads, s_len, dtype=torch.int32)
    t0 = time.perf_counter()

    def fn(layer, q, k, v, mask, scale, causal, softcap=None):
        b, hq, sq, _ = q.shape
        out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float32)
        for r0, r1 in _row_chunks(b, hq, sq, k.shape[2], BUDGET):
            s, valid, kend = _chunk_scores(q, k, mask, scale, causal, r0, r1, softcap)
            masked = s.masked_fill(~valid, float("-inf"))
            n_valid = valid.sum(-1)[0]  # [H, C]
            t = masked[0].topk(min(kmax, kend), dim=-1, sorted=True).values if ks else None  # [H, C, <=kmax]
            for kk in ks:
                if t.shape[-1] >= kk:
                    val = t[..., kk - 1]
                    kth[kk][layer, :, r0:r1] = torch.where(n_valid > kk, val, float("-inf"))
            if top is not None:
                pick = ((sel_t >= r0) & (sel_t < r1)).nonzero()[:, 0]
                if pick.numel():
                    rows = sel_t[pick] - r0
                    tt = masked[0][:, rows].topk(min(top_n, kend), dim=-1, sorted=True).values
                    top[layer, :, pick, : tt.shape[-1]] = tt.half()
            if kept is not None and layer not in dense:
                use = valid & ~(s < theta[layer, :, r0:r1][None, :, :, None].float())
                kept[layer, :, r0:r1] = use[0].sum(-1).int()
                p = torch.nan_to_num(torch.softmax(s.masked_fill(~use, float("-inf")), -1), nan=0.0)
            else:
                p = torch.softmax(masked, -1)
            out[:, :, r0:r1] = torch.matmul(p, _expand_kv(v[:, :, :kend], hq).float())
        if layer % 4 == 3:
            print(f"    layer {layer + 1}/{layers} {time.perf_counter() - t0:.0f}s", flush=True)
        return out.to(q.dtype)

    body = getattr(model, "model", model)
    with torch.no_grad(), attention_mode(model, "dense", attention_fn=fn):
        body(input_ids=ids, attention_mask=torch.ones_like(ids))
    return kth, top, kept


def cmd_capture(a) -> int:
    from topthetaexport.data import token_batches
    from topthetaexport.models import load_model

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    res = torch.load(out) if out.exists() else {}
    ks = [int(x) for x in a.k.split(",")]
    sel = selected_rows(a.context, a.calib_rows, a.band_step, a.curve_step)
    res.setdefault(
        "meta",
        {
            "model": a.model,
            "k": ks,
            "context": a.context,
            "calib_rows": a.calib_rows,
            "truth": f"{a.truth} skip {a.truth_skip}",
            "heldout": a.heldout,
            "top": a.top,
            "command": " ".join(sys.argv),
        },
    )
    windows = ["heldout", "truth"] if not a.toptheta else []
    windows += [f"heldout-toptheta:{name}" for name in a.toptheta]
    todo = [w for w in windows if w not in res]
    if not todo:
        print("nothing to do", flush=True)
        return 0
    loaded = load_model(a.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    for w in todo:
        spec, skip = (a.truth, a.truth_skip) if w == "truth" else (a.heldout, 0)
        ids = token_batches(tok, spec, seq_len=a.context, num_samples=1, skip=skip)
        t0 = time.perf_counter()
        print(f"{w}: {spec} skip {skip}, {ids.shape[1]} tokens", flush=True)
        theta, dense = None, ()
        if w.startswith("heldout-toptheta:"):
            th = _calibrated(Thresholds.load(a.thresholds))
            theta = candidates(th, a.context)[w.split(":", 1)[1]].float()
            dense = set(th.dense_layers)
        want_k = [] if theta is not None and a.no_kth else ks
        kth, top, kept = capture_window(model, ids, want_k, None if w == "truth" else sel, a.top, theta, dense)
        res[w] = {"kth": kth, "seconds": time.perf_counter() - t0}
        if top is not None:
            res[w]["top"], res[w]["rows"] = top, torch.tensor(sel)
        if kept is not None:
            res[w]["kept"] = kept
        tmp = out.with_suffix(".tmp")
        torch.save(res, tmp)
        tmp.replace(out)
        print(f"{w}: done in {time.perf_counter() - t0:.0f}s -> {out}", flush=True)
    return 0


# -- candidate extrapolations ----------------------------------------------------------------------------
def _x(r: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    if kind in ("gauss", "log"):  # the project's own fit models
        return _fit_x(r.double(), kind, k)
    r1 = r.double() + 1.0
    if kind == "loglog":  # ln ln((r+1)/k): the Gumbel-type growth of the k-th largest
        return torch.log(torch.log(r1 / k).clamp(min=1e-6))
    if kind == "sqrtlog":  # sqrt(2 ln((r+1)/k)): the large-n Gaussian asymptote
        return torch.sqrt(2.0 * torch.log(r1 / k).clamp(min=1e-9))
    raise ValueError(kind)


def poly_fit(theta: torch.Tensor, r0: int, k: int, kind: str, degree: int, rows: int) -> torch.Tensor:
    """θ [L, H, R] extended to ``rows`` by least squares θ ≈ Σ c_j x(r)^j over the finite rows r0..R-1."""
    big = theta.shape[-1]
    r_fit = torch.arange(r0, big, dtype=torch.float64)
    y = theta[..., r0:].double()
    w = torch.isfinite(y)
    xs = _x(r_fit, k, kind)
    design = torch.stack([xs**j for j in range(degree + 1)], -1)  # [n, d+1]
    r_new = torch.arange(big, rows, dtype=torch.float64)
    d_new = torch.stack([_x(r_new, k, kind) ** j for j in range(degree + 1)], -1)
    out = theta[..., -1:].double().expand(*theta.shape[:-1], rows - big).clone()
    L, H = theta.shape[:2]
    for li in range(L):
        for h in range(H):
            m = w[li, h]
            if int(m.sum()) <= degree:
                continue
            sol = torch.linalg.lstsq(design[m], y[li, h][m][:, None]).solution[:, 0]
            out[li, h] = d_new @ sol
    return torch.cat([theta.double(), out], -1)


def candidates(th: Thresholds, rows: int) -> dict[str, torch.Tensor]:
    """name -> θ [L, H, rows] (float64), the calibrated rows kept as they are."""
    k = int(th.meta["k"])
    base = th.theta
    big = th.num_rows
    out = {"last-row": torch.cat([base.double(), base[..., -1:].double().expand(-1, -1, rows - big)], -1)}
    # the fit before this study: gauss on the last half of the calibrated rows (and rows with more than k keys)
    out["current: gauss, last 1/2"] = poly_fit(base, max(big // 2, k + 1), k, "gauss", 1, rows)
    out["fit_range='all' (Thresholds.extended)"] = th.extended(rows, "fit", fit_range="all").theta.double()
    starts = {"all rows > k": k + 1, "last 1/2": big // 2, "last 1/4": 3 * big // 4, "last 1/8": 7 * big // 8}
    for label, r0 in starts.items():
        r0 = max(min(r0, big - 16), k + 1)
        if label != "last 1/2":
            out[f"gauss, {label} (r >= {r0})"] = poly_fit(base, r0, k, "gauss", 1, rows)
        out[f"log, {label} (r >= {r0})"] = poly_fit(base, r0, k, "log", 1, rows)
    r0 = max(big // 2, k + 1)
    out["gauss quadratic, last 1/2"] = poly_fit(base, r0, k, "gauss", 2, rows)
    out["log quadratic, last 1/2"] = poly_fit(base, r0, k, "log", 2, rows)
    out["sqrt(2 ln((r+1)/k)), last 1/2"] = poly_fit(base, r0, k, "sqrtlog", 1, rows)
    out["ln ln((r+1)/k), last 1/2"] = poly_fit(base, r0, k, "loglog", 1, rows)
    # the mean of gauss and log (their errors have opposite signs where both are off)
    out["mean(gauss, log), last 1/2"] = 0.5 * (
        out["current: gauss, last 1/2"] + out[f"log, last 1/2 (r >= {max(big // 2, k + 1)})"]
    )
    return out


def kept_counts(top: torch.Tensor, theta_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """kept [L, H, n] of the captured ``rows``: scores >= θ among the stored top scores; where all stored
    scores pass (more than top's width kept: a few heads of Qwen's layer 1 keep nearly every key) the row's
    r + 1 keys, an upper bound."""
    kept = (top.float() >= theta_rows.float()[..., None]).sum(-1)
    return torch.where(kept >= top.shape[-1], (rows + 1).view(1, 1, -1).expand_as(kept), kept)


def _calibrated(th: Thresholds) -> Thresholds:
    """The calibrated rows of ``th`` alone (a folder written with --theta-extrapolation fit holds more)."""
    calib = int(th.meta.get("calibrated_rows") or th.num_rows)
    meta = {k: v for k, v in th.meta.items() if k not in ("theta_extrapolation", "theta_fit", "calibrated_rows")}
    return Thresholds(th.theta[..., :calib].clone(), th.sdc[..., :calib].clone(), meta)


def cmd_evaluate(a) -> int:
    cap: dict = {}
    for f in a.capture:  # later files add their windows (a Top-θ capture beside the dense one)
        part = torch.load(f)
        cap.setdefault("meta", part.get("meta"))
        cap.update({key: val for key, val in part.items() if key != "meta"})
    th = _calibrated(Thresholds.load(a.thresholds))
    calib = th.num_rows
    k = int(th.meta["k"])
    context = int(cap["meta"]["context"])
    sparse = [i for i in range(th.num_layers) if i not in th.dense_layers]
    runs = {key.split(":", 1)[1] if ":" in key else "dense": cap[key] for key in cap if key.startswith("heldout")}
    truth = cap["truth"]["kth"][k][sparse].double() if "truth" in cap else None
    truth_h = cap["heldout"]["kth"][k][sparse].double()
    bands = []
    m = 1
    while m * calib <= context:
        bands.append(m)
        m *= 2
    results = []
    for name, full in candidates(th, context).items():
        full = full[sparse]
        row: dict = {"candidate": name}
        for run, held in runs.items():
            rows_t = held["rows"]
            top = held["top"][sparse]
            kept = kept_counts(top, full[:, :, rows_t], rows_t).double()
            tag = "" if run == "dense" else f" [Top-θ run: {run}]"
            row[f"saturated{tag}"] = float((kept >= top.shape[-1]).double().mean())
            for m in bands:
                in_band = (rows_t >= m * calib - BAND_ROWS) & (rows_t < m * calib)
                row[f"kept/k {m}x{tag}"] = float(kept[:, :, in_band].mean()) / k
            if "kept" in held and run == name:  # the run's own kept counts, every row of the band
                for m in bands:
                    band = held["kept"][sparse][:, :, m * calib - BAND_ROWS : m * calib].double()
                    row[f"kept/k {m}x [own run, all rows]"] = float(band.mean()) / k
        for m in bands:
            end = m * calib
            for nm, tr in (("truth", truth), ("heldout", truth_h)):
                if tr is None:
                    continue
                p, t = full[:, :, end - BAND_ROWS : end], tr[:, :, end - BAND_ROWS : end]
                both = torch.isfinite(p) & torch.isfinite(t)
                err = torch.where(both, p - t, 0.0)
                n = both.sum(-1).clamp(min=1)
                per_head = err.sum(-1) / n  # band-mean error per (layer, head)
                have = both.any(-1)
                row[f"bias {nm} {m}x"] = float(per_head[have].mean()) if have.any() else math.nan
                row[f"rmse {nm} {m}x"] = float(per_head[have].pow(2).mean().sqrt()) if have.any() else math.nan
        results.append(row)
        tags = [""] + [f" [Top-θ run: {run}]" for run in runs if run != "dense"] + [" [own run, all rows]"]
        cells = " | ".join(
            " ".join(f"{row[f'kept/k {m}x{tag}']:.2f}" for m in bands) for tag in tags if f"kept/k 1x{tag}" in row
        )
        errs = " ".join(
            f"{row.get(f'bias {nm} {m}x', math.nan):+.2f}/{row.get(f'rmse {nm} {m}x', math.nan):.2f}"
            for nm in ("truth", "heldout")
            for m in bands[1:]
        )
        print(f"{name:34s} kept/k {cells} | θ bias/rmse truth, held-out {errs}", flush=True)
    if a.json:
        out = {"meta": cap["meta"], "k": k, "calib_rows": calib, "runs": list(runs), "rows": results}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--model", required=True)
    c.add_argument("--k", default="720", help="comma list: the k-th largest curves to record")
    c.add_argument("--context", type=int, default=8192)
    c.add_argument("--calib-rows", type=int, default=2048)
    c.add_argument("--truth", default="austen:emma")
    c.add_argument("--truth-skip", type=int, default=1, help="windows of --context tokens to skip in --truth")
    c.add_argument("--heldout", default="austen:sensesensibility")
    c.add_argument("--top", type=int, default=4096)
    c.add_argument("--band-step", type=int, default=8)
    c.add_argument("--curve-step", type=int, default=64)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", required=True)
    c.add_argument(
        "--toptheta",
        action="append",
        default=[],
        help="instead of the dense windows: the held-out window run with Top-θ by this candidate of --thresholds",
    )
    c.add_argument("--thresholds", help="calibrated thresholds (for --toptheta)")
    c.add_argument("--no-kth", action="store_true", help="--toptheta runs: skip the k-th largest curves (faster)")
    e = sub.add_parser("evaluate")
    e.add_argument("--capture", required=True, action="append", help="capture file(s); repeat to merge")
    e.add_argument("--thresholds", required=True)
    e.add_argument("--json")
    a = ap.parse_args(argv)
    return cmd_capture(a) if a.cmd == "capture" else cmd_evaluate(a)


if __name__ == "__main__":
    raise SystemExit(main())
