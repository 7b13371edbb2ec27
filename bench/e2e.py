"""End-to-end benchmark: Top-θ (shared KV buffer) vs the dense export vs GroupQueryAttention, same weights.

Two halves (topthetaexport.ort.e2e; docs/benchmarks.md, "End to end"):

    # here, on the CPU: random-weight models of the issue's shapes, exported, rewritten, written without weights
    python bench/e2e.py prepare --shape qwen2.5-1.5b --out .gpubuild/e2e-qwen2.5-1.5b
    python bench/e2e.py prepare --shape smollm2-135m --out .gpubuild/e2e-smollm2-135m
    # a pipeline output folder (real weights, calibrated θ): the weights travel in DIR/weights.data
    python bench/e2e.py prepare --from out/smollm2-135m --out .gpubuild/e2e-smollm2-real
    # folders made unfused (--no-fuse, or before the fusions existed): fused in place, no export needed
    python bench/e2e.py fuse --graphs .gpubuild/e2e-qwen2.5-1.5b .gpubuild/e2e-smollm2-135m

    # on the GPU machine (bench/gpu_session.sh e2e): weights regenerated there, θ set, everything timed
    python bench/e2e.py run --graphs .gpubuild/e2e-smollm2-135m .gpubuild/e2e-qwen2.5-1.5b --out bench/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:  # the installed package (its custom-op library sits beside it)
    import topthetaexport  # noqa: F401
except ImportError:  # a source checkout: gpu_session.sh runs it so, with TOPTHETA_OPS_LIBRARY set
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topthetaexport._errors import TopThetaError  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: '{text}' is not a comma-separated list of integers: pass e.g. 2048,8192") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: '{text}' needs positive integers: pass e.g. 1,8,16")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="make the graphs (CPU); writes DIR/{*.onnx,manifest.json}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="qwen2.5-1.5b, smollm2-135m or tiny (random weights)")
    src.add_argument("--from", dest="source", help="a folder written by topθ-export (real weights and θ)")
    p.add_argument("--dense", help="with --from: the dense export to use as graph (b) (default: re-export)")
    p.add_argument("--dtype", default="float16", help="with --shape: float16 (default), float32 or bfloat16")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--exports", help="with --shape: keep (and reuse) the dense export and its rewrite in this folder")
    p.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="leave the four graphs unfused (default: onnx.fusions.FuseForOrt on all of them alike)",
    )
    f = sub.add_parser("fuse", help="fuse the graphs of folders 'prepare --shape' wrote unfused (CPU, seconds)")
    f.add_argument("--graphs", nargs="+", required=True, help="folders written by prepare (fused in place)")
    r = sub.add_parser("run", help="time the prepared graphs (GPU); writes OUT/e2e-<device>-<date>.{json,md}")
    r.add_argument("--graphs", nargs="+", required=True, help="folders written by prepare")
    r.add_argument("--out", required=True, help="results folder")
    r.add_argument("--contexts", default="2048,8192,16384,32768")
    r.add_argument("--batches", default="1,8,16")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--steps", type=int, default=8, help="timed decode steps per row")
    r.add_argument("--library", help="libtoptheta_ops.so (default: TOPTHETA_OPS_LIBRARY or the installed one)")
    r.add_argument("--work", help="where the weights are written (default: a folder in /dev/shm or /tmp)")
    r.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rows after this many seconds")
    r.add_argument("--max-dense-scores-gb", type=float, default=20.0, help="skip (b) prefills needing more")
    r.add_argument("--date", help="date in the output file names (default: today)")
    r.add_argument("--trace", action="store_true", help="keep one decode call's GPU timeline per row and graph")
    args = ap.parse_args(argv)
    from topthetaexport.ort import e2e

    try:
        if args.cmd == "prepare":
            if args.shape:
                e2e.prepare_shape(args.shape, args.out, dtype=args.dtype, exports_dir=args.exports, fuse=args.fuse)
            else:
                e2e.prepare_output(args.source, args.out, dense=args.dense, fuse=args.fuse)
            return 0
        if args.cmd == "fuse":
            for gdir in args.graphs:
                e2e.fuse_prepared(gdir)
            return 0
        res = e2e.run_e2e(
            args.graphs,
            args.out,
            contexts=_ints(args.contexts),
            batches=_ints(args.batches),
            device=args.device,
            decode_steps=args.steps,
            work_dir=args.work,
            library=args.library,
            budget_s=args.budget_s,
            max_dense_scores_gb=args.max_dense_scores_gb,
            date=args.date,
            trace=args.trace,
        )
        print(Path(res["paths"][-1]).read_text())
        return 0
    except TopThetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
