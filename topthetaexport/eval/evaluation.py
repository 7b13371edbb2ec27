"""Accuracy of an exported Top-θ model against dense and top-k attention, all through onnxruntime.

``evaluate(out_dir, ...)`` takes a folder written by the pipeline (model.onnx + thresholds) and runs one graph
in several *variants* (``topk_onnx.write_variant``; no re-export):

* ``dense``: every θ = -inf (dense attention through the same operator),
* ``topk@k``: exact per-row top-k attention in standard ONNX ops, same k and same dense layers,
* ``toptheta@k/comp{0,1,2}``: the calibrated θ (and ρ) with each compensation mode,

for the model's own k and for every k of a sweep (thresholds calibrated on the same text with the same
settings, swapped into the graph). Each variant is measured on

* held-out windows of the calibration text (perplexity for decoder LMs; for encoders the cosine of the
  mean-pooled embeddings with dense) and on windows of a second text (cross-domain),
* multiple-choice tasks (decoders: HellaSwag-style jsonl or the constructed cloze task of ``tasks.py``,
  length-normalised log-likelihood); retrieval of the second half of a passage from its first half
  (encoders),
* attention elements kept (the operator's ``kept`` output, or the top-k replacement's) per query row, and
  V rows read per decoded token: in causal attention with the KV cache, decoding the token at position t
  reads exactly the V rows that query row t keeps in a prefill (same θ row, same keys), so it is measured
  on the last ``decode_rows`` rows of each window (and checked once against a real KV-cache decode).

Writes ``eval.json``, ``sweep.csv``, ``sweep.md``, ``accuracy.png`` and the task files used (``tasks/``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import TopThetaError
from .._io import write_json
from ..progress import Progress, emitter

__all__ = ["evaluate", "Variant", "score_choices", "score_continuations", "task_rows", "EVAL_FILES"]

EVAL_FILES = {"eval.json", "sweep.csv", "sweep.md", "accuracy.png", "tasks", "tasks.json", "tasks.md"}
COMP_NAMES = {0: "none", 1: "sdc", 2: "sdc+vmc"}


class Variant:
    """``rho``: ``"calibrated"`` (ρ from calibration: SDC's offline-calibrated constant) or ``"one"`` (ρ = 1:
    ``n_pruned · exp(θ - m)`` uncorrected)."""

    def __init__(
        self, kind: str, k: int | None = None, comp_mode: int | None = None, thresholds=None, rho: str = "calibrated"
    ):
        self.kind, self.k, self.comp_mode, self.thresholds, self.rho = kind, k, comp_mode, thresholds, rho

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "topk":
            return f"topk@{self.k}"
        return f"toptheta@{self.k}/comp{self.comp_mode}" + ("/rho1" if self.rho == "one" else "")


def parse_comp_mode(spec) -> tuple[int, str]:
    """``0``, ``1``, ``2`` (ρ as calibrated) or ``1:rho1``, ``2:rho1`` (ρ = 1): (comp_mode, rho)."""
    text = str(spec).strip()
    mode, _, rho = text.partition(":")
    if mode not in ("0", "1", "2") or rho not in ("", "rho1") or (rho and mode == "0"):
        raise TopThetaError(
            f"compensation mode {text} does not exist: use 0, 1, 2, or 1:rho1 / 2:rho1 (SDC with rho = 1)"
        )
    return int(mode), "one" if rho else "calibrated"


def _with_unit_rho(th):
    import torch

    from ..thresholds import Thresholds

    return Thresholds(th.theta.clone(), torch.ones_like(th.sdc), dict(th.meta))


# -- scoring -------------------------------------------------------------------------------------------


def _token_scores(logits: np.ndarray, rows, targets, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """log p(``targets[i]``) under row ``rows[i]`` of ``logits`` ([..., V], rows counted over the flattened
    leading axes), and whether each target is its row's argmax (the first one, as numpy's).

    float64 in torch, on the session's device: numpy's exp runs on one core, and over gemma-3's 262k-token
    vocabulary it took most of a task item's time."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1])[np.asarray(rows, np.int64)]
    x = torch.from_numpy(np.ascontiguousarray(flat)).to(device).double()
    t = torch.as_tensor(np.asarray(targets, np.int64), device=x.device)
    lp = x.gather(1, t[:, None])[:, 0] - torch.logsumexp(x, 1)
    return lp.cpu().numpy(), (x.argmax(1) == t).cpu().numpy()


def score_choices(om, ctx_ids, endings: list[list[int]], pad_id: int = 0, prefix=None) -> np.ndarray:
    """Log-likelihood of each ending given the context, through onnxruntime with the KV cache.

    The context is prefilled once (or ``prefix = (logits of its last token [V], present cache)`` is given,
    e.g. sliced from a longer window's forward pass: with causal attention the cache of a prefix does not
    depend on what follows); the endings then run as one right-padded batch on copies of that cache
    (padding is masked out and, being after the real tokens, never visible to them).
    """
    return score_continuations(om, ctx_ids, endings, pad_id, prefix)[0]


