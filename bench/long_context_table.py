"""The long-context table (docs/accuracy.md) and long-context.json from an ``eval --context`` result: the
finished ``long-context-details.json`` or the ``--checkpoint`` file of a run stopped part-way (then the rows hold
what was measured; needle fields of variants not yet run are null).

Usage: python bench/long_context_table.py SOURCE [--thresholds OUT] [--out docs/results/long-context.json]
(SOURCE: a checkpoint or the details; --thresholds: the evaluated OUT folder, needed for a checkpoint.)

``--out`` merges: a row of the file with the same model, context, calibration length, k, extrapolation, text, dense
layers, compensation, per-layer k, dense heads, calibration text and device as a new row is replaced, the others
are kept (a row written before a field existed reads as its default).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

from topthetaexport._io import write_json
from topthetaexport.eval.long_context import _rows
from topthetaexport.thresholds import Thresholds


def _f(x, spec):
    return "n/a" if x is None else format(x, spec)


_ROW_KEY = (
    "model",
    "context",
    "calib_len",
    "k",
    "calib_source",
    "theta_extrapolation",
    "data",
    "dense_layers",
    "comp_mode",
    "layer_k",
    "dense_heads",
    "device",
)


def _key(row: dict) -> tuple:
    """A row's identity; rows written before a field existed read as its default (device "cpu", no layer_k)."""
    return tuple(json.dumps(row.get(f) or ("cpu" if f == "device" else None), sort_keys=True) for f in _ROW_KEY)


def merged_rows(path: str, rows: list[dict]) -> list[dict]:
    """The rows of the JSON list at ``path`` (none if it does not exist), those of ``rows`` replacing the ones with
    the same ``_ROW_KEY``, new ones appended."""
    try:
        old = json.loads(open(path).read())
    except FileNotFoundError:
        old = []
    new = {_key(r): r for r in rows}
    kept = [r for r in old if _key(r) not in new]
    return kept + list(new.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--thresholds", help="the evaluated OUT folder (needed for a checkpoint file)")
    ap.add_argument("--out")
    a = ap.parse_args()
    src = json.loads(open(a.source).read())
    if a.thresholds is None and "results" not in src:
        raise SystemExit(f"{a.source} is a checkpoint: pass --thresholds OUT (the folder it evaluated)")
    rows = src["results"] if a.thresholds is None else _checkpoint_rows(src, a.thresholds)
    for r in rows:  # rows written before they named it: the calibration of the details
        r.setdefault("calib_source", (src.get("calibration") or {}).get("calib_source"))
    if a.out:
        write_json(a.out, merged_rows(a.out, rows))
    _print_table(rows)


def _checkpoint_rows(src: dict, thresholds: str) -> list[dict]:
    """The rows of an ``eval --context`` checkpoint (or details) with the θ of ``thresholds``."""
    measured = {v: {int(c): m for c, m in by_c.items()} for v, by_c in src["measured"].items()}
    th = Thresholds.load(thresholds)
    calib_rows = int(th.meta.get("calibrated_rows") or th.meta.get("seq_len") or th.num_rows)
    contexts = sorted(next(iter(measured.values())))
    exts = tuple(v.split("/", 1)[1] for v in measured if v.startswith("toptheta/"))
    complete = {v: {c: m for c, m in by_c.items()} for v, by_c in measured.items()}
    for v in complete:  # variants without any measurement of a text are dropped from that text's rows
        for c in contexts:
            complete[v].setdefault(c, {})
    rows = _rows(SimpleNamespace(name=th.meta.get("model")), th, calib_rows, contexts, exts, complete, True)
    for r in rows:  # where it ran: a checkpoint file does not say, the finished details do
        r["device"] = (src.get("machine") or {}).get("device", "cpu")
    for r in rows:  # needles: null where that variant's needles were not run
        for key, var in (("needle_dense", "dense"), ("needle_toptheta", f"toptheta/{r['theta_extrapolation']}")):
            if r["domain"] == "in_domain" and not measured[var].get(r["context"], {}).get("needle"):
                r[key] = None
    return rows


def _print_table(rows: list[dict]) -> None:
    print(
        "| context | θ past R | text | ppl dense | ppl Top-θ | Δ | kept/row (sparse, last 512 rows) | "
        "V rows / decode step (dense → Top-θ) | reduction | needle dense | needle Top-θ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']} | {r['theta_extrapolation']} | {r['data']} | {r['ppl_dense']:.2f} | "
            f"{r['ppl_toptheta']:.2f} | {100 * r['ppl_relative_change']:+.2f}% | {_f(r['kept_per_row'], '.0f')} | "
            f"{_f(r['v_rows_per_step_dense'], '.0f')} → {_f(r['v_rows_per_step_toptheta'], '.0f')} | "
            f"{_f(r['v_rows_reduction'], '.2f')}x | {_f(r['needle_dense'], '.2f')} | "
            f"{_f(r['needle_toptheta'], '.2f')} |"
        )
    print()
    print("| θ past R | " + " | ".join(f"{b} R" for b in ("1x", "2x", "4x", "8x", "16x")) + " |")
    print("|---|" + "---|" * 5)
    for r in rows:
        bands = r.get("kept_per_row_by_band")
        if bands and r["domain"] == "in_domain":
            cells = " | ".join(_f(bands.get(b), ".0f") for b in ("1x", "2x", "4x", "8x", "16x"))
            print(f"| {r['theta_extrapolation']} ({r['data']}, context {r['context']}) | {cells} |")


if __name__ == "__main__":
    main()
