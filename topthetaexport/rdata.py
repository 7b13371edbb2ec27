"""A minimal reader of R's serialisation format (XDR, versions 2 and 3), enough for the character vectors
of an R package's data: ``.rds`` files (gzip) and lazy-load databases (``.rdx`` index + ``.rdb`` blobs, each
blob a 4-byte big-endian length and a zlib stream).

Written from R's documented format ("R Internals", section "Serialization Formats"): after the ``X\\n``
magic come the format version, R's version and the oldest version that reads it (plus, in version 3, the
native encoding); then one item, depth first. Each item starts with a 32-bit flags word: the type in the low
8 bits, then the is-object, has-attributes and has-tag bits (8, 9, 10) and the "levels" (12..31; for
strings the encoding). Vectors are a length and the elements, their attributes after them; pairlists are
attributes, tag, CAR, CDR. Symbols and environments go into a reference table that ``REFSXP`` items index.

Only what data files hold is decoded: NULL, symbols, pairlists, character / logical / integer / double /
complex / raw / generic vectors, environments (as dicts), ALTREP compact sequences and wrappers. Anything
else (closures, bytecode, external pointers) raises ``TopThetaError``.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import TopThetaError

__all__ = ["RObject", "read_rds", "read_lazyload", "unserialize"]

# SEXP types (R Internals)
_NIL, _SYM, _LIST, _ENV, _LANG, _CHAR, _LGL, _INT, _REAL, _CPLX = 0, 1, 2, 4, 6, 9, 10, 13, 14, 15
_STR, _DOT, _VEC, _EXPR, _RAW, _S4 = 16, 17, 19, 20, 24, 25
# pseudo-types of the stream
_REF, _NILVALUE, _GLOBALENV, _UNBOUND, _MISSING, _BASENS = 255, 254, 253, 252, 251, 250
_NAMESPACE, _PACKAGE, _PERSIST, _EMPTYENV, _BASEENV = 249, 248, 247, 242, 241
_ATTRLANG, _ATTRLIST, _ALTREP = 240, 239, 238
_LATIN1 = 1 << 2  # string encoding level; UTF-8 (1 << 3), ASCII and unmarked strings are read as UTF-8
NA_INTEGER = -(2**31)


@dataclass
class RObject:
    """A decoded R value: ``value`` (list / str / dict / None) and its attributes (``names`` etc.)."""

    type: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[Any] = []

    def fail(self, what: str) -> TopThetaError:
        return TopThetaError(
            f"{self.where}: {what} at byte {self.pos} of the R serialisation: the file is damaged or uses a "
            "format this reader does not decode (reinstall the package with 'make install')"
        )

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated data (need {n} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.i32()
        if n == -1:  # long vector: two more ints
            hi, lo = self.i32(), self.i32()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise self.fail(f"negative length {n}")
        return n

    # -- items -------------------------------------------------------------------------------------
    def item(self) -> Any:
        flags = self.i32()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        levels = flags >> 12
        if t == _NILVALUE or t == _NIL:
            return None
        if t in (_GLOBALENV, _EMPTYENV, _BASEENV, _BASENS, _UNBOUND, _MISSING):
            return RObject(t, None)
        if t == _REF:
            idx = flags >> 8 or self.i32()
            if not 1 <= idx <= len(self.refs):
                raise self.fail(f"reference {idx} to an unknown object")
            return self.refs[idx - 1]
        if t in (_PERSIST, _NAMESPACE, _PACKAGE):
            if self.i32() != 0:
                raise self.fail("unexpected persistent-name flag")
            obj = RObject(t, self.strings(self.i32()))
            self.refs.append(obj)
            return obj
        if t == _SYM:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if t == _ENV:
            env = RObject(_ENV, {})
            self.refs.append(env)
            self.i32()  # locked
            self.item()  # enclosure
            frame, hashtab = self.item(), self.item()
            attrs = self.item()
            for part in (frame, hashtab):
                env.value.update(_bindings(part))
            env.attributes = _attr_dict(attrs)
            return env
        if t in (_LIST, _LANG, _ATTRLIST, _ATTRLANG, _DOT):
            return self.pairlist(t, has_attr, has_tag)
        if t == _CHAR:
            n = self.i32()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            enc = "latin-1" if levels & _LATIN1 else "utf-8"
            return raw.decode(enc, errors="replace")
        if t == _ALTREP:
            info, state, attrs = self.item(), self.item(), self.item()
            return self.altrep(info, state, attrs)
        if t in (_LGL, _INT):
            n = self.length()
            vals = list(struct.unpack(f">{n}i", self.take(4 * n)))
            value: Any = [None if v == NA_INTEGER else v for v in vals]
        elif t == _REAL:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif t == _CPLX:
            n = self.length()
            pairs = struct.unpack(f">{2 * n}d", self.take(16 * n))
            value = [complex(pairs[2 * i], pairs[2 * i + 1]) for i in range(n)]
        elif t == _RAW:
            value = self.take(self.length())
        elif t == _STR:
            value = [self.item() for _ in range(self.length())]
        elif t in (_VEC, _EXPR):
            value = [self.item() for _ in range(self.length())]
        elif t == _S4:
            value = None
        else:
            raise self.fail(f"unsupported R type {t}")
        obj = RObject(t, value)
        if has_attr:
            obj.attributes = _attr_dict(self.item())
        return obj

    def pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RObject:
        out: dict[str, Any] = {}
        attrs: dict[str, Any] = {}
        i = 0
        while True:
            if has_attr:
                attrs.update(_attr_dict(self.item()))
            tag = self.item() if has_tag else None
            out[tag if isinstance(tag, str) else f"[[{i}]]"] = self.item()
            i += 1
            flags = self.i32()
            nt = flags & 0xFF
            if nt not in (_LIST, _LANG, _ATTRLIST, _ATTRLANG, _DOT):
                self.pos -= 4  # the CDR is another kind of item (normally NILVALUE)
                self.item()
                break
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        return RObject(t, out, attrs)

    def strings(self, n: int) -> list[Any]:
        return [self.item() for _ in range(n)]

    def altrep(self, info: Any, state: Any, attrs: Any) -> Any:
        cls = info.value.get("[[0]]") if isinstance(info, RObject) and isinstance(info.value, dict) else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state.value if isinstance(state, RObject) else [0, 0, 0])[:3]
            n = int(n)
            value: Any = [start + i * step for i in range(n)]
            if cls == "compact_intseq":
                value = [int(v) for v in value]
            obj = RObject(_INT if cls == "compact_intseq" else _REAL, value)
        elif isinstance(cls, str) and cls.startswith("wrap_") and isinstance(state, RObject):
            inner = state.value.get("[[0]]") if isinstance(state.value, dict) else state
            obj = inner if isinstance(inner, RObject) else RObject(_VEC, inner)
        elif cls == "deferred_string" and isinstance(state, RObject):
            src = state.value.get("[[0]]") if isinstance(state.value, dict) else None
            vals = src.value if isinstance(src, RObject) else []
            obj = RObject(_STR, [None if v is None else str(v) for v in vals])
        else:
            raise self.fail(f"unsupported ALTREP class {cls!r}")
        obj.attributes = {**obj.attributes, **_attr_dict(attrs)}
        return obj


def _attr_dict(attrs: Any) -> dict[str, Any]:
    if isinstance(attrs, RObject) and isinstance(attrs.value, dict):
        return {k: (v.value if isinstance(v, RObject) and k == "names" else v) for k, v in attrs.value.items()}
    return {}


def _bindings(part: Any) -> dict[str, Any]:
    if isinstance(part, RObject) and isinstance(part.value, dict):
        return dict(part.value)
    if isinstance(part, RObject) and isinstance(part.value, list):  # hash table: a list of pairlists
        out: dict[str, Any] = {}
        for bucket in part.value:
            out.update(_bindings(bucket))
        return out
    return {}


def unserialize(data: bytes, where: str = "R data") -> Any:
    """Decode one serialised R object (the bytes after decompression)."""
    r = _Reader(data, where)
    magic = r.take(2)
    if magic != b"X\n":
        raise r.fail(f"magic {magic!r} is not XDR ('X\\n'; ASCII and native formats are not read)")
    version = r.i32()
    r.i32()  # writer's R version
    r.i32()  # oldest R version that reads it
    if version == 3:
        r.take(r.i32())  # native encoding
    elif version != 2:
        raise r.fail(f"serialisation version {version} is not 2 or 3")
    return r.item()


def read_rds(path: str | Path) -> Any:
    """An ``.rds`` file (gzip-compressed or plain XDR)."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return unserialize(raw, str(p))


