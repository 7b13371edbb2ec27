"""CPU benchmark of ai.toptheta::TopThetaAttention against onnxruntime's dense attention operators.

Single-node graphs in one onnxruntime CPU build (engine: topthetaexport/ort/bench.py): ONNX Attention (opset 23),
com.microsoft MultiHeadAttention (K/V repeated to the query heads) and GroupQueryAttention, and Top-θ with θ set
per head to keep 1 (θ = -inf), 1/8 and 1/32 of the keys. Calls are interleaved and medians reported; the load
average is recorded around every configuration, because the machine is shared.

  TOPTHETA_OPS_LIBRARY=build/dev/libtoptheta_ops.so python bench/cpu_bench.py --out bench/results/cpu-DATE

Writes OUT.json (every row) and OUT.md (the table of docs/benchmarks.md, CPU section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topthetaexport.ort.bench import DENSE, METHODS, run_suite  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "qwen2.5-1.5b": (12, 2, 128)}  # query heads, kv heads, head dim
PHASES = {"prefill": (512, 2048, 4096), "decode": (2048, 8192, 32768)}
KEEPS = (1.0, 1 / 8, 1 / 32)


def load() -> float:
    return os.getloadavg()[0]


def machine() -> dict:
    import numpy
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": [f for f in ("avx2", "fma", "f16c", "avx512f") if f in flags],
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "library": os.environ.get("TOPTHETA_OPS_LIBRARY", "(installed)"),
    }


def ceiling(row) -> float | None:
    """Decode: bytes of dense (all K and V) over Top-θ's (all K, the V rows read: the union over each GQA group).
    Prefill: causal dense work (QK + PV) over Top-θ's (QK + keep * PV)."""
    if row["phase"] == "decode":
        return 2.0 / (1.0 + row["v_rows_read"])
    return 2.0 / (1.0 + row["kept_fraction"])


def decode_gbs(row, ms_key) -> float | None:
    """Decode: GB/s of the bytes the method must read (dense: all K and V; Top-θ: all K and the V rows read)."""
    if row["phase"] != "decode":
        return None
    hq, hkv, d = SHAPES[row["shape"]]
    kv = hkv * row["context"] * d * 4
    read = kv * (1 + row["v_rows_read"]) if ms_key == "toptheta_ms" else 2 * kv
    return read / (row[ms_key] * 1e-3) / 1e9


def table(rows) -> str:
    out = [
        "| shape | phase | T | keep | kept | dense Attention ms | MHA ms | GQA ms | Top-θ ms | dense ÷ Top-θ | "
        "ceiling | dense, Top-θ GB/s | load |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        ratio = r[f"{DENSE}_ms"] / r["toptheta_ms"]
        keep = "1 (θ=-inf)" if r["keep"] >= 1 else f"1/{round(1 / r['keep'])}"
        c = ceiling(r) if r["keep"] < 1 else None
        gbs = (
            "" if r["phase"] != "decode" else f"{decode_gbs(r, f'{DENSE}_ms'):.1f}, {decode_gbs(r, 'toptheta_ms'):.1f}"
        )
        out.append(
            f"| {r['shape']} | {r['phase']} | {r['context']} | {keep} | {r['kept_fraction']:.3f} | "
            f"{r[f'{DENSE}_ms']:.2f} | {r['mha_ms']:.2f} | {r['gqa_ms']:.2f} | {r['toptheta_ms']:.2f} | "
            f"**{ratio:.2f}x** | {'' if c is None else f'{c:.2f}x'} | {gbs} | "
            f"{r['load_before']:.1f}–{r['load_after']:.1f} |"
        )
    return "\n".join(out)


def stream_read_gbs() -> float:
    """This machine's single-thread streaming read now (numpy sum of 256 MB, best of 5): the decode yardstick."""
    import numpy as np

    a = np.ones(64 << 20, np.float32)
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def render(info, rows) -> str:
    head = "\n".join(f"* {k}: {v}" for k, v in info.items())
    return f"# CPU operator benchmark\n\n{head}\n\n{table(rows)}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output path without suffix (OUT.json, OUT.md)")
    ap.add_argument("--repeats", type=int, default=9, help="rounds per prefill configuration")
    ap.add_argument("--decode-repeats", type=int, default=41, help="rounds per decode configuration (calls are short)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys of SHAPES")
    ap.add_argument("--phases", default="prefill,decode")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        saved = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(render(saved["machine"], saved["rows"]))
        return
    info = machine()
    info["stream_read_gbs_1_thread"] = round(stream_read_gbs(), 1)
    rows = []
    for name in args.shapes.split(","):
        hq, hkv, d = SHAPES[name]
        for phase in args.phases.split(","):
            for T in PHASES[phase]:
                before = load()
                got = run_suite(
                    heads=hq,
                    kv_heads=hkv,
                    head_dim=d,
                    phase=phase,
                    seqs=[T],
                    keeps=KEEPS,
                    repeats=args.repeats if phase == "prefill" else args.decode_repeats,
                    methods=METHODS,
                )
                after = load()
                for r in got:
                    r.update(shape=name, load_before=before, load_after=after)
                    rows.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(info, rows))


if __name__ == "__main__":
    main()
