"""Jane Austen's six novels, offline, from Debian's ``r-cran-janeaustenr`` (long public-domain text).

``python -m topthetaexport.austen install`` (run by ``make install``) fetches the pinned .deb with
``apt-get download``, checks its sha256 and unpacks it with ``dpkg-deb -x`` into
``$TOPTHETA_CACHE/janeaustenr-<version>/`` (default ``~/.cache/toptheta-export``); where apt-get or dpkg-deb
is missing it prints one line and does nothing. The novels are character vectors (one line of the
Project Gutenberg text per element) in the package's lazy-load database ``data/Rdata.{rdx,rdb}``, read by
``topthetaexport.rdata``. Data specs: ``austen:emma``, ``austen:emma+persuasion``, ``austen:all``,
``austen:all-but-emma`` (every novel except the named ones, joined by ``-but-`` and ``+``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._errors import TopThetaError

__all__ = ["BOOKS", "DEB_SHA256", "DEB_VERSION", "PACKAGE", "book_texts", "install", "package_dir", "parse_spec"]

PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"  # Debian bookworm
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
DEB_FILE = f"{PACKAGE}_{DEB_VERSION}_all.deb"
_DATA = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")
# spec name -> variable of the R package, in publication order
BOOKS = {
    "sensesensibility": "sensesensibility",
    "prideprejudice": "prideprejudice",
    "mansfieldpark": "mansfieldpark",
    "emma": "emma",
    "northangerabbey": "northangerabbey",
    "persuasion": "persuasion",
}
PREFIX = "austen:"
_FIX = "run 'make install' (or 'python -m topthetaexport.austen install') on a Debian/Ubuntu machine"


def _cache_root() -> Path:
    # the same root as the model cache (topthetaexport.models.cache_dir), which this layer cannot import
    return Path(os.environ.get("TOPTHETA_CACHE") or Path.home() / ".cache" / "toptheta-export")


def package_dir() -> Path:
    """Where the unpacked package lives (it may not exist yet)."""
    return _cache_root() / f"janeaustenr-{DEB_VERSION}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install(quiet: bool = False) -> Path | None:
    """Fetch, check and unpack the pinned .deb once; None (after one line on stderr) where apt is unavailable."""
    target = package_dir()
    if (target / _DATA.with_suffix(".rdb")).is_file():
        return target
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        print(f"skipping {PACKAGE}: apt-get/dpkg-deb not found (austen:* data needs a Debian/Ubuntu machine)")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".janeaustenr.") as tmp:
        res = subprocess.run(
            [apt, "download", f"{PACKAGE}={DEB_VERSION}"], cwd=tmp, capture_output=True, text=True, timeout=600
        )
        deb = Path(tmp) / DEB_FILE
        if res.returncode != 0 or not deb.is_file():
            lines = (res.stderr or res.stdout).strip().splitlines()
            why = next((ln for ln in lines if ln.startswith("E:")), lines[-1] if lines else "no output")
            raise TopThetaError(
                f"apt-get download {PACKAGE}={DEB_VERSION} failed ({why[:200]}): add Debian bookworm's main "
                "archive to apt's sources (or copy the .deb into place) and run 'apt-get update'"
            )
        digest = _sha256(deb)
        if digest != DEB_SHA256:
            raise TopThetaError(
                f"{DEB_FILE} has sha256 {digest}, expected {DEB_SHA256}: the archive served another build; "
                "check your apt sources"
            )
        unpacked = Path(tmp) / "root"
        subprocess.run([dpkg, "-x", str(deb), str(unpacked)], check=True, capture_output=True, timeout=600)
        if not (unpacked / _DATA.with_suffix(".rdb")).is_file():
            raise TopThetaError(f"{DEB_FILE} holds no {_DATA}.rdb: the package layout changed; pin another version")
        (unpacked / "SHA256").write_text(f"{digest}  {DEB_FILE}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    if not quiet:
        print(f"{PACKAGE} {DEB_VERSION} (sha256 {DEB_SHA256[:12]}…) unpacked into {target}")
    return target


def parse_spec(spec: str) -> list[str]:
    """Book names of an ``austen:`` spec, in publication order (``all``, ``a+b``, ``all-but-a+b``)."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    if body == "all" or body.startswith("all-but-"):
        drop = _names(body[len("all-but-") :]) if body != "all" else []
        chosen = [b for b in BOOKS if b not in drop]
    else:
        chosen = _names(body)
    if not chosen:
        raise TopThetaError(f"data spec {spec} selects no novel: name at least one of {', '.join(BOOKS)}")
    return [b for b in BOOKS if b in chosen]


def _names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split("+") if n.strip()]
    bad = [n for n in names if n not in BOOKS]
    if bad or not names:
        raise TopThetaError(
            f"unknown novel {'+'.join(bad) or repr(text)} in an austen: spec: use austen:NAME with NAME one of "
            f"{', '.join(BOOKS)} (or all, all-but-NAME, NAME+NAME)"
        )
    return names


def _paragraphs(lines: list[str | None]) -> str:
    """The Gutenberg lines of a novel as text: lines of a paragraph joined by spaces, paragraphs by a blank line."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


_CACHE: dict[str, str] = {}


def book_texts(spec: str) -> list[str]:
    """One document (the whole novel) per book of ``spec``."""
    names = parse_spec(spec)
    missing = [n for n in names if n not in _CACHE]
    if missing:
        from .rdata import read_lazyload

        base = package_dir() / _DATA
        if not base.with_suffix(".rdb").is_file():
            raise TopThetaError(f"{spec} needs Debian's {PACKAGE} {DEB_VERSION} in {package_dir()}: {_FIX}")
        data = read_lazyload(base)
        for n in BOOKS:
            obj = data.get(BOOKS[n])
            if obj is None or not isinstance(obj.value, list):
                raise TopThetaError(f"{base}.rdb has no character vector '{BOOKS[n]}': reinstall ({_FIX})")
            _CACHE[n] = _paragraphs(obj.value)
    return [_CACHE[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m topthetaexport.austen install", file=sys.stderr)
        return 2
    try:
        install()
    except TopThetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