def _blob(rdb: bytes, offset: int, length: int, where: str) -> bytes:
    chunk = rdb[offset : offset + length]
    if len(chunk) != length or length < 5:
        raise TopThetaError(f"{where}: entry at {offset} (+{length}) is outside the file: reinstall the package")
    size = struct.unpack(">I", chunk[:4])[0]
    body = chunk[4:]
    if body[:1] != b"\x78":  # not a bare zlib stream: R's compress = 2 / 3 write a type byte first
        kind, body = body[:1], body[1:]
        if kind == b"0":
            return body
        if kind != b"Z":
            raise TopThetaError(f"{where}: entry compressed with {kind!r} (bzip2/xz): only zlib is read")
    try:
        out = zlib.decompress(body)
    except zlib.error as e:
        raise TopThetaError(f"{where}: entry at {offset} is not a zlib stream ({e}): reinstall the package") from None
    if len(out) != size:
        raise TopThetaError(f"{where}: entry at {offset} inflates to {len(out)} bytes, not {size}: reinstall")
    return out


def read_lazyload(base: str | Path) -> dict[str, Any]:
    """Every variable of a lazy-load database ``BASE.rdx`` / ``BASE.rdb`` (R packages' ``data/Rdata``)."""
    base = Path(base)
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for f in (rdx, rdb):
        if not f.is_file():
            raise TopThetaError(f"{f} does not exist: install the R data package (make install)")
    raw = rdx.read_bytes()
    index = unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]), str(rdx))
    if not isinstance(index, RObject) or not isinstance(index.value, list):
        raise TopThetaError(f"{rdx} is not a lazy-load index (a list): reinstall the package")
    names = index.attributes.get("names") or []
    parts = dict(zip(names, index.value))
    variables = parts.get("variables")
    if not isinstance(variables, RObject):
        raise TopThetaError(f"{rdx} has no 'variables' entry: reinstall the package")
    data = rdb.read_bytes()
    out = {}
    for name, pos in zip(variables.attributes.get("names") or [], variables.value):
        offset, length = (int(x) for x in pos.value[:2])
        out[name] = unserialize(_blob(data, offset, length, str(rdb)), f"{rdb}[{name}]")
    return out
