"""Calibration / evaluation text and fixed-length token windows."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ._errors import TopThetaError

__all__ = ["BUILTIN_PYDOC", "BUILTIN_LICENSES", "load_texts", "mixed_sources", "token_batches", "as_token_tensor"]

BUILTIN_PYDOC = "builtin:pydoc"
BUILTIN_LICENSES = "builtin:licenses"  # /usr/share/common-licenses (base-files, on every Debian/Ubuntu)
AUSTEN_PREFIX = "austen:"  # Jane Austen's novels from Debian's r-cran-janeaustenr (topthetaexport.austen)
LICENSES_DIR = Path("/usr/share/common-licenses")
_DOC_SPLIT = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines separate documents
MIX_SEPARATOR = ","  # "austen:emma,builtin:licenses": windows taken in turn from each text


def mixed_sources(source) -> list[str] | None:
    """The texts of a mixed source ``A,B[,...]``, or None for a single one (a path that exists is never split)."""
    if not isinstance(source, str) or MIX_SEPARATOR not in source or Path(source).expanduser().exists():
        return None
    parts = [p.strip() for p in source.split(MIX_SEPARATOR)]
    if any(not p for p in parts):
        raise TopThetaError(f"data spec {source!r} has an empty part: write A,B with a text on each side of the comma")
    return parts


def load_texts(source) -> list[str]:
    """Documents from ``source``.

    ``"builtin:pydoc"`` (Python's pydoc_data topics), ``"builtin:licenses"`` (the license texts of
    /usr/share/common-licenses, one document per file, symlinked duplicates skipped), a ``.txt`` file
    (documents separated by two or more blank lines; a file without such gaps is one document), a ``.jsonl``
    file (a ``"text"`` field per line), ``"austen:NAME"`` (a Jane Austen novel, one document per book;
    ``austen:emma+persuasion``, ``austen:all``, ``austen:all-but-emma``; see topthetaexport.austen),
    a directory of ``.txt``/``.jsonl`` files, or a list of strings. ``A,B``: the documents of both (for windows
    taken in turn from each, see ``token_batches``).
    """
    mixed = mixed_sources(source)
    if mixed:
        return [t for part in mixed for t in load_texts(part)]
    if isinstance(source, (list, tuple)):
        texts = [str(t) for t in source]
        where = "the given list of texts"
    elif str(source) == BUILTIN_PYDOC:
        texts, where = _pydoc_texts(), BUILTIN_PYDOC
    elif str(source) == BUILTIN_LICENSES:
        texts, where = _license_texts(), BUILTIN_LICENSES
    elif str(source).startswith(AUSTEN_PREFIX):
        from .austen import book_texts

        texts, where = book_texts(str(source)), str(source)
    else:
        path = Path(source).expanduser()
        texts, where = _path_texts(path), str(path)
    texts = [t for t in (t.strip() for t in texts) if t]
    if not texts:
        raise TopThetaError(
            f"no text found in {where}: pass a non-empty .txt/.jsonl file, a folder of them, or {BUILTIN_PYDOC}"
        )
    return texts


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _license_texts() -> list[str]:
    if not LICENSES_DIR.is_dir():
        raise TopThetaError(
            f"{BUILTIN_LICENSES} needs {LICENSES_DIR} (Debian/Ubuntu package base-files), which "
            "this machine lacks: pass a .txt/.jsonl file or folder instead"
        )
    files = sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _path_texts(path: Path) -> list[str]:
    if not path.exists():
        raise TopThetaError(
            f"data path {path} does not exist: pass a .txt/.jsonl file, a folder of them, or {BUILTIN_PYDOC}"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise TopThetaError(f"folder {path} holds no .txt or .jsonl files: add some or pass a file")
        return [t for f in files for t in _file_texts(f)]
    return _file_texts(path)


def _file_texts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise TopThetaError(f"unsupported data file {path}: use a .txt or .jsonl file (or {BUILTIN_PYDOC})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TopThetaError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    except OSError as e:
        raise TopThetaError(f"cannot read {path} ({e.strerror}): check the path and permissions") from None
    if suffix == ".txt":
        return _DOC_SPLIT.split(text)
    return _jsonl_texts(path, text)


def jsonl_objects(text: str, where: str):
    """(line number, parsed object) for every non-blank line of a jsonl text; ``where`` names the file in errors."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise TopThetaError(f"{where} line {n} is not valid JSON ({e.msg}): fix or remove it") from None


def _jsonl_texts(path: Path, text: str) -> list[str]:
    out = []
    for n, obj in jsonl_objects(text, str(path)):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TopThetaError(f'{path} line {n} has no string field "text": give every line a "text"')
        out.append(obj["text"])
    return out


# -- tokens ------------------------------------------------------------------------------------------


def _separator(tokenizer) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    return None


def _token_stream(tokenizer, texts: list[str]) -> list[int]:
    sep = _separator(tokenizer)
    ids: list[int] = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc in enc:
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    return ids


