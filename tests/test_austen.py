"""The R serialisation reader (topthetaexport.rdata) and the austen:* data specs (Debian's r-cran-janeaustenr)."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from topthetaexport import austen
from topthetaexport._errors import TopThetaError
from topthetaexport.data import load_texts
from topthetaexport.rdata import read_lazyload, read_rds, unserialize

# -- a tiny XDR writer for fixtures (the format of R Internals, "Serialization Formats") ---------------------


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    raw = s.encode()
    return _i(9 | (1 << 3) << 12) + _i(len(raw)) + raw  # UTF-8 level


def _strsxp(values, names=None) -> bytes:
    flags = 16 | ((1 << 9) if names else 0)
    out = _i(flags) + _i(len(values)) + b"".join(_char(v) for v in values)
    if names:
        out += _attrs({"names": _strsxp(names)})
    return out


def _intsxp(values) -> bytes:
    return _i(13) + _i(len(values)) + b"".join(_i(v) for v in values)


def _attrs(pairs: dict[str, bytes]) -> bytes:
    out = b""
    for tag, val in pairs.items():  # one pairlist cell per attribute: flags (tag bit), SYMSXP tag, value
        out += _i(2 | (1 << 10)) + _i(1) + _char(tag) + val
    return out + _i(254)  # NILVALUE ends the pairlist


def _vecsxp(items: list[bytes], names: list[str]) -> bytes:
    return _i(19 | (1 << 9)) + _i(len(items)) + b"".join(items) + _attrs({"names": _strsxp(names)})


def _stream(body: bytes, version: int = 3) -> bytes:
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + body


def test_character_vector_with_na_and_names():
    obj = unserialize(_stream(_strsxp(["Emma", "", None, "Knightley — é"], names=["a", "b", "c", "d"])))
    assert obj.type == 16
    assert obj.value == ["Emma", "", None, "Knightley — é"]
    assert obj.attributes["names"] == ["a", "b", "c", "d"]


def test_version_2_and_integers():
    obj = unserialize(_stream(_intsxp([1, -(2**31), 7]), version=2))
    assert obj.value == [1, None, 7]  # NA_integer_ -> None


def test_rds_gzip(tmp_path):
    p = tmp_path / "x.rds"
    p.write_bytes(gzip.compress(_stream(_strsxp(["one", "two"]))))
    assert read_rds(p).value == ["one", "two"]


def test_lazyload_database(tmp_path):
    blobs, index = b"", []
    for name, vals in (("first", ["a", "b"]), ("second", ["c"])):
        raw = _stream(_strsxp(vals))
        entry = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index.append((name, len(blobs), len(entry)))
        blobs += entry
    variables = _vecsxp([_intsxp([off, ln]) for _, off, ln in index], [n for n, _, _ in index])
    rdx = _stream(_vecsxp([variables, _i(254), _i(254)], ["variables", "references", "compressed"]))
    (tmp_path / "Rdata.rdb").write_bytes(blobs)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    got = read_lazyload(tmp_path / "Rdata")
    assert {k: v.value for k, v in got.items()} == {"first": ["a", "b"], "second": ["c"]}


def test_damaged_streams_are_one_line_errors():
    with pytest.raises(TopThetaError, match="truncated") as e:
        unserialize(_stream(_strsxp(["abc"]))[:-2])
    assert "\n" not in str(e.value)
    with pytest.raises(TopThetaError, match="magic"):
        unserialize(b"A\n" + b"\0" * 20)
    with pytest.raises(TopThetaError, match="unsupported R type"):
        unserialize(_stream(_i(3)))  # a closure


def test_specs():
    assert austen.parse_spec("austen:emma") == ["emma"]
    assert austen.parse_spec("austen:persuasion+emma") == ["emma", "persuasion"]
    assert austen.parse_spec("austen:all") == list(austen.BOOKS)
    assert austen.parse_spec("austen:all-but-emma") == [b for b in austen.BOOKS if b != "emma"]
    with pytest.raises(TopThetaError, match="unknown novel middlemarch"):
        austen.parse_spec("austen:middlemarch")


def test_missing_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPTHETA_CACHE", str(tmp_path))
    monkeypatch.setattr(austen, "_CACHE", {})
    with pytest.raises(TopThetaError, match="make install"):
        load_texts("austen:emma")


def test_install_without_apt_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOPTHETA_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    assert austen.install() is None
    out = capsys.readouterr().out
    assert out.startswith("skipping r-cran-janeaustenr") and out.count("\n") == 1


@pytest.mark.skipif(
    not (austen.package_dir() / "SHA256").is_file(), reason="r-cran-janeaustenr not installed (make install)"
)
def test_the_real_novels():
    """The installed package (Debian bookworm 1.0.0-1): six novels, each starting with its title."""
    assert (austen.package_dir() / "SHA256").read_text().split()[0] == austen.DEB_SHA256
    texts = load_texts("austen:all")
    assert len(texts) == 6
    assert texts[3].startswith("EMMA") and "Mr. Knightley" in texts[3]
    assert texts[5].startswith("Persuasion") and "Anne Elliot" in texts[5]
    sizes = [len(t) for t in texts]
    assert min(sizes) > 400_000 and max(sizes) < 900_000, sizes  # 7.9k-16k lines, ~0.42-0.87 M characters
    assert "\n\n" in texts[0] and "\n\n\n" not in texts[0]
