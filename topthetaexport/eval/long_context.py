"""Long-context accuracy of an exported Top-θ model through onnxruntime (``topθ-export eval OUT --context ...``).

For every context length C and every θ extrapolation ("fit": θ past the calibrated rows from the per-head
log fit, ``Thresholds.extended``; "last-row": the operator reuses the last calibrated row), the graph of
``OUT/model.onnx`` runs with those θ swapped in (``onnx.variants.write_variant``), and with every θ = -inf
(dense), on

* held-out windows of C tokens of long books (``--data``; default: the Austen novels that the calibration did
  not use), one window per book in turn, and of a second text (``--cross-data``, e.g. ``builtin:pydoc``):
  perplexity (next-token NLL, float64, every position), the operator's kept count per row (sparse layers,
  last 512 rows of the window: compare with k) and the V rows read per decode step (the last 16 rows of each
  window: decoding position t reads the V rows row t keeps in a prefill; mean over layers and query heads);
* a needle in a haystack: a sentence "The secret number of NAME is DDDD." inserted at relative depth d into C
  tokens of held-out book text, followed by the question; it passes when the model's greedy prediction of
  every answer token (teacher-forced, one forward) is right.

``long-context.json`` gets one object per (context, extrapolation, text); ``long-context-details.json`` every
number, the command and the machine.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .._errors import TopThetaError
from ..progress import Progress, emitter

__all__ = ["LONG_FILES", "evaluate_long_context", "needle_items"]

LONG_FILES = {"long-context.json", "long-context-details.json"}
DECODE_ROWS = 16
KEPT_ROWS = 512
BAND_ROWS = 256  # kept per row at m x the calibrated length: the mean over the BAND_ROWS rows before m·R
_NAMES = (
    "the blue door",
    "Captain Harville's sea chest",
    "the old vicarage",
    "Miss Bates's workbasket",
    "the north gallery",
    "the gardener's cottage",
    "the brass telescope",
    "the library at Kellynch",
)


def needle_items(tok, haystack: list[int], context: int, depths: list[float], trials: int, seed: int = 0):
    """(ids [context], answer positions, depth, fact) for each depth and trial; facts and haystack offsets are
    drawn from ``seed`` (the same items for every variant)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(trials):
        for d in depths:
            name = _NAMES[int(rng.integers(len(_NAMES)))]
            number = f"{int(rng.integers(1000, 10000))}"
            fact = tok(f" The secret number of {name} is {number}.", add_special_tokens=False)["input_ids"]
            question = tok(
                f"\n\nQuestion: What is the secret number of {name}?\nAnswer: The secret number of {name} is",
                add_special_tokens=False,
            )["input_ids"]
            answer = tok(f" {number}", add_special_tokens=False)["input_ids"]
            hay_len = context - len(fact) - len(question) - len(answer)
            if hay_len < 16 or len(haystack) < hay_len:
                raise TopThetaError(
                    f"the needle haystack needs {hay_len} tokens of held-out text at context {context} but has "
                    f"{len(haystack)}: use more text (--data) or a shorter --context"
                )
            start = int(rng.integers(0, len(haystack) - hay_len + 1))
            hay = haystack[start : start + hay_len]
            at = int(round(d * hay_len))
            ids = hay[:at] + fact + hay[at:] + question + answer
            positions = list(range(len(ids) - len(answer), len(ids)))
            items.append(
                {"ids": np.asarray([ids], np.int64), "answer_positions": positions, "depth": d, "fact": number}
            )
    return items


def _passes(logits: np.ndarray, ids: np.ndarray, positions: list[int]) -> bool:
    return all(int(np.argmax(logits[0, p - 1])) == int(ids[0, p]) for p in positions)


def _texts_of(spec: str) -> set[str]:
    """The texts a data spec reads: each part of a mixed spec, each novel of an austen: part."""
    from ..austen import PREFIX, parse_spec
    from ..data import mixed_sources

    parts = mixed_sources(spec) or [str(spec)]
    return {PREFIX + b for p in parts if p.startswith(PREFIX) for b in parse_spec(p)} | {
        p for p in parts if not p.startswith(PREFIX)
    }


