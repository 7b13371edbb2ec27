"""Cheap long-context sweep in PyTorch: which k schedule / dense layers bring the Top-θ perplexity loss down.

One process: calibrate θ for several k schedules at once on ``--calib`` windows of ``--calib-len`` tokens (one
dense forward per window; each sparse row's sorted top scores give the k(r)-th largest for every schedule), then
run held-out windows of ``--context`` tokens dense and with each setting's Top-θ (the operator's rule s >= θ,
comp 0, θ past the calibrated rows by the schedule-aware fit or the last row), chunked over query rows.
Perplexity at every length in ``--lengths`` is read from the prefix of the one forward (causal). Writes one
JSON with every row and the command; ``--checkpoint`` after each setting. ``--ablate NAME`` adds one setting per
layer with only that layer sparse (schedule NAME), to find which layers carry the loss; ``--device cuda`` runs
it all on a GPU (float32, larger chunks). Every row also gives each eval text's loss (``by_eval``);
``--rank-by``/``--pick-by worst`` rank and pick by the worst of them, and ``--monitor`` texts are measured in
every row but never rank or pick (the held-out check of a tuning across domains).

    nice -n 10 python bench/long_context_sweep.py --out docs/results/long-context-sweep.json
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

from topthetaexport.data import token_batches  # noqa: E402
from topthetaexport.models import load_model  # noqa: E402
from topthetaexport.thresholds import Thresholds, k_rows  # noqa: E402
from topthetaexport.torch.attention import attention_mode  # noqa: E402
from topthetaexport.torch.calibration import _Accumulator, _chunk_scores, _row_chunks  # noqa: E402
from topthetaexport.torch.reference import _expand_kv  # noqa: E402

BUDGET = 1 << 23  # score elements per chunk on the CPU; a GPU takes CUDA_BUDGET
CUDA_BUDGET = 1 << 28
DECODE_ROWS = 16
KEPT_ROWS = 512


def calibrate_many(model, windows, schedules: dict[str, tuple[int, str | None]], layers: int, heads: int):
    """θ [L, H, R] per schedule (mean over windows of the k(r)-th largest valid score; -inf where n <= k(r))."""
    rows = windows.shape[1]
    device = next(model.parameters()).device
    budget = CUDA_BUDGET if device.type == "cuda" else BUDGET
    r_all = torch.arange(rows)
    ks = {name: k_rows(r_all, k, growth).long().to(device) for name, (k, growth) in schedules.items()}
    kmax = int(max(int(v.max()) for v in ks.values()))
    accs = {name: _Accumulator(layers, heads, rows) for name in schedules}

    def fn(layer, q, k, v, mask, scale, causal):
        b, hq, sq, _ = q.shape
        out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float32, device=q.device)
        for r0, r1 in _row_chunks(b, hq, sq, k.shape[2], budget):
            s, valid, kend = _chunk_scores(q, k, mask, scale, causal, r0, r1)
            masked = s.masked_fill(~valid, float("-inf"))
            n_valid = valid.sum(-1)
            top = masked.topk(min(kmax, kend), dim=-1, sorted=True).values
            for name, kr in ks.items():
                kk = kr[r0:r1].clamp(max=top.shape[-1])
                kth = top.gather(-1, (kk - 1).view(1, 1, -1, 1).expand(b, hq, -1, 1))[..., 0]
                accs[name].add(layer, kth, n_valid > kr[r0:r1].view(1, 1, -1), r0)
            p = torch.softmax(masked, -1)
            out[:, :, r0:r1] = torch.matmul(p, _expand_kv(v[:, :, :kend], hq).float())
        return out.to(q.dtype)

    body = model.model
    with torch.no_grad(), attention_mode(model, "dense", attention_fn=fn):
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1].to(device)
            body(input_ids=ids, attention_mask=torch.ones_like(ids))
            print(f"  calib window {i + 1}/{windows.shape[0]}", flush=True)
    return {name: acc.mean(float("-inf")) for name, acc in accs.items()}


def run_window(model, ids, theta, dense_layers: set[int]):
    """(logits [S, V] float32, kept [L, H, S] int) with Top-θ by ``theta`` [L, H, >=S] (None: dense)."""
    layers = model.config.num_hidden_layers
    device = ids.device
    budget = CUDA_BUDGET if device.type == "cuda" else BUDGET
    kept = torch.zeros(layers, model.config.num_attention_heads, ids.shape[1], dtype=torch.int32, device=device)
    theta = None if theta is None else theta.to(device)

    def fn(layer, q, k, v, mask, scale, causal):
        b, hq, sq, _ = q.shape
        out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float32, device=q.device)
        sparse = theta is not None and layer not in dense_layers
        for r0, r1 in _row_chunks(b, hq, sq, k.shape[2], budget):
            s, valid, kend = _chunk_scores(q, k, mask, scale, causal, r0, r1)
            use = valid
            if sparse:
                th = theta[layer, :, r0:r1][None, :, :, None]
                use = valid & ~(s < th)
            kept[layer, :, r0:r1] = use.sum(-1)[0].int()
            p = torch.nan_to_num(torch.softmax(s.masked_fill(~use, float("-inf")), -1), nan=0.0)
            out[:, :, r0:r1] = torch.matmul(p, _expand_kv(v[:, :, :kend], hq).float())
        return out.to(q.dtype)

    with torch.no_grad(), attention_mode(model, "dense", attention_fn=fn):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits, kept.cpu()


def nll_prefix(logits, ids, lengths):
    lp = torch.log_softmax(logits.double(), -1)
    tok = lp[:-1].gather(-1, ids[0, 1:, None].to(lp.device))[:, 0].cpu()
    return {c: (float(-tok[: c - 1].sum()), c - 1) for c in lengths}


def parse_setting(setting: str, layers: int) -> dict:
    """NAME[/dN | /DA+B+..][/onlyL][/xNAME2@A+B..][/last][/all] -> the parts of one setting.

    dN: the first N layers dense (default 2); DA+B: exactly those layers dense; onlyL: every layer but L dense;
    xNAME2@A+B: layers A, B take schedule NAME2's θ (several x parts allowed); hL=A+B: heads A, B of layer L
    dense (θ = -inf); last: θ past the calibrated rows by the last row (else the fit); all: the fit over every
    row with more than k keys (fit_range "all").
    """
    name, *parts = setting.split("/")
    dense = set(range(2))
    overrides: dict[int, str] = {}
    dense_heads: dict[int, set[int]] = {}
    ext, fit_range = "fit", "half"
    for p in parts:
        if p == "last":
            ext = "last-row"
        elif p == "all":
            fit_range = "all"
        elif p.startswith("only"):
            dense = set(range(layers)) - {int(p[4:])}
        elif p.startswith("D"):
            dense = {int(x) for x in p[1:].split("+") if x}
        elif p.startswith("d"):
            dense = set(range(int(p[1:])))
        elif p.startswith("h"):
            layer, _, heads = p[1:].partition("=")
            dense_heads.setdefault(int(layer), set()).update(int(h) for h in heads.split("+") if h)
        elif p.startswith("x"):
            other, at = p[1:].split("@")
            overrides.update({int(x): other for x in at.split("+")})
        else:
            raise SystemExit(f"setting {setting!r}: unknown part {p!r} (see --settings)")
    return {
        "name": name,
        "dense": dense,
        "overrides": overrides,
        "dense_heads": dense_heads,
        "ext": ext,
        "fit_range": fit_range,
    }


def pipeline_args(setting: str, layers: int) -> str:
    """The pipeline's options for one constant-k setting (--k, --dense-layers, --layer-k, --dense-heads, θ past R)."""
    p = parse_setting(setting, layers)
    k, growth = schedule(p["name"])
    n_dense = len(p["dense"])
    if growth or p["dense"] != set(range(n_dense)) or p["fit_range"] != "half":
        raise SystemExit(f"setting {setting!r} has no pipeline form (k growth, dense layers not first, fit range)")
    by_k: dict[int, list[int]] = {}
    for layer, other in p["overrides"].items():
        by_k.setdefault(schedule(other)[0], []).append(layer)
    out = [f"--k {k}", f"--dense-layers {n_dense}", f"--theta-extrapolation {p['ext']}"]
    if by_k:
        out.append("--layer-k " + ",".join(f"{'+'.join(map(str, sorted(ls)))}={kk}" for kk, ls in sorted(by_k.items())))
    if p["dense_heads"]:
        out.append(
            "--dense-heads " + ",".join(f"{i}:{'+'.join(map(str, sorted(h)))}" for i, h in p["dense_heads"].items())
        )
    return " ".join(out)