def score_continuations(
    om, ctx_ids, endings: list[list[int]], pad_id: int = 0, prefix=None
) -> tuple[np.ndarray, np.ndarray]:
    """``score_choices``'s log-likelihoods and, per ending, whether every one of its tokens is the model's
    argmax (lm-eval's ``is_greedy``: LAMBADA's last-word accuracy)."""
    if prefix is None:
        pre = om.run(np.asarray([ctx_ids], np.int64))
        prefix = (pre.output[0, -1], pre.present)
    last, present = prefix
    device = getattr(om, "kv_device", "cpu")
    n, le, lc = len(endings), max(len(e) for e in endings), int(present[0].shape[2])
    scores, greedy = _token_scores(last[None], np.zeros(n, np.int64), [e[0] for e in endings], device)
    if le == 1:
        return scores, greedy
    ids = np.full((n, le), pad_id, np.int64)
    mask = np.zeros((n, lc + le), np.int64)
    mask[:, :lc] = 1
    for i, e in enumerate(endings):
        ids[i, : len(e)] = e
        mask[i, lc : lc + len(e)] = 1
    past = [np.repeat(p, n, axis=0) for p in present]
    res = om.run(ids, mask, past)
    # every later token of every ending at once: (row of the ending's batch output, the token it predicts)
    owner = np.array([i for i, e in enumerate(endings) for _ in e[1:]], np.int64)
    rows = [i * le + j for i, e in enumerate(endings) for j in range(len(e) - 1)]
    lp, hit = _token_scores(res.output, rows, [t for e in endings for t in e[1:]], device)
    scores = scores + np.bincount(owner, weights=lp, minlength=n)
    greedy = greedy & (np.bincount(owner, weights=~hit, minlength=n) == 0)
    return scores, greedy


def _accuracy(scores: list[np.ndarray], items: list[dict], greedy: list[np.ndarray] | None = None) -> dict[str, Any]:
    """acc and acc_norm as lm-eval defines them: the argmax of the log-likelihoods, and of the log-likelihoods
    divided by each ending's length in characters (the ending without ``target_delimiter``); items of metric
    ``greedy`` (LAMBADA) are right when their one ending is the greedy continuation (acc only)."""
    right, right_norm, n_choice = [], [], 0
    for i, (ll, it) in enumerate(zip(scores, items)):
        if it.get("metric") == "greedy":
            right.append(int(greedy is not None and bool(greedy[i][0])))
            continue
        right.append(int(int(np.argmax(ll)) == it["label"]))
        norm = ll / np.array([max(len(e), 1) for e in it["endings"]])
        right_norm.append(int(int(np.argmax(norm)) == it["label"]))
        n_choice += 1
    n = max(len(items), 1)
    out: dict[str, Any] = {"acc": sum(right) / n, "items": len(items), "correct": right}
    if n_choice:
        out["acc_norm"] = sum(right_norm) / n_choice
        out["correct_norm"] = right_norm
    return out


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(tid, int):
            return tid
    return 0


def harness_bos(loaded) -> list[int]:
    """The tokens put before every context: lm-eval's Hugging Face backend adds BOS for Gemma models only (they
    are unusable without it) and no special token otherwise."""
    tok = loaded.tokenizer
    if "gemma" in str(loaded.model_type) and isinstance(getattr(tok, "bos_token_id", None), int):
        return [tok.bos_token_id]
    return []


def _encode_pair(tok, ctx: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into tokens: trailing spaces of the context move to the continuation, whose
    tokens are those of context + continuation after the context's own."""
    spaces = len(ctx) - len(ctx.rstrip(" "))
    if spaces:
        ctx, continuation = ctx[:-spaces], ctx[-spaces:] + continuation
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx_ids) :] if whole[: len(ctx_ids)] == ctx_ids else []
    return ctx_ids, cont or tok(continuation, add_special_tokens=False)["input_ids"]


def _task_accuracy(om, items: list[dict], tok, max_len: int, bos: list[int] | None = None, kept=None):
    """Accuracy on text items (a jsonl or standard task): contexts tokenized and prefilled, cut to ``max_len``
    tokens. Items with ``target_delimiter`` (standard tasks) are tokenized as lm-eval does (``_encode_pair``,
    ``bos`` first); others (HellaSwag-style files, the cloze task) context and endings apart. ``kept``: a
    ``measure.KeptElements`` that adds the kept counts of every context's prefill."""
    from .measure import valid_counts

    pad = _pad_id(tok)
    scores, greedy = [], []
    for it in items:
        if "target_delimiter" in it:
            pairs = [_encode_pair(tok, it["ctx"], it["target_delimiter"] + e) for e in it["endings"]]
            ctx, ends = list(bos or []) + pairs[0][0], [p[1] for p in pairs]
        else:
            ends = [tok(e, add_special_tokens=False)["input_ids"] for e in it["endings"]]
            ctx = tok(it["ctx"], add_special_tokens=False)["input_ids"]
        ctx = ctx[-max(max_len - max(len(e) for e in ends), 1) :]
        pre = om.run(np.asarray([ctx], np.int64))
        if kept is not None:
            kept.add(pre.kept, valid_counts(len(ctx), True))
        ll, g = score_continuations(om, None, ends, pad, prefix=(pre.output[0, -1], pre.present))
        scores.append(ll)
        greedy.append(g)
    return _accuracy(scores, items, greedy)