def _check_cross_data(cross_data: str | None, calib_source: str | None) -> None:
    """The cross-domain rows must come from a text the calibration did not see."""
    if not cross_data or not calib_source:
        return
    if _texts_of(cross_data) & _texts_of(calib_source):
        raise TopThetaError(
            f"--cross-data {cross_data} is part of the calibration data ({calib_source}), so its rows would not be "
            "cross-domain: pass a text the calibration did not use"
        )


def _default_data(calib_source: str | None) -> str:
    from ..austen import BOOKS, PREFIX, parse_spec
    from ..data import mixed_sources

    parts = (mixed_sources(calib_source) or [str(calib_source)]) if calib_source else []
    novels = [p for p in parts if p.startswith(PREFIX)]
    if novels:
        used = [b for p in novels for b in parse_spec(p)]
        rest = [b for b in BOOKS if b not in used]
        if rest:
            return PREFIX + "+".join(rest)
    return PREFIX + "all"


def _book_windows(tok, spec: str, context: int, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` windows of ``context`` tokens: the first window of each text of ``spec`` in turn (austen: one per
    novel, then the second window of each, ...), or consecutive windows of another text."""
    from ..austen import PREFIX, parse_spec
    from ..data import mixed_sources, token_batches

    if mixed_sources(spec) or not str(spec).startswith(PREFIX):  # a mixed text: its windows in turn
        w = token_batches(tok, spec, seq_len=context, num_samples=n).numpy()
        return w, [str(spec)] * w.shape[0]
    books = parse_spec(spec)
    out, names = [], []
    for i in range(n):
        book = books[i % len(books)]
        skip = i // len(books)
        try:
            w = token_batches(tok, PREFIX + book, seq_len=context, num_samples=1, skip=skip).numpy()
        except TopThetaError:
            continue  # a novel shorter than skip + 1 windows
        out.append(w)
        names.append(PREFIX + book)
    if not out:
        raise TopThetaError(f"{spec} gives no window of {context} tokens: use a shorter --context")
    return np.concatenate(out), names


def _haystack(tok, spec: str, skip_books: set[str]) -> list[int]:
    """Token stream of the needle haystack: the last book of ``spec`` not used for perplexity windows."""
    from ..austen import PREFIX, parse_spec
    from ..data import load_texts, mixed_sources

    if str(spec).startswith(PREFIX) and not mixed_sources(spec):
        books = [b for b in parse_spec(spec) if PREFIX + b not in skip_books] or parse_spec(spec)
        texts = load_texts(PREFIX + books[-1])
    else:
        texts = load_texts(spec)
    return tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def evaluate_long_context(
    out_dir,
    *,
    contexts: list[int],
    data: str | None = None,
    cross_data: str | None = None,
    windows: int = 2,
    extrapolations: tuple[str, ...] = ("fit", "last-row"),
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9),
    needle_trials: int = 1,
    needle: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    output=None,
    command: str | None = None,
    checkpoint=None,
    needle_variants: tuple[str, ...] | None = None,
    needle_contexts: tuple[int, ...] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure ``out_dir/model.onnx`` at each context of ``contexts`` (see the module doc). ``checkpoint``: a
    JSON file rewritten (atomically) after every stage with what is measured so far. ``needle_variants``: the
    variants ("dense", "toptheta/fit", "toptheta/last-row") that run the needle task (default: all).
    ``needle_contexts``: the contexts of ``contexts`` that run it (default: all; every needle is a forward of
    that length, while the perplexity of a shorter context is free, read from the longest window's prefix)."""
    from .._io import write_json
    from ..models import load_model
    from ..onnx.variants import write_variant
    from ..ort.sessions import OnnxModel
    from ..thresholds import EXTRAPOLATIONS, Thresholds

    t_start = time.perf_counter()
    step = emitter(progress, "eval")
    out_dir = Path(out_dir)
    model_path = out_dir / "model.onnx"
    if not model_path.is_file():
        raise TopThetaError(f"{out_dir} holds no model.onnx: pass a folder written by 'topθ-export MODEL -o OUT'")
    bad = [e for e in extrapolations if e not in EXTRAPOLATIONS]
    if bad or not extrapolations:
        raise TopThetaError(f"unknown θ extrapolation {bad}: use fit, last-row or both (fit,last-row)")
    if not contexts or min(contexts) < 2 or windows < 1 or needle_trials < 1:
        raise TopThetaError("need contexts >= 2 tokens, windows >= 1 and needle trials >= 1")
    if needle_contexts is not None and not set(needle_contexts) <= set(contexts):
        extra = sorted(set(needle_contexts) - set(contexts))
        raise TopThetaError(f"needle contexts {extra} are not among --context {list(contexts)}: pick from those")
    if any(not 0.0 <= d <= 1.0 for d in needle_depths):
        raise TopThetaError(f"needle depths must lie in [0, 1], got {list(needle_depths)}: e.g. 0.1,0.5,0.9")
    th = Thresholds.load(out_dir)
    meta = th.meta
    calib_rows = int(meta.get("calibrated_rows") or meta.get("seq_len") or th.num_rows)
    base = Thresholds(th.theta[:, :, :calib_rows], th.sdc[:, :, :calib_rows], dict(meta))
    _check_cross_data(cross_data, meta.get("calib_source"))
    step(f"loading {meta.get('model_path') or meta.get('model')}", 0.0)
    loaded = load_model(meta.get("model_path") or meta.get("model"))
    if not (loaded.is_lm and loaded.causal):
        raise TopThetaError("eval --context measures decoder LMs (perplexity, needle): this model is an encoder")
    if loaded.max_positions and max(contexts) > loaded.max_positions:
        raise TopThetaError(
            f"--context {max(contexts)} exceeds {loaded.name}'s {loaded.max_positions} positions: use at most that"
        )
    tok = loaded.tokenizer
    data = data or _default_data(meta.get("calib_source"))
    dense_layers = th.dense_layers
    sparse = [i for i in range(th.num_layers) if i not in set(dense_layers)]
    rows_needed = max(max(contexts), calib_rows)
    tables = {e: base.extended(rows_needed, e) for e in extrapolations}

    step("tokenizing held-out text", 0.01)
    c_max = max(contexts)
    texts: dict[str, Any] = {"in_domain": _book_windows(tok, data, c_max, windows)}
    if cross_data:
        texts["cross_domain"] = _book_windows(tok, cross_data, c_max, windows)
    used = set(texts["in_domain"][1])
    hay = _haystack(tok, data, used) if needle else []
    needle_at = sorted(contexts if needle_contexts is None else needle_contexts) if needle else []
    needles = {c: needle_items(tok, hay, c, list(needle_depths), needle_trials) for c in needle_at}

    variants = [("dense", None)] + [(f"toptheta/{e}", e) for e in extrapolations]
    model_name = loaded.name
    del loaded  # the PyTorch weights are not needed past here: free their RAM
    gc.collect()
    # Every variant's session holds the weights: open them all (fast switching) only where that fits in a third of
    # the RAM, else one at a time, in an order that reuses the open one across stages (Qwen2.5-1.5B in float32:
    # 6 GB per session and 5 GB of 8k-token logits, on a 24 GB machine).
    one_at_a_time = len(variants) * _weights_bytes(model_path) > _ram_bytes() / 3
    sessions: dict[str, Any] = {}

    def session(name: str) -> Any:
        if name in sessions:
            return sessions[name]
        if one_at_a_time:
            sessions.clear()
            gc.collect()
        ext = dict(variants)[name]
        step(f"{name}: opening session", 0.02)
        path = (
            write_variant(model_path, kind="dense")
            if ext is None
            else write_variant(model_path, kind="toptheta", thresholds=tables[ext])
        )
        try:
            sessions[name] = OnnxModel(path, device=device, threads=threads)
        finally:
            path.unlink(missing_ok=True)
        return sessions[name]

    measured: dict[str, dict[int, dict[str, Any]]] = {name: {c: {} for c in contexts} for name, _ in variants}
    bands = [m for m in (1, 2, 4, 8, 16, 32, 64) if m * calib_rows <= max(contexts)]
    # the most telling measurements first: in-domain text, the other text, then needles by context
    stages: list[tuple[str, int]] = [(dom, 0) for dom in texts]
    stages += [("needle", c) for c in needle_at]
    n_steps, done = len(stages) * len(variants), 0
    for stage, (what, c_needle) in enumerate(stages):
        for name, _ in variants if stage % 2 == 0 else variants[::-1]:  # the last session is the next first
            if what == "needle" and needle_variants is not None and name not in needle_variants:
                continue
            om = session(name)
            step(f"{name}: {what}{f' at {c_needle}' if c_needle else ''}", 0.03 + 0.95 * done / n_steps)
            t0 = time.perf_counter()
            if what == "needle":
                passed = []
                for it in needles[c_needle]:
                    r = om.run(it["ids"])
                    passed.append({"depth": it["depth"], "pass": _passes(r.output, it["ids"], it["answer_positions"])})
                    del r
                measured[name][c_needle]["needle"] = passed
                measured[name][c_needle]["needle_seconds"] = time.perf_counter() - t0
            else:
                _windows_at_every_context(
                    om,
                    texts[what],
                    contexts,
                    calib_rows,
                    bands,
                    sparse,
                    dense_layers,
                    th.num_layers,
                    measured[name],
                    what,
                )
            done += 1
            if checkpoint is not None:
                write_json(checkpoint, {"done": f"{what} {name}", "measured": _jsonable(measured)})
    sessions.clear()

    rows = _rows(SimpleNamespace(name=model_name), th, calib_rows, contexts, extrapolations, measured, needle)
    for r in rows:
        r["device"] = device
    report = {
        "toptheta_export_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "device": device},
        "threads": threads,
        "model": model_name,
        "calibration": {
            k: meta.get(k) for k in ("calib_source", "k", "seq_len", "num_samples", "dense_layers", "aggregation")
        },
        "data": data,
        "cross_data": cross_data,
        "needle_depths": list(needle_depths),
        "needle_trials": needle_trials,
        "results": rows,
        "measured": _jsonable(measured),
        "band_rows": BAND_ROWS,
        "total_s": time.perf_counter() - t_start,
    }
    if output is not None:
        _write(Path(output), report)
    step("done", 1.0)
    return report


def _windows_at_every_context(om, windows, contexts, calib_rows, bands, sparse, dense_layers, layers, out, dom):
    """One forward per window at the longest context; every shorter context is measured on its prefix (causal
    attention: positions < C see the same keys and the same θ rows whatever follows them)."""
    from .measure import KeptElements, valid_counts

    win, names = windows
    t0 = time.perf_counter()
    acc = {c: {"nll": 0.0, "tokens": 0, "counts": KeptElements(layers), "last": []} for c in contexts}
    band_sums = {m: 0.0 for m in bands}
    for w in range(win.shape[0]):
        ids = win[w : w + 1]
        r = om.run(ids)
        for c in contexts:
            a = acc[c]
            s_, n_ = _nll(r.output[:, :c], ids[:, :c])
            a["nll"] += s_
            a["tokens"] += n_
            a["counts"].add({i: k[..., :c] for i, k in r.kept.items()}, valid_counts(c, True), DECODE_ROWS)
            if sparse:
                a["last"].append(float(np.mean([r.kept[i][..., max(0, c - KEPT_ROWS) : c].mean() for i in sparse])))
        if sparse:
            per_row = np.mean([r.kept[i].astype(np.float64).mean((0, 1)) for i in sparse], 0)
            for m in bands:
                band_sums[m] += float(per_row[max(0, m * calib_rows - BAND_ROWS) : m * calib_rows].mean())
        del r
    for c in contexts:
        a = acc[c]
        summ = a["counts"].summary(dense_layers)
        out[c][dom] = {
            "data": sorted(set(names)),
            "windows": int(win.shape[0]),
            "perplexity": float(np.exp(a["nll"] / max(a["tokens"], 1))),
            "tokens": a["tokens"],
            "kept_per_row_sparse_last_rows": float(np.mean(a["last"])) if a["last"] else None,
            "kept_per_row_all_rows": summ["kept_per_row"],
            "decode": summ.get("decode"),
            "seconds_all_contexts": time.perf_counter() - t0,
        }
    out[max(contexts)][dom]["kept_per_row_sparse_by_band"] = {f"{m}x": band_sums[m] / win.shape[0] for m in bands}


def _nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 512) -> tuple[float, int]:
    """``measure.nll`` in chunks of positions: an 8k window's float64 logits would be 3 GB at once."""
    from .measure import nll

    total, count = 0.0, 0
    for p0 in range(0, ids.shape[1] - 1, chunk):
        p1 = min(ids.shape[1], p0 + chunk + 1)  # one position of overlap: the last logits predict p1 - 1
        s_, n_ = nll(logits[:, p0:p1], ids[:, p0:p1])
        total, count = total + s_, count + n_
    return total, count


def _jsonable(measured):
    return {v: {str(c): m for c, m in by_c.items()} for v, by_c in measured.items()}


def _version() -> str:
    from .. import __version__

    return __version__


def _pass_rate(items: list[dict] | None) -> float | None:
    return None if not items else sum(i["pass"] for i in items) / len(items)


def _weights_bytes(model_path: Path) -> int:
    """Bytes of the graph and its external data file(s) next to it."""
    files = [model_path, *model_path.parent.glob(model_path.name + ".data*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40  # unknown: assume plenty


def _rows(loaded, th, calib_rows, contexts, extrapolations, measured, needle) -> list[dict[str, Any]]:
    rows = []
    dense = measured["dense"]
    for c in contexts:
        for e in extrapolations:
            top = measured[f"toptheta/{e}"][c]
            for dom in ("in_domain", "cross_domain"):
                if dom not in top:
                    continue
                d, t = dense[c][dom], top[dom]
                dec = t["decode"] or {}
                rows.append(
                    {
                        "model": loaded.name,
                        "context": c,
                        "calib_len": calib_rows,
                        "calib_source": th.meta.get("calib_source"),
                        "k": th.meta.get("k"),
                        "ppl_dense": d["perplexity"],
                        "ppl_toptheta": t["perplexity"],
                        "kept_per_row": t["kept_per_row_sparse_last_rows"],
                        "v_rows_reduction": dec.get("v_rows_reduction"),
                        "needle_dense": _pass_rate(dense[c].get("needle")) if dom == "in_domain" else None,
                        "needle_toptheta": _pass_rate(top.get("needle")) if dom == "in_domain" else None,
                        "theta_extrapolation": e,
                        "domain": dom,
                        "data": ",".join(t["data"]),
                        "windows": t["windows"],
                        "ppl_relative_change": t["perplexity"] / d["perplexity"] - 1.0,
                        "v_rows_per_step_dense": dec.get("v_rows_dense_per_token"),
                        "v_rows_per_step_toptheta": dec.get("v_rows_kept_per_token"),
                        "needle_items": len(top.get("needle") or []) if dom == "in_domain" and needle else 0,
                        "kept_per_row_by_band": t.get("kept_per_row_sparse_by_band"),
                        "k_growth": th.meta.get("k_growth"),
                        "dense_layers": len(th.dense_layers),
                        "layer_k": th.meta.get("layer_k") or {},
                        "dense_heads": th.meta.get("dense_heads") or {},
                    }
                )
    return rows


def _write(output: Path, report: dict) -> None:
    from .._io import staged_output_dir, write_json

    with staged_output_dir(output, LONG_FILES, "an eval --context output") as stage:
        write_json(stage / "long-context.json", report["results"])
        write_json(stage / "long-context-details.json", report)