def eval_window(tok, spec: str, context: int) -> torch.Tensor:
    """One window [1, context] of ``spec``; ``SPEC@N`` skips N windows (a later window of the same text)."""
    text, at, skip = spec.rpartition("@")
    if not (at and skip.isdigit()):
        text, skip = spec, "0"
    return token_batches(tok, text, seq_len=context, num_samples=1, skip=int(skip))


def loss_of(row: dict, by: str, monitored: list[str] | None = None) -> float:
    """A row's perplexity loss in %: over all eval windows ("pooled"), its worst eval text ("worst", the
    ``monitored`` texts left out), or one eval text by its spec."""
    if by == "pooled":
        return row["delta_pct"]
    by_eval = row.get("by_eval") or {}
    if by == "worst":
        tuned = [e["delta_pct"] for spec, e in by_eval.items() if spec not in (monitored or [])]
        return max(tuned, default=row["delta_pct"])
    if by not in by_eval:
        raise SystemExit(f"--rank-by/--pick-by {by!r} is not an eval text of this sweep: use one of {sorted(by_eval)}")
    return by_eval[by]["delta_pct"]


def pick(report: dict, max_delta: float, by: str = "pooled") -> dict:
    """The row at the longest context with the largest V-row reduction among those losing <= max_delta %
    (``by``: see ``loss_of``; the sweep's monitored texts never decide)."""
    c = max(r["context"] for r in report["rows"])
    mon = report.get("monitor") or []
    if by in mon:
        raise SystemExit(f"--pick-by {by}: a monitored text does not pick; use worst, pooled or a tuning text")
    rows = [
        r
        for r in report["rows"]
        if r["context"] == c and loss_of(r, by, mon) <= max_delta and "/only" not in r["setting"]
    ]
    if not rows:
        raise SystemExit(f"no setting loses <= {max_delta}% ({by}) at {c}")
    return max(rows, key=lambda r: (r["v_rows_reduction"], -loss_of(r, by, mon)))