def _embed(om, ids: np.ndarray, batch: int = 8) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Mean-pooled, L2-normalised embeddings of unpadded windows, and the kept counts."""
    outs: list[np.ndarray] = []
    kept: dict[int, list[np.ndarray]] = {}
    for s in range(0, ids.shape[0], batch):
        r = om.run(ids[s : s + batch])
        outs.append(r.output.mean(1))
        for layer, k in r.kept.items():
            kept.setdefault(layer, []).append(k)
    e = np.concatenate(outs).astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True), {layer: np.concatenate(v) for layer, v in kept.items()}


# -- the run ---------------------------------------------------------------------------------------------


def _open(model_path: Path, v: Variant, dense_layers, device: str, threads, max_length: int | None = None):
    from ..onnx.variants import write_variant
    from ..ort.sessions import OnnxModel

    path = write_variant(
        model_path, kind=v.kind, k=v.k, dense_layers=dense_layers, thresholds=v.thresholds, comp_mode=v.comp_mode
    )
    try:  # max_length: the buffers of a shared-form KV cache hold a whole window
        return OnnxModel(path, device=device, threads=threads, max_length=max_length)
    finally:
        path.unlink(missing_ok=True)


def _same_text(a, b) -> bool:
    return str(a) == str(b)


SHARED_CACHE_NO_TOPK = "skipped: the shared-buffer KV cache (rewrite with --kv-cache concat for it)"


def evaluate(
    out_dir,
    *,
    data=None,
    windows: int = 16,
    cross_data=None,
    cross_windows: int | None = None,
    seq_len: int | None = None,
    tasks: list[str] | None = None,
    task_items: int = 150,
    sweep: list[int] | None = None,
    comp_modes=(0, 1, 2),
    sweep_comp_modes=None,
    topk: bool | None = None,
    decode_rows: int = 16,
    decode_check: bool = True,
    builtin_cloze: bool = True,
    task_seed: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    output=None,
    command: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``out_dir/model.onnx`` (see the module doc); write the results into ``output`` if given.

    ``data``: in-domain text (default: the calibration text; windows after the calibration ones).
    ``cross_data``: a second text for the cross-domain check (all of it is held out). Built-in tasks, on
    the windows of both texts, up to ``task_items`` items each: the cloze task (decoders;
    ``builtin_cloze=False``: none) or passage retrieval (encoders). ``tasks``: further task specs
    (``tasks.parse_task_spec``; decoders): HellaSwag-style .jsonl files (their first ``task_items`` items),
    standard tasks and NAME=PATH files (a subsample of ``task_items`` items with ``task_seed``, scored in
    lm-eval's conventions, with their prompts' kept elements). ``sweep``: further k values (thresholds
    calibrated like the model's). ``topk``: the exact top-k baseline; None (the default) includes it unless the
    graph has the shared-buffer KV cache, which the replacement cannot hold (``topk_baseline`` in the result says
    which), True with such a graph is refused in one line. ``comp_modes``: the Top-θ compensation modes at the
    model's k (0, 1, 2, and 1:rho1, 2:rho1 for SDC with ρ = 1); ``sweep_comp_modes`` those at the other k (default:
    the same).
    """
    from ..data import token_batches
    from ..models import load_model
    from ..onnx.summary import graph_kv_cache
    from ..thresholds import Thresholds
    from ..torch.calibration import calibrate
    from .measure import KeptElements, Perplexity, decode_through_cache, layer_windows, v_rows_read, valid_counts
    from .tasks import TASK_SEED, build_window_cloze, load_standard_task, load_task, parse_task_spec

    t_start = time.perf_counter()
    step = emitter(progress, "eval")
    out_dir = Path(out_dir)
    model_path = out_dir / "model.onnx"
    if not model_path.is_file():
        raise TopThetaError(
            f"{out_dir} holds no model.onnx: pass a folder written by 'topθ-export MODEL --calib DATA -o OUT'"
        )
    specs = [parse_task_spec(t) for t in tasks or []]
    shared = graph_kv_cache(model_path) == "shared"
    # the top-k baseline replaces the operator, which owns a shared cache: by default it is left out there
    asked = topk is not None
    topk = (not shared) if topk is None else topk
    topk_baseline = "included" if topk else "skipped (--no-topk)" if asked else SHARED_CACHE_NO_TOPK
    if topk and shared:
        raise TopThetaError(
            f"{model_path} has the shared-buffer KV cache, and the top-k baseline replaces the operator, which "
            "holds that cache: pass --no-topk (topk=False), or evaluate the rewrite with --kv-cache concat"
        )
    th = Thresholds.load(out_dir)
    meta = th.meta
    comp_modes = [parse_comp_mode(m) for m in comp_modes]
    sweep_comp_modes = comp_modes if sweep_comp_modes is None else [parse_comp_mode(m) for m in sweep_comp_modes]
    if windows < 2 or task_items < 1:
        raise TopThetaError(f"need windows >= 2 and task_items >= 1 (got {windows}, {task_items})")
    k0 = int(meta.get("k") or 0)
    ks = sorted({int(k) for k in (sweep or [])} | ({k0} if k0 else set()))
    if any(k < 1 for k in ks):
        raise TopThetaError(f"sweep values must be positive k (got {sorted(ks)}): e.g. --sweep 16,32,64,128")
    calib_source = meta.get("calib_source")
    data = data or calib_source
    if not data or str(data).startswith(("token tensor", "list of")):
        raise TopThetaError("the calibration text of this model is not a file or builtin name: pass --data")
    step(f"loading {meta.get('model_path') or meta.get('model')}", 0.0)
    loaded = load_model(meta.get("model_path") or meta.get("model"))
    th.check_compatible(loaded)
    tok = loaded.tokenizer
    if tok is None:
        raise TopThetaError(f"model {loaded.name} has no tokenizer: evaluation needs a model folder with one")
    seq_len = int(seq_len or meta.get("seq_len") or 512)
    n_calib = int(meta.get("num_samples", 0))
    calib_len = int(meta.get("seq_len") or seq_len)
    # windows of seq_len to skip so that no calibration token is evaluated
    held_out = -(-n_calib * calib_len // seq_len) if _same_text(data, calib_source) else 0
    dense_layers = th.dense_layers
    if dense_layers != list(range(len(dense_layers))):
        raise TopThetaError(
            f"dense layers {dense_layers} are not the first layers: the sweep recalibrates with "
            "--dense-layers N, which keeps layers 0..N-1 dense"
        )
    is_lm, causal = loaded.is_lm, loaded.causal
    if not is_lm and causal:
        raise TopThetaError("evaluation supports decoder LMs and encoders")
    for spec in specs:
        if (spec.kind == "retrieval") == is_lm:
            raise TopThetaError(
                f"task {spec.kind}:{spec.source} needs {'an encoder' if is_lm else 'a decoder LM'}: "
                "use cloze:DATA or a .jsonl file for decoders, retrieval:DATA for encoders"
            )

    # texts and tasks -------------------------------------------------------------------------------------
    step("tokenizing held-out text", 0.01)
    domains = {
        "in_domain": (data, token_batches(tok, data, seq_len=seq_len, num_samples=windows, skip=held_out).numpy())
    }
    if cross_data:
        domains["cross_domain"] = (
            cross_data,
            token_batches(tok, cross_data, seq_len=seq_len, num_samples=cross_windows or windows).numpy(),
        )
    task_sets: list[tuple[str, str, Any, str, str | None]] = []  # (name, kind, payload, source, domain)
    skipped = {}
    for dom, (src, win) in domains.items():
        if is_lm and not builtin_cloze:
            continue
        if is_lm:
            try:
                items = build_window_cloze(win, tok, num_items=task_items, source=str(src))
            except TopThetaError as e:  # text without enough sentences: no cloze there, said in the report
                skipped[f"cloze:{dom}"] = str(e)
                warnings.warn(f"cloze task on {src} skipped: {e}", RuntimeWarning, stacklevel=2)
                continue
            task_sets.append((f"cloze:{dom}", "window_cloze", items, str(src), dom))
        else:
            skip_tokens = held_out * seq_len if dom == "in_domain" else 0
            pairs = _retrieval_pairs(tok, src, seq_len, task_items, skip_tokens)
            task_sets.append((f"retrieval:{dom}", "retrieval", pairs, str(src), dom))
    for spec in specs:
        if spec.kind == "choice":
            task_sets.append((Path(spec.source).name, "choice", load_task(spec.source)[:task_items], spec.source, None))
        elif spec.kind == "standard":
            items = load_standard_task(spec, task_items, TASK_SEED if task_seed is None else task_seed)
            task_sets.append((spec.name, "choice", items, spec.source or spec.name, None))
        elif spec.kind == "cloze":  # scored as text, like a jsonl task
            win = token_batches(tok, spec.source, seq_len=seq_len, num_samples=windows).numpy()
            items = build_window_cloze(win, tok, num_items=task_items, source=spec.source)
            task_sets.append((f"cloze:{spec.source}", "choice", items, spec.source, None))
        else:
            pairs = _retrieval_pairs(tok, spec.source, seq_len, task_items, 0)
            task_sets.append((f"retrieval:{spec.source}", "retrieval", pairs, spec.source, None))

    # variants ---------------------------------------------------------------------------------------
    thresholds_by_k = {}
    variants = [Variant("dense")]
    for i, k in enumerate(ks):
        if k == k0:
            thk = th
        else:
            step(f"calibrating θ for k={k}", 0.02 + 0.08 * i / max(len(ks), 1))
            thk = calibrate(
                loaded,
                calib_source,
                k=k,
                seq_len=calib_len,
                num_samples=n_calib or 16,
                dense_layers=len(dense_layers),
                # a k of the sweep keeps the graph's per-layer k in proportion and its dense heads
                layer_k=th.layer_k_at(k),
                dense_heads=meta.get("dense_heads") or None,
                progress=None,
            )
        thresholds_by_k[k] = thk
        if topk:
            variants.append(Variant("topk", k=k))
        for m, rho in comp_modes if k == k0 else sweep_comp_modes:
            th_v = thk if rho == "calibrated" else _with_unit_rho(thk)
            variants.append(Variant("toptheta", k=k, comp_mode=m, thresholds=th_v, rho=rho))

    results: list[dict[str, Any]] = []
    dense_emb: dict[str, np.ndarray] = {}
    decode_checked = None
    t_variants = time.perf_counter()
    main_comp = _model_comp_mode(model_path)
    pad = _pad_id(tok)
    bos = harness_bos(loaded)
    for vi, v in enumerate(variants):
        frac = 0.1 + 0.85 * vi / len(variants)
        step(f"{v.name}: opening session", frac)
        t0 = time.perf_counter()
        om = _open(model_path, v, dense_layers, device, threads, seq_len)
        r: dict[str, Any] = {
            "name": v.name,
            "kind": v.kind,
            "k": v.k,
            "comp_mode": v.comp_mode,
            "rho": v.rho if v.kind == "toptheta" else None,
            "tasks": {},
        }
        for dom, (_src, win) in domains.items():
            step(f"{v.name}: {dom} windows", frac)
            counts = KeptElements(th.num_layers, layer_windows(th.meta, th.num_layers))
            valid = valid_counts(win.shape[1], causal)
            if is_lm:
                name, _, items, _, _ = next((t for t in task_sets if t[4] == dom), (None, 0, [], 0, 0))
                by_window: dict[int, list[dict]] = {}
                for it in items:
                    by_window.setdefault(it["window"], []).append(it)
                ppl = Perplexity()
                scores = {}
                for w in range(win.shape[0]):
                    res = om.run(win[w : w + 1])
                    ppl.add(res.output, win[w : w + 1])
                    counts.add(res.kept, valid, decode_rows)
                    for it in by_window.get(w, []):
                        t = it["position"]
                        prefix = (res.output[0, t - 1], [p[:, :, :t] for p in res.present])
                        scores[id(it)] = score_choices(om, None, it["ending_ids"], pad, prefix=prefix)
                r[dom] = {"perplexity": ppl.value, "tokens": ppl.tokens, "attention": counts.summary(dense_layers)}
                if "decode" in r[dom]["attention"]:
                    v_rows_read(
                        r[dom]["attention"]["decode"], per="token", vmc=v.kind == "toptheta" and v.comp_mode == 2
                    )
                if name:
                    r["tasks"][name] = _accuracy([scores[id(it)] for it in items], items)
            else:
                emb, kept = _embed(om, win)
                counts.add(kept, valid)
                r[dom] = {"attention": counts.summary(dense_layers)}
                if v.kind == "dense":
                    dense_emb[dom] = emb
                cos = (emb * dense_emb[dom]).sum(1)
                r[dom]["embedding_cosine_vs_dense"] = {"mean": float(cos.mean()), "min": float(cos.min())}
                name, _, pairs, _, _ = next(t for t in task_sets if t[4] == dom)
                r["tasks"][name] = _retrieval_accuracy(om, pairs, dense_emb, name, v.kind == "dense")
        for name, kind, items, _src, _dom in task_sets:
            if kind == "choice":
                step(f"{v.name}: task {name}", frac)
                prompt_kept = KeptElements(th.num_layers, layer_windows(th.meta, th.num_layers))
                r["tasks"][name] = _task_accuracy(om, items, tok, seq_len, bos, prompt_kept)
                r["tasks"][name]["attention"] = prompt_kept.summary(dense_layers)
            elif kind == "retrieval" and _dom is None:
                r["tasks"][name] = _retrieval_accuracy(om, items, dense_emb, name, v.kind == "dense")
        if (
            decode_check
            and is_lm
            and om.has_cache
            and v.kind == "toptheta"
            and v.k == k0
            and v.comp_mode == main_comp
            and v.rho == "calibrated"
            and decode_checked is None
        ):
            step(f"{v.name}: KV-cache decode check", frac)
            win = domains["in_domain"][1]
            real = decode_through_cache(om, win[:1], decode_rows, dense_layers)
            est = KeptElements(th.num_layers, layer_windows(th.meta, th.num_layers))
            est.add(om.run(win[:1]).kept, valid_counts(win.shape[1], causal), decode_rows)
            decode_checked = {
                "variant": v.name,
                "window": 0,
                "kv_cache_decode": real,
                "from_prefill_rows": est.summary(dense_layers)["decode"],
            }
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        del om

    report = _assemble(
        loaded, th, out_dir, domains, seq_len, held_out, task_sets, results, ks, k0, decode_checked, device, command
    )
    report["tasks_skipped"] = skipped
    report["topk_baseline"] = topk_baseline
    report["timings"] = {"total_s": time.perf_counter() - t_start, "variants_s": time.perf_counter() - t_variants}
    if output is not None:
        step("writing results", 0.97)
        _write_outputs(Path(output), report, task_sets)
    step("done", 1.0)
    return report


def _model_comp_mode(model_path: Path) -> int:
    from .measure import read_op_attrs

    attrs = read_op_attrs(model_path)
    return int(next(iter(attrs.values())).get("comp_mode", 0))


# -- encoder retrieval ----------------------------------------------------------------------------------


def _retrieval_pairs(tok, source, seq_len: int, n: int, skip_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(first halves, second halves) of ``n`` consecutive passages, each half one ``[CLS] .. [SEP]`` window."""
    from ..data import token_batches

    half = seq_len - 2
    body = 2 * half
    skip = -(-skip_tokens // body)
    w = token_batches(tok, source, seq_len=body + 2, num_samples=n, skip=skip).numpy()
    body_ids = w[:, 1:-1]
    cls, sep = w[0, 0], w[0, -1]

    def wrap(x):
        return np.concatenate([np.full((x.shape[0], 1), cls), x, np.full((x.shape[0], 1), sep)], 1)

    if body_ids.shape[0] < 2:
        raise TopThetaError(f"retrieval on {source} needs at least 2 passages of {body} tokens: use more text")
    return wrap(body_ids[:, :half]), wrap(body_ids[:, half:])


def _retrieval_accuracy(om, pairs, dense_emb: dict, name: str, is_dense: bool) -> dict[str, Any]:
    a, _ = _embed(om, pairs[0])
    b, _ = _embed(om, pairs[1])
    sim = a @ b.T
    acc = float((sim.argmax(1) == np.arange(len(a))).mean())
    out: dict[str, Any] = {"acc": acc, "items": len(a)}
    key = "task:" + name
    if is_dense:
        dense_emb[key] = np.concatenate([a, b])
    elif key in dense_emb:
        cos = (np.concatenate([a, b]) * dense_emb[key]).sum(1)
        out["embedding_cosine_vs_dense"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    return out


# -- report ---------------------------------------------------------------------------------------------


def _assemble(
    loaded, th, out_dir, domains, seq_len, held_out, task_sets, results, ks, k0, decode_checked, device, command
) -> dict[str, Any]:
    import onnxruntime as ort

    from .. import __version__
    from ..data import describe_data

    dense = results[0]
    for r in results:
        for dom in ("in_domain", "cross_domain"):
            if dom in r and "perplexity" in r[dom]:
                r[dom]["perplexity_relative_change"] = r[dom]["perplexity"] / dense[dom]["perplexity"] - 1.0
        for name, t in r["tasks"].items():
            d = dense["tasks"][name]
            t["acc_delta_points"] = 100.0 * (t["acc"] - d["acc"])
            if "acc_norm" in t:
                t["acc_norm_delta_points"] = 100.0 * (t["acc_norm"] - d["acc_norm"])
            key = "correct_norm" if "correct_norm" in t else "correct"
            if key in t:
                t["ci95_points"] = _points(ci95(float(np.mean(t[key])), len(t[key])))
                t["ci95_delta_points"] = _points(paired_ci95(d[key], t[key]))
        if "cross_domain" in r and r["kind"] != "dense":
            a, b = r["in_domain"]["attention"], r["cross_domain"]["attention"]
            r["kept_drift"] = {
                "kept_per_row_in_domain": a["kept_per_row"],
                "kept_per_row_cross_domain": b["kept_per_row"],
                "relative": b["kept_fraction"] / max(a["kept_fraction"], 1e-12) - 1.0,
                "sparse_layers_relative": (
                    b["sparse_layers_kept_fraction"] / max(a["sparse_layers_kept_fraction"], 1e-12) - 1.0
                ),
                "per_layer_relative": [
                    (y / x - 1.0) if x > 0 else 0.0
                    for x, y in zip(a["per_layer_kept_fraction"], b["per_layer_kept_fraction"])
                ],
            }
            if "decode" in a and "decode" in b:
                r["kept_drift"]["v_rows_relative"] = (
                    b["decode"]["v_rows_kept_per_token"] / max(a["decode"]["v_rows_kept_per_token"], 1e-12) - 1.0
                )
    for r in results:  # the per-item answers served the intervals; eval.json keeps the summaries
        for t in r["tasks"].values():
            t.pop("correct", None)
            t.pop("correct_norm", None)
    return {
        "toptheta_export_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "onnxruntime": ort.__version__,
            "device": device,
        },
        "model": loaded.name,
        "model_type": loaded.model_type,
        "onnx": str(out_dir / "model.onnx"),
        "calibration": {k: th.meta.get(k) for k in ("calib_source", "k", "seq_len", "num_samples", "dense_layers")},
        "seq_len": seq_len,
        "in_domain": {
            "data": describe_data(domains["in_domain"][0]),
            "windows": int(domains["in_domain"][1].shape[0]),
            "held_out_skip_windows": held_out,
        },
        "cross_domain": (
            {"data": describe_data(domains["cross_domain"][0]), "windows": int(domains["cross_domain"][1].shape[0])}
            if "cross_domain" in domains
            else None
        ),
        "tasks": [
            {
                "name": n,
                "kind": k,
                "source": str(s),
                "domain": d,
                "items": (int(p[0].shape[0]) if k == "retrieval" else len(p)),
            }
            for n, k, p, s, d in task_sets
        ],
        "k_values": ks,
        "k_model": k0,
        "variants": results,
        "decode_check": decode_checked,
        "criterion": _criterion(results),
    }


def ci95(p: float, n: int) -> float | None:
    """Half-width of the 95% confidence interval of an accuracy ``p`` over ``n`` items: 1.96 × lm-eval's standard
    error of a mean of 0/1 answers, sqrt(p (1 - p) / (n - 1))."""
    return 1.96 * math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else None


def paired_ci95(a, b) -> float | None:
    """Half-width of the 95% confidence interval of mean(b) - mean(a) over the same items (0/1 answers): 1.96 ×
    the standard error of the per-item differences; far tighter than two independent intervals when the two
    models mostly agree."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    return 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else None


def _points(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def comp_label(comp_mode: int | None, rho: str | None) -> str:
    """none, sdc, sdc+vmc; sdc-rho1, sdc-rho1+vmc (ρ = 1 instead of the calibrated ρ)."""
    name = COMP_NAMES.get(comp_mode or 0, str(comp_mode))
    return name.replace("sdc", "sdc-rho1") if rho == "one" else name


def task_rows(report: dict) -> list[dict[str, Any]]:
    """One row per (Top-θ variant, text task other than the built-in cloze): the rows of docs/results/tasks.json.
    Accuracies and intervals in percentage points; ``acc_*`` the task's headline metric (``metric``);
    ``elements_kept_fraction``: attention elements kept over valid ones in the task's prompts, all layers."""
    from .tasks import STANDARD_TASKS

    dense = report["variants"][0]
    kinds = {t["name"]: t for t in report["tasks"]}
    rows = []
    for r in report["variants"]:
        if r["kind"] != "toptheta":
            continue
        for name, t in r["tasks"].items():
            if kinds.get(name, {}).get("kind") != "choice" or name.startswith("cloze:") or "attention" not in t:
                continue
            d = dense["tasks"][name]
            metric = STANDARD_TASKS[name].metric if name in STANDARD_TASKS else "acc_norm"
            metric = metric if metric in t else "acc"
            a = t["attention"]
            rows.append(
                {
                    "model": report["model"],
                    "task": name,
                    "n": t["items"],
                    "k": r["k"],
                    "comp": comp_label(r["comp_mode"], r.get("rho")),
                    "metric": metric,
                    "acc_dense": 100.0 * d[metric],
                    "acc_toptheta": 100.0 * t[metric],
                    "delta_points": 100.0 * (t[metric] - d[metric]),
                    "ci95": t.get("ci95_points"),
                    "ci95_delta": t.get("ci95_delta_points"),
                    "elements_kept_fraction": a["kept_fraction"],
                    "sparse_layers_kept_fraction": a["sparse_layers_kept_fraction"],
                    "keys_per_row": a["dense_per_row"],
                    "kept_per_row": a["kept_per_row"],
                    "variant": r["name"],
                }
            )
    return rows


def task_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``task_rows``."""
    cols = ["model", "task", "n", "k", "comp", "metric", "acc_dense", "acc_toptheta", "delta_points"]
    cols += ["ci95", "ci95_delta", "elements_kept_fraction"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) if r[c] is not None else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _criterion(results: list[dict]) -> dict[str, Any]:
    """The issue's bar: Top-θ within 1% relative perplexity and 1 point task accuracy of dense at >= 3x
    fewer V rows read per decoded token (decoders). ``meets``: on the held-out in-domain text and its tasks
    (the in-domain cloze and any --tasks jsonl); ``meets_incl_cross_domain``: also the cross-domain cloze
    (thresholds calibrated on another text: the cross-domain check, stricter than the bar)."""
    rows = []
    for r in results:
        if r["kind"] != "toptheta" or "perplexity" not in r.get("in_domain", {}):
            continue
        dec = r["in_domain"]["attention"].get("decode", {})
        ppl = r["in_domain"]["perplexity_relative_change"]
        delta = {name: t.get("acc_norm_delta_points", t["acc_delta_points"]) for name, t in r["tasks"].items()}
        worst_in = min((d for n, d in delta.items() if not n.endswith(":cross_domain")), default=0.0)
        worst = min(delta.values(), default=0.0)
        vr = dec.get("v_rows_read_reduction", dec.get("v_rows_reduction"))
        base = ppl <= 0.01 and (vr or 0) >= 3.0
        rows.append(
            {
                "variant": r["name"],
                "ppl_relative_change": float(ppl),
                "worst_in_domain_task_delta_points": float(worst_in),
                "worst_task_delta_points": float(worst),
                "v_rows_read_reduction": None if vr is None else float(vr),
                "meets": bool(base and worst_in >= -1.0),
                "meets_incl_cross_domain": bool(base and worst >= -1.0),
            }
        )
    return {
        "rule": "in-domain ppl +<=1% and in-domain task acc_norm >= -1 point vs dense at >= 3x fewer V rows "
        "read per decoded token (comp_mode 2 reads them all for the V mean); "
        "meets_incl_cross_domain: every task, cross-domain included",
        "variants": rows,
        "met_by": [r["variant"] for r in rows if r["meets"]],
        "met_incl_cross_domain_by": [r["variant"] for r in rows if r["meets_incl_cross_domain"]],
    }


def _table_rows(report: dict) -> list[dict[str, Any]]:
    rows = []
    for r in report["variants"]:
        a = r["in_domain"]["attention"]
        row = {
            "variant": r["name"],
            "kind": r["kind"],
            "k": r["k"] if r["k"] is not None else "",
            "comp_mode": r["comp_mode"] if r["comp_mode"] is not None else "",
        }
        if "perplexity" in r["in_domain"]:
            row["ppl"] = r["in_domain"]["perplexity"]
            row["ppl_rel_%"] = 100 * r["in_domain"]["perplexity_relative_change"]
        else:
            row["cos_vs_dense"] = r["in_domain"]["embedding_cosine_vs_dense"]["mean"]
        for name, t in r["tasks"].items():
            row[f"{name} acc"] = 100 * t.get("acc_norm", t["acc"])
        row["elements/row"] = a["kept_per_row"]
        row["elements_reduction"] = a["reduction"]
        if "decode" in a:
            d = a["decode"]
            row["v_rows_kept/token"] = d["v_rows_kept_per_token"]
            row["v_rows_read/token"] = d.get("v_rows_read_per_token", d["v_rows_kept_per_token"])
            row["v_rows_read_reduction"] = d.get("v_rows_read_reduction", d["v_rows_reduction"])
        cd = r.get("cross_domain")
        if cd:
            if "perplexity" in cd:
                row["cross_ppl"] = cd["perplexity"]
                row["cross_ppl_rel_%"] = 100 * cd["perplexity_relative_change"]
            else:
                row["cross_cos_vs_dense"] = cd["embedding_cosine_vs_dense"]["mean"]
            row["cross_elements/row"] = cd["attention"]["kept_per_row"]
            if "kept_drift" in r:
                row["kept_drift_%"] = 100 * r["kept_drift"]["relative"]
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown_table(report: dict) -> str:
    rows = _table_rows(report)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _csv(report: dict) -> str:
    rows = _table_rows(report)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def plot(report: dict, path: Path) -> None:
    """accuracy.png: accuracy vs attention elements kept per row, and vs V rows read per decoded token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    is_lm = "perplexity" in variants[0]["in_domain"]
    task_names = list(variants[0]["tasks"])
    metrics = [("ppl", "perplexity (in-domain)")] if is_lm else [("cos", "embedding cosine vs dense")]
    metrics += [(t, f"{t} accuracy (%)") for t in task_names]
    xs = [("elements", "attention elements kept per row (prefill)")]
    if is_lm and "decode" in variants[0]["in_domain"]["attention"]:
        xs.append(("vrows", "V rows read per decoded token"))
    fig, axes = plt.subplots(len(metrics), len(xs), figsize=(5.2 * len(xs), 3.6 * len(metrics)), squeeze=False)

    def y_of(r, m):
        if m == "ppl":
            return r["in_domain"]["perplexity"]
        if m == "cos":
            return r["in_domain"]["embedding_cosine_vs_dense"]["mean"]
        t = r["tasks"][m]
        return 100 * t.get("acc_norm", t["acc"])

    def x_of(r, x):
        a = r["in_domain"]["attention"]
        if x == "elements":
            return a["kept_per_row"]
        return a["decode"].get("v_rows_read_per_token", a["decode"]["v_rows_kept_per_token"])

    groups: dict[str, list] = {}
    for r in variants[1:]:
        comp = comp_label(r["comp_mode"], r.get("rho"))
        label = "top-k" if r["kind"] == "topk" else f"Top-θ comp {r['comp_mode']} ({comp})"
        groups.setdefault(label, []).append(r)
    dense = variants[0]
    for i, (m, ml) in enumerate(metrics):
        for j, (x, xl) in enumerate(xs):
            ax = axes[i][j]
            for label, rs in groups.items():
                rs = sorted(rs, key=lambda r: x_of(r, x))
                ax.plot(
                    [x_of(r, x) for r in rs],
                    [y_of(r, m) for r in rs],
                    "o-" if "θ" in label else "s--",
                    label=label,
                    ms=4,
                )
                for r in rs:
                    ax.annotate(f"k={r['k']}", (x_of(r, x), y_of(r, m)), fontsize=6, alpha=0.6)
            ax.axhline(y_of(dense, m), color="k", lw=0.8, ls=":", label="dense")
            ax.plot([x_of(dense, x)], [y_of(dense, m)], "k*", ms=8)
            ax.set_xscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel(ml)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{report['model']}: Top-θ vs top-k vs dense through onnxruntime\n"
        f"seq {report['seq_len']}, in-domain {report['in_domain']['data']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_outputs(output: Path, report: dict, task_sets) -> None:
    """Everything into a staging folder, renamed onto ``output`` at the end (never half-written)."""
    from .._io import staged_output_dir
    from .tasks import write_task

    with staged_output_dir(output, EVAL_FILES, "an eval output") as stage:
        for name, kind, payload, _src, _dom in task_sets:
            if kind == "window_cloze":
                fname = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) + ".jsonl"
                write_task(stage / "tasks" / fname, payload)
                for t in report["tasks"]:
                    if t["name"] == name:
                        t["file"] = f"tasks/{fname}"
        write_json(stage / "eval.json", report)
        rows = task_rows(report)
        if rows:
            write_json(stage / "tasks.json", rows)
            (stage / "tasks.md").write_text(task_table(rows))
        (stage / "sweep.md").write_text(markdown_table(report))
        (stage / "sweep.csv").write_text(_csv(report))
        plot(report, stage / "accuracy.png")