def token_batches(tokenizer, source_or_texts, *, seq_len: int, num_samples: int, skip: int = 0) -> torch.Tensor:
    """Non-overlapping token windows [N, seq_len] (LongTensor) cut from the concatenated documents.

    Documents are joined with EOS (or SEP). For encoder tokenizers with CLS/SEP (BERT) every window is
    ``[CLS] ... [SEP]``; where the tokenizer starts every text with BOS (``leading_bos``), every window is
    ``[BOS] ...``, as the model runs at deployment (calibrating Gemma without it skews θ). The first ``skip``
    windows are skipped (held-out evaluation after calibration). A mixed source ``A,B`` takes its windows in turn
    from each text (window j from text j mod 2), so the calibration sees both domains and ``skip`` holds out the
    same windows of each.
    """
    if seq_len < 2 or num_samples < 1 or skip < 0:
        raise TopThetaError(f"need seq_len >= 2, num_samples >= 1 and skip >= 0 (got {seq_len}, {num_samples}, {skip})")
    mixed = mixed_sources(source_or_texts)
    if mixed:
        return _mixed_batches(tokenizer, mixed, seq_len=seq_len, num_samples=num_samples, skip=skip)
    texts = load_texts(source_or_texts)
    if tokenizer is None:
        raise TopThetaError(
            "this model has no tokenizer, so text cannot be tokenized: pass token ids "
            "(a LongTensor [N, seq_len]) or a model directory with a tokenizer"
        )
    stream = _token_stream(tokenizer, texts)
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    wrap = isinstance(cls, int) and isinstance(sep, int) and getattr(tokenizer, "eos_token_id", None) is None
    bos = None if wrap else leading_bos(tokenizer)
    body = seq_len - 2 if wrap else seq_len - (bos is not None)
    available = len(stream) // body
    n = min(num_samples, available - skip)
    if n < 1:
        raise TopThetaError(
            f"the text gives {len(stream)} tokens = {available} windows of {seq_len}, but "
            f"{skip} are skipped and at least one more is needed: use more text or a "
            "smaller seq_len / num_samples"
        )
    if n < num_samples:
        warnings.warn(
            f"only {n} windows of {seq_len} tokens available after skipping {skip} (asked for {num_samples})",
            RuntimeWarning,
            stacklevel=2,
        )
    windows = torch.tensor(stream[skip * body : (skip + n) * body], dtype=torch.long).view(n, body)
    if wrap:
        assert isinstance(cls, int) and isinstance(sep, int)
        windows = torch.cat([torch.full((n, 1), cls), windows, torch.full((n, 1), sep)], dim=1)
    elif bos is not None:
        windows = torch.cat([torch.full((n, 1), bos), windows], dim=1)
    return windows


def _mixed_batches(tokenizer, sources: list[str], *, seq_len: int, num_samples: int, skip: int) -> torch.Tensor:
    """Windows skip .. skip + num_samples - 1 of the round robin over ``sources`` (window j: source j mod m, its
    window j div m); a text that runs out gives fewer windows, with token_batches' warning."""
    m = len(sources)
    order = [(j % m, j // m) for j in range(skip, skip + num_samples)]
    windows: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (its first window index, its windows)
    for i, src in enumerate(sources):
        turns = [n for s, n in order if s == i]
        if not turns:
            continue
        try:
            got = token_batches(tokenizer, src, seq_len=seq_len, num_samples=len(turns), skip=turns[0])
        except TopThetaError as e:
            raise TopThetaError(f"{src} (part {i + 1} of the mixed data): {e}") from None
        windows[i] = (turns[0], got)
    rows = [windows[i][1][n - windows[i][0]] for i, n in order if n - windows[i][0] < windows[i][1].shape[0]]
    return torch.stack(rows)


def leading_bos(tokenizer) -> int | None:
    """BOS where the tokenizer puts it before every text it encodes (Gemma, Llama): the model is only ever run
    after it, so windows start with it too; None for tokenizers that add no BOS (SmolLM2, Qwen2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def as_token_tensor(data, tokenizer, *, seq_len: int, num_samples: int, skip: int = 0) -> torch.Tensor:
    """``data`` if it already is a token tensor [N, S], else ``token_batches(tokenizer, data, ...)``."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32) or data.numel() == 0:
            raise TopThetaError(
                f"token data must be a non-empty integer tensor [N, seq_len], got {data.dtype} {list(data.shape)}"
            )
        return data.long()
    return token_batches(tokenizer, data, seq_len=seq_len, num_samples=num_samples, skip=skip)


def describe_data(data) -> str:
    """A short description of a data argument for reports (tensors are not printed whole)."""
    shape = getattr(data, "shape", None)
    if shape is not None:
        return f"token tensor {list(shape)}"
    if isinstance(data, (list, tuple)):
        return f"{len(data)} texts"
    return str(data)