def schedule(name: str) -> tuple[int, str | None]:
    """SCHEDULES[name], or (N, None) for any kN."""
    if name in SCHEDULES:
        return SCHEDULES[name]
    if name.startswith("k") and name[1:].isdigit():
        return int(name[1:]), None
    raise SystemExit(f"unknown schedule {name!r}: use kN or one of {', '.join(SCHEDULES)}")


def kept_stats(kept, c, sparse: list[int]):
    """kept/row (sparse layers, last KEPT_ROWS rows before c) and V rows per decode step (last DECODE_ROWS
    rows before c, all layers, per query head; dense reads r + 1)."""
    last = kept[sparse][:, :, max(0, c - KEPT_ROWS) : c].double().mean()
    dec = kept[:, :, c - DECODE_ROWS : c].double().mean()
    dense_rows = torch.arange(c - DECODE_ROWS, c).double().add(1).mean()
    return float(last), float(dec), float(dense_rows)


def write_out_dir(theta_file: str, setting: str, template: str, to: str, calib_meta: dict) -> None:
    """An OUT folder for ``eval --context``: the graph and files of ``template`` (linked) with the θ of
    ``setting`` (NAME[/dN]) from ``theta_file`` (ρ = 0: the graph runs comp 0, which does not read it)."""
    thetas = torch.load(theta_file)
    parsed = parse_setting(setting, next(iter(thetas.values())).shape[0])
    if parsed["overrides"]:
        raise SystemExit("--write-out: per-layer schedules (x parts) have no θ fit in the package's thresholds")
    k, growth = schedule(parsed["name"])
    theta = thetas[parsed["name"]].clone()
    dense = sorted(parsed["dense"])
    theta[dense] = float("-inf")
    meta = json.loads((Path(template) / "thresholds.json").read_text())
    meta.update(calib_meta, k=k, k_growth=growth, dense_layers=dense, seq_len=theta.shape[-1])
    meta["calibrated_by"] = "bench/long_context_sweep.py (θ only, ρ = 0)"
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    out = Path(to)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(template).iterdir():
        if f.name not in ("thresholds.json", "thresholds.safetensors", "report.json") and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    Thresholds(theta, torch.zeros_like(theta), meta).save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="austen:emma", help="calibration text (A,B: windows in turn from each)")
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument(
        "--eval",
        default="austen:persuasion,austen:sensesensibility",
        help="eval texts, a comma list (one window of --context each, SPEC@N: window N; rows give each text's loss "
        "in by_eval)",
    )
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument(
        "--settings",
        default="k64,k128,k256,frac32,frac16,sqrt",
        help="comma list of NAME[/dN][/last]: schedule NAME (see SCHEDULES), N dense first layers (default 2), "
        "θ past the calibrated rows by the last row instead of the fit",
    )
    ap.add_argument("--ablate", help="also one setting NAME/onlyL per layer L (only that layer sparse)")
    ap.add_argument(
        "--allocate",
        action="append",
        default=[],
        metavar="BASE:OVR:M1+M2",
        help="after --ablate: setting BASE with its M most sensitive sparse layers (largest ablation loss at the "
        "longest length) given schedule OVR, or made dense (OVR 'dense'), for each M",
    )
    ap.add_argument(
        "--ablate-heads",
        metavar="BASE:L",
        help="also one setting per head h of layer L: BASE with only head h of layer L sparse (its other heads "
        "dense); then --allocate-heads",
    )
    ap.add_argument(
        "--allocate-heads",
        action="append",
        default=[],
        metavar="BASE:L:M1+M2",
        help="after --ablate-heads: BASE with the M most sensitive heads of layer L dense, for each M",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--pick", action="store_true", help="read the sweep --out and print its best setting's pipeline options"
    )
    ap.add_argument("--max-delta", type=float, default=0.6, help="--pick: the largest perplexity loss in %%")
    ap.add_argument(
        "--rank-by",
        default="pooled",
        help="loss that ranks layers/heads for --allocate(-heads): pooled (all eval windows), worst (the worst eval "
        "text), or one --eval spec",
    )
    ap.add_argument("--pick-by", default="pooled", help="--pick: the loss it bounds (as --rank-by)")
    ap.add_argument(
        "--monitor",
        help="eval texts (comma list, SPEC@N for window N) measured and reported in every row's by_eval but never "
        "used to rank or pick: the held-out check of a tuning",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--calibrate-only", action="store_true", help="stop after --save-theta (no evaluation)")
    ap.add_argument("--save-theta", help="also save the calibrated θ of every schedule (torch.save, name -> [L, H, R])")
    ap.add_argument(
        "--write-out",
        nargs=3,
        metavar=("THETA_FILE", "SETTING", "TEMPLATE_OUT"),
        help="instead of the sweep: write --out as an OUT folder (TEMPLATE_OUT's graph, SETTING's θ)",
    )
    args = ap.parse_args(argv)
    if args.pick:  # print the pipeline options of the best setting of a finished sweep (--out is that sweep)
        report = json.loads(Path(args.out).read_text())
        row = pick(report, args.max_delta, args.pick_by)
        print(pipeline_args(row["setting"], int(report.get("num_layers") or 0) or 64))
        loss = loss_of(row, args.pick_by, report.get("monitor"))
        print(
            f"picked {row['setting']}: {loss:+.2f}% ({args.pick_by}) at {row['v_rows_reduction']:.2f}x", file=sys.stderr
        )
        return 0
    if args.write_out:
        cal = {"calib_source": args.calib, "num_samples": args.calib_windows}
        write_out_dir(*args.write_out, args.out, cal)
        return 0
    tuning = [spec for spec in args.eval.split(",") if spec]
    if args.rank_by not in ("pooled", "worst", *tuning):
        raise SystemExit(f"--rank-by {args.rank_by!r}: use pooled, worst or one of the --eval texts {tuning}")
    if args.device == "cpu":
        torch.set_num_threads(2)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, tok = loaded.model.eval().to(args.device), loaded.tokenizer
    layers, heads = loaded.num_layers, loaded.num_heads
    settings = [s for s in args.settings.split(",") if s]
    if args.ablate:
        settings += [f"{args.ablate}/only{i}" for i in range(layers)]
    if args.ablate_heads:
        hbase, hl = args.ablate_heads.rsplit(":", 1)
        settings += [f"{hbase}/h{hl}={'+'.join(str(j) for j in range(heads) if j != h)}" for h in range(heads)]
    head_allocations = [a.rsplit(":", 2) for a in args.allocate_heads]
    allocations = [a.split(":") for a in args.allocate]
    if allocations and not args.ablate:
        raise SystemExit("--allocate ranks layers by the --ablate rows: pass --ablate too")
    parsed = {s: parse_setting(s, layers) for s in settings + [a[0] for a in allocations + head_allocations]}
    names = sorted(
        {p["name"] for p in parsed.values()}
        | {o for p in parsed.values() for o in p["overrides"].values()}
        | {a[1] for a in allocations if a[1] != "dense"}
    )
    schedules = {n: schedule(n) for n in names}
    calib = token_batches(tok, args.calib, seq_len=args.calib_len, num_samples=args.calib_windows)
    print(f"calibrating {names} on {calib.shape[0]} x {args.calib_len} of {args.calib}", flush=True)
    thetas = calibrate_many(model, calib, schedules, layers, heads)
    if args.save_theta:
        torch.save(thetas, args.save_theta)
    if args.calibrate_only:
        return 0
    t_cal = time.perf_counter() - t0
    lengths = [int(x) for x in args.lengths.split(",")]
    monitored = [spec for spec in (args.monitor or "").split(",") if spec]
    eval_specs = [spec for spec in args.eval.split(",") if spec] + monitored
    evals = [eval_window(tok, spec, args.context).to(args.device) for spec in eval_specs]
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "model": loaded.name,
        "calib": args.calib,
        "calib_len": args.calib_len,
        "calib_windows": calib.shape[0],
        "eval": args.eval,
        "monitor": monitored,
        "context": args.context,
        "num_layers": layers,
        "comp_mode": 0,
        "calibration_s": t_cal,
        "rows": [],
    }
    print("dense", flush=True)
    dense_nll = []
    with torch.no_grad():  # the model's own (SDPA) attention: the dense reference needs no kept counts
        for ids in evals:
            dense_nll.append(nll_prefix(model(input_ids=ids).logits[0], ids, lengths))

    def table_of(name: str, dense: list[int], ext: str, fit_range: str) -> torch.Tensor:
        k, growth = schedules[name]
        meta = {"k": k, "k_growth": growth, "dense_layers": dense, "seq_len": args.calib_len}
        th = thetas[name].clone()
        th[dense] = float("-inf")
        table = Thresholds(th, torch.zeros_like(th), meta).extended(args.context, ext, fit_range=fit_range).theta
        # "last-row" keeps the calibrated rows as they are; the operator repeats the last one past R
        return torch.cat([table, table[..., -1:].expand(-1, -1, args.context - table.shape[-1])], -1)

    def allocated() -> list[str]:
        """The --allocate settings, from the ablation rows at the longest length (most sensitive first)."""
        c = max(lengths)
        loss = {
            int(r["setting"].rsplit("only", 1)[1]): loss_of(r, args.rank_by, monitored)
            for r in report["rows"]
            if r["context"] == c and r["setting"].startswith(f"{args.ablate}/only")
        }
        report["layer_sensitivity"] = {
            "context": c,
            "rank_by": args.rank_by,
            "delta_pct": {str(i): v for i, v in sorted(loss.items())},
        }
        out = []
        for base, ovr, ms in allocations:
            bp = parse_setting(base, layers)
            ranked = [i for i in sorted(loss, key=lambda i: -loss[i]) if i not in bp["dense"]]
            for m in (int(x) for x in ms.split("+")):
                top = sorted(ranked[:m])
                if ovr == "dense":
                    setting = "/".join([base] + [f"D{'+'.join(str(i) for i in sorted(bp['dense'] | set(top)))}"])
                else:
                    setting = f"{base}/x{ovr}@{'+'.join(str(i) for i in top)}"
                parsed[setting] = parse_setting(setting, layers)
                out.append(setting)
        print("layers by ablation loss:", sorted(loss, key=lambda i: -loss[i]), flush=True)
        return out

    def heads_allocated() -> list[str]:
        """The --allocate-heads settings, from the --ablate-heads rows at the longest length."""
        c = max(lengths)
        hbase, hl = args.ablate_heads.rsplit(":", 1)
        loss = {}
        for h in range(heads):
            tag = f"{hbase}/h{hl}={'+'.join(str(j) for j in range(heads) if j != h)}"
            for r in report["rows"]:
                if r["context"] == c and r["setting"] == tag:
                    loss[h] = loss_of(r, args.rank_by, monitored)
        ranked = sorted(loss, key=lambda h: -loss[h])
        report["head_sensitivity"] = {"layer": int(hl), "context": c, "delta_pct": {str(h): loss[h] for h in ranked}}
        print(f"heads of layer {hl} by ablation loss:", ranked, flush=True)
        out = []
        for base, layer, ms in head_allocations:
            for m in (int(x) for x in ms.split("+")):
                setting = f"{base}/h{layer}={'+'.join(str(h) for h in sorted(ranked[:m]))}"
                parsed[setting] = parse_setting(setting, layers)
                out.append(setting)
        return out

    queue = list(settings)
    while queue:
        setting = queue.pop(0)
        p = parsed[setting]
        name, ext, dense = p["name"], p["ext"], sorted(p["dense"])
        k, growth = schedules[name]
        table = table_of(name, dense, ext, p["fit_range"])
        for layer, other in p["overrides"].items():
            table[layer] = table_of(other, dense, ext, p["fit_range"])[layer]
        for layer, dense_heads in p["dense_heads"].items():
            table[layer, sorted(dense_heads)] = float("-inf")
        t1 = time.perf_counter()
        sparse = [i for i in range(layers) if i not in p["dense"]]
        acc = {c: {"nll": 0.0, "n": 0, "nll_d": 0.0, "kept": [], "dec": [], "dec_d": []} for c in lengths}
        per_eval: dict[str, dict[int, dict]] = {spec: {} for spec in eval_specs}
        for spec, ids, dn in zip(eval_specs, evals, dense_nll):
            logits, kept = run_window(model, ids, table, p["dense"])
            tn = nll_prefix(logits, ids, lengths)
            for c in lengths:
                last, dec, dec_d = kept_stats(kept, c, sparse)
                if spec not in monitored:  # the pooled figures are the tuning texts'
                    a = acc[c]
                    a["nll"] += tn[c][0]
                    a["nll_d"] += dn[c][0]
                    a["n"] += tn[c][1]
                    a["kept"].append(last)
                    a["dec"].append(dec)
                    a["dec_d"].append(dec_d)
                per_eval[spec][c] = {
                    "ppl_dense": math.exp(dn[c][0] / dn[c][1]),
                    "ppl_toptheta": math.exp(tn[c][0] / tn[c][1]),
                    "delta_pct": 100 * (math.exp((tn[c][0] - dn[c][0]) / tn[c][1]) - 1),
                    "v_rows_reduction": dec_d / dec,
                }
        for c in lengths:
            a = acc[c]
            pd, pt = math.exp(a["nll_d"] / a["n"]), math.exp(a["nll"] / a["n"])
            by_eval = {spec: per_eval[spec][c] for spec in eval_specs}
            row = {
                "setting": setting,
                "k": k,
                "k_growth": growth,
                "k_at_context": int(k_rows(torch.tensor([c - 1]), k, growth)[0]),
                "dense_layers": len(dense),
                "dense_layer_list": dense,
                "layer_schedules": {str(i): o for i, o in sorted(p["overrides"].items())},
                "theta_extrapolation": ext,
                "fit_range": p["fit_range"],
                "context": c,
                "ppl_dense": pd,
                "ppl_toptheta": pt,
                "delta_pct": 100 * (pt / pd - 1),
                "kept_per_row": sum(a["kept"]) / len(a["kept"]),
                "v_rows_per_step_toptheta": sum(a["dec"]) / len(a["dec"]),
                "v_rows_per_step_dense": sum(a["dec_d"]) / len(a["dec_d"]),
                "v_rows_reduction": sum(a["dec_d"]) / sum(a["dec"]),
                "worst_delta_pct": loss_of({"delta_pct": 100 * (pt / pd - 1), "by_eval": by_eval}, "worst", monitored),
                "by_eval": by_eval,
                "seconds": time.perf_counter() - t1,
            }
            report["rows"].append(row)
            worst = f" worst {row['worst_delta_pct']:+6.2f}%" if len(eval_specs) > 1 else ""
            worst += "".join(f" {m} {by_eval[m]['delta_pct']:+6.2f}%" for m in monitored)
            print(
                f"{setting:24s} C={c:5d} ppl {pd:7.3f} -> {pt:7.3f} ({row['delta_pct']:+6.2f}%){worst} "
                f"kept/row {row['kept_per_row']:6.1f}  V rows {row['v_rows_reduction']:5.2f}x",
                flush=True,
            )
        Path(args.out).write_text(json.dumps(report, indent=1))
        if not queue and allocations:
            queue, allocations = allocated(), []
        if not queue and head_allocations:
            queue, head_allocations = heads_allocated(), []
    report["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


# name -> (k, growth): growth None (constant k) or "fraction:F" (k(r) = max(k, ceil(F (r+1))))
# or "power:A@R" (k(r) = max(k, round(k ((r+1)/R)^A))).
SCHEDULES = {
    "k64": (64, None),
    "k128": (128, None),
    "k256": (256, None),
    "k512": (512, None),
    "k384": (384, None),
    "k640": (640, None),
    "k768": (768, None),
    "frac64": (64, "fraction:0.015625"),
    "frac32": (64, "fraction:0.03125"),
    "frac16": (64, "fraction:0.0625"),
    "frac8": (64, "fraction:0.125"),
    "sqrt": (64, "power:0.5@512"),
    "k192": (192, None),
    "pow128": (128, "power:0.5@1024"),
}

if __name__ == "__main__":
    raise SystemExit(main())
