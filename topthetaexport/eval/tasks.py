"""Multiple-choice tasks for evaluation: HellaSwag-style jsonl files, and a cloze task built from real text.

A task is a list of items ``{"ctx": str, "endings": [str, ...], "label": int}`` (the HellaSwag field names).
A model answers an item by the ending with the highest log-likelihood given the context; ``acc`` uses the
summed log-likelihood, ``acc_norm`` divides it by the ending's length in characters (as lm-evaluation-harness
does for HellaSwag).

The cloze builder (``build_window_cloze``) makes a deterministic task inside the evaluation windows of a
text: the context is a window's tokens up to the start of a sentence, the correct ending is that sentence,
and the distractors are sentences from other windows of the same text. It is a constructed task, not a
published benchmark: its absolute accuracy says little; its change between dense and sparse attention,
item by item on the same contexts, is what it measures.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._errors import TopThetaError
from ..data import jsonl_objects

__all__ = ["TaskSpec", "build_window_cloze", "load_task", "parse_task_spec", "write_task"]

_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,.;:!?]?$")
_END = re.compile(r"[.!?][\"')\]]?\s*$")
_START = re.compile(r"^ [A-Z]")


# -- jsonl tasks ---------------------------------------------------------------------------------------


def load_task(path) -> list[dict[str, Any]]:
    """Items of a HellaSwag-style jsonl file: one ``{"ctx": str, "endings": [str, ...], "label": int}`` a line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TopThetaError(
            f'task file {path} does not exist: pass a .jsonl file of {{"ctx", "endings", "label"}} items or cloze:DATA'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TopThetaError(f"task file {path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    items = [_check_item(obj, f"task file {path} line {n}") for n, obj in jsonl_objects(text, f"task file {path}")]
    if not items:
        raise TopThetaError(
            f'task file {path} holds no items: add lines of {{"ctx": ..., "endings": [...], "label": i}}'
        )
    return items


# -- task specs (--tasks) ------------------------------------------------------------------------------

TASK_KINDS = {"cloze": "decoders", "retrieval": "encoders"}


class TaskSpec(NamedTuple):
    kind: str  # "cloze" | "retrieval" | "choice" (a HellaSwag-style .jsonl file)
    source: str  # the text (cloze, retrieval) or the file (choice)


def parse_task_spec(spec: str) -> TaskSpec:
    """``cloze:DATA``, ``retrieval:DATA`` or a .jsonl file of multiple-choice items (``choice:FILE`` also works)."""
    spec = str(spec).strip()
    kind, sep, source = spec.partition(":")
    if sep and kind in (*TASK_KINDS, "choice"):
        if not source.strip():
            raise TopThetaError(f"task '{spec}' names no data: write {kind}:DATA, e.g. {kind}:builtin:pydoc")
        return TaskSpec(kind, source.strip())
    if Path(spec).suffix == ".jsonl":
        return TaskSpec("choice", spec)
    if sep and len(kind) > 1:  # a one-letter kind is a Windows drive
        raise TopThetaError(
            f"unknown task kind '{kind}' in '{spec}': use cloze:DATA (decoders), retrieval:DATA "
            "(encoders) or a HellaSwag-style .jsonl file"
        )
    raise TopThetaError(
        f"task '{spec}' is neither cloze:DATA, retrieval:DATA nor a .jsonl file: for a text pass "
        f"cloze:{spec} (decoders) or retrieval:{spec} (encoders)"
    )


def _check_item(obj, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TopThetaError(
            f'{where} is not a JSON object: give every line {{"ctx": str, "endings": [str, ...], "label": int}}'
        )
    ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise TopThetaError(f'{where} has no non-empty string "ctx": add the context text')
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise TopThetaError(f'{where}: "endings" must be a list of at least 2 non-empty strings')
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise TopThetaError(
            f'{where}: "label" must be an integer index into "endings" (0..{len(endings) - 1}), got {label!r}'
        )
    return {**obj, "ctx": ctx, "endings": list(endings), "label": int(label)}


def write_task(path, items: list[dict[str, Any]]) -> Path:
    """Write items as jsonl (atomically)."""
    from .._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path


def _good_sentence(s: str, min_words: int, max_words: int, words_fraction: float = 0.8) -> bool:
    words = s.split()
    if not min_words <= len(words) <= max_words or s[-1] not in ".!?":
        return False
    return sum(bool(_WORD.match(w)) for w in words) >= words_fraction * len(words)


# -- the constructed cloze task ------------------------------------------------------------------------


def _sentence_spans(row, pieces: dict[int, str], min_ctx: int, min_tokens: int, max_tokens: int):
    """Token spans [t, u) of ``row`` that are whole sentences: token t starts with a space and a capital letter (so
    every ending of the task has the same form) and the text before it ends in . ! or ? (optionally a
    closing quote or bracket); the text before token u ends the same way, followed by whitespace;
    t >= min_ctx; min_tokens <= u - t <= max_tokens."""
    text = [pieces[int(i)] for i in row]
    n = len(row)

    def boundary(t: int) -> bool:  # a sentence ends right before token t
        left = "".join(text[max(0, t - 3) : t])
        return bool(_END.search(left)) and (left[-1:].isspace() or text[t][:1].isspace())

    spans = []
    for t in range(max(min_ctx, 1), n):
        if not (_START.match("".join(text[t : t + 2])) and boundary(t)):
            continue
        for u in range(t + 1, min(t + max_tokens, n - 1) + 1):
            if boundary(u):
                if u - t >= min_tokens:
                    spans.append((t, u))
                break
    return spans


def build_window_cloze(
    windows,
    tokenizer,
    *,
    num_items: int = 100,
    num_choices: int = 4,
    min_ctx: int | None = None,
    min_tokens: int = 6,
    max_tokens: int = 48,
    seed: int = 0,
    source: str = "",
) -> list[dict[str, Any]]:
    """A deterministic next-sentence cloze task inside token windows ``[N, S]`` (the evaluation windows).

    An item is a position t of window w where a sentence starts (t >= ``min_ctx``, default S/4, so that
    every context is long enough for sparse attention to matter): the context is ``w[:t]``, the correct
    ending the sentence ``w[t:u]`` (``min_tokens``..``max_tokens`` tokens, mostly plain words), the
    ``num_choices - 1`` distractors distinct sentences of the same kind from other windows. Items are spread
    round-robin over the windows. Each item holds token ids (``window``, ``position``, ``ending_ids``) and
    the same as text (``ctx``, ``endings``), so the written jsonl can be scored again as an ordinary task.
    Same windows and seed, same task.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 2:
        raise TopThetaError(
            f"the cloze task needs at least 2 windows of text (got shape {list(windows.shape)}): "
            "use more --windows or more text"
        )
    if num_items < 1 or num_choices < 2:
        raise TopThetaError(f"need num_items >= 1 and num_choices >= 2 (got {num_items}, {num_choices})")
    if tokenizer is None:
        raise TopThetaError("the cloze task needs a tokenizer: use a model with tokenizer files")
    n, s = windows.shape
    min_ctx = s // 4 if min_ctx is None else int(min_ctx)
    pieces = {int(i): tokenizer.decode([int(i)]) for i in np.unique(windows)}
    per_window: list[list[tuple[int, int, str]]] = []
    for w in range(n):
        spans = []
        for t, u in _sentence_spans(windows[w], pieces, min_ctx, min_tokens, max_tokens):
            text = tokenizer.decode(windows[w, t:u].tolist())
            if _good_sentence(text.strip(), 4, 10 * max_tokens, 0.6):
                spans.append((t, u, text))
        per_window.append(spans)
    total = sum(len(x) for x in per_window)
    if total < num_choices or sum(1 for x in per_window if x) < 2:
        raise TopThetaError(
            f"the windows of {source or 'the data'} hold {total} usable sentences in "
            f"{sum(1 for x in per_window if x)} windows: the cloze task needs sentences in at "
            "least 2 windows; use more --windows or prose-like text"
        )
    rng = random.Random(seed)
    order = [rng.sample(range(len(x)), len(x)) for x in per_window]
    picked: list[tuple[int, int]] = []  # (window, index into its spans), round robin over the windows
    depth = 0
    while len(picked) < min(num_items, total):
        for w in range(n):
            if depth < len(order[w]) and len(picked) < num_items:
                picked.append((w, order[w][depth]))
        depth += 1
    items = []
    for w, j in sorted(picked):
        t, u, text = per_window[w][j]
        pool = [(w2, a, b, x) for w2 in range(n) if w2 != w for a, b, x in per_window[w2] if x != text]
        chosen: list[tuple[int, int, int, str]] = []
        for cand in rng.sample(pool, len(pool)):
            if len(chosen) == num_choices - 1:
                break
            if all(cand[3] != c[3] for c in chosen):
                chosen.append(cand)
        if len(chosen) < num_choices - 1:
            raise TopThetaError(
                f"{source or 'the data'} has too few distinct sentences for {num_choices} choices: use more --windows"
            )
        label = rng.randrange(num_choices)
        ids = [windows[w2, a:b].tolist() for w2, a, b, _ in chosen]
        texts = [x for _, _, _, x in chosen]
        ids.insert(label, windows[w, t:u].tolist())
        texts.insert(label, text)
        items.append(
            {
                "ctx": tokenizer.decode(windows[w, :t].tolist()),
                "endings": texts,
                "label": label,
                "source": source,
                "window": int(w),
                "position": int(t),
                "ending_ids": [[int(i) for i in e] for e in ids],
            }
        )
    return items
