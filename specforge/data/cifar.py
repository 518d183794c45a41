"""CIFAR-10 in its official python format, read without trusting its pickles.

The batches are Python pickles. :class:`RestrictedUnpickler` admits only the few globals
that the format uses (numpy's array reconstruction and ``_codecs.encode``), so a
booby-trapped file cannot run code: it fails with a DataError instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from specforge.atomic import atomic_path
from specforge.data.sources import DataError, Dataset, SourceData

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
#: Published MD5 of the archive (the same one torchvision and tfds check).
MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
OFFLINE_HINT = ("put {archive} (or the extracted {folder}/ folder) in {cache}, or set "
                "data.source.path to where it is. For a run that needs no download, use "
                "specs/digits.yaml or `--set data.source.type=synthetic`.")


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches and nothing else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of the "
                                         "CIFAR-10 format")
        if name == "_reconstruct":
            return _reconstruct()
        if module == "_codecs":
            import codecs
            return codecs.encode
        return getattr(np, name)


def cache_dir() -> Path:
    """Where downloads go: $SPECFORGE_CACHE, else ~/.cache/specforge."""
    return Path(os.environ.get("SPECFORGE_CACHE", Path.home() / ".cache" / "specforge"))


def read_batch(raw: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images (N, 32, 32, 3) and int64 labels."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{origin}: not a valid CIFAR-10 batch ({type(exc).__name__}: "
                        f"{exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{origin}: not a CIFAR-10 batch (no data/labels)")
    data = batch[b"data"]
    try:  # a ragged nested list cannot even become an array
        labels = np.asarray(batch[b"labels"])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: the labels are not a list of integers ({exc})") from None
    # integers only: floats would be truncated, and huge ints or None become objects
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{origin}: the labels must be a flat list of integers 0..9, got "
                        f"{labels.dtype} values of shape {labels.shape}")
    labels = labels.astype(np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
            data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{origin}: expected uint8 data (N, 3072) and N labels, got "
                        f"{getattr(data, 'shape', None)} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{origin}: labels outside 0..9")
    # stored as N x (3 channels x 32 x 32), row-major
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _from_folder(folder: Path) -> SourceData:
    parts = {}
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        path = folder / name
        try:
            parts[name] = read_batch(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise DataError(f"{path} is missing: the folder must hold data_batch_1..5 and "
                            "test_batch") from None
    return _assemble(parts, str(folder))


def _from_archive(archive: Path) -> SourceData:
    parts = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in [*TRAIN_BATCHES, TEST_BATCH]:
                try:
                    member = tar.extractfile(f"{FOLDER}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"{archive}: {FOLDER}/{name} is missing from the archive")
                parts[name] = read_batch(member.read(), f"{archive}:{name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{archive}: truncated or corrupt archive ({exc}); delete it and "
                        "download again") from None
    return _assemble(parts, str(archive))


def _assemble(parts: dict[str, tuple[np.ndarray, np.ndarray]], origin: str) -> SourceData:
    x = np.concatenate([parts[n][0] for n in TRAIN_BATCHES])
    y = np.concatenate([parts[n][1] for n in TRAIN_BATCHES])
    tx, ty = parts[TEST_BATCH]
    return SourceData(Dataset(x, y, CLASSES, origin), Dataset(tx, ty, CLASSES, origin))


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(target: Path, url: str = URL, md5: str = MD5, timeout: float = 30) -> None:
    """Download to a temporary file, check the checksum, then move into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as partial:  # kept only when whole and checked
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, \
                    open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise DataError(f"cannot download CIFAR-10 from {url} ({exc}). "
                            + OFFLINE_HINT.format(archive=ARCHIVE, folder=FOLDER,
                                                  cache=target.parent)) from None
        actual = md5sum(partial)
        if actual != md5:
            raise DataError(f"downloaded CIFAR-10 has MD5 {actual}, expected {md5}: the "
                            "download is corrupt or was tampered with; nothing was kept")


def load_cifar10(source: Any, spec_dir: Path) -> SourceData:
    """From `source.path` (folder or .tar.gz), else from the cache, downloading on request."""
    if source.path is not None:
        path = (spec_dir / Path(source.path).expanduser())
        candidates = [path, path / FOLDER, path / ARCHIVE]
    else:
        cache = cache_dir() / "cifar10"
        candidates = [cache / FOLDER, cache / ARCHIVE]
    for candidate in candidates:
        if candidate.is_dir() and any((candidate / n).exists()
                                      for n in [*TRAIN_BATCHES, TEST_BATCH]):
            return _from_folder(candidate)
        if candidate.is_file():
            return _from_archive(candidate)
    if source.path is None and source.download:
        archive = cache_dir() / "cifar10" / ARCHIVE
        download(archive)
        return _from_archive(archive)
    where = candidates[0].parent if source.path is None else candidates[0]
    message = f"CIFAR-10 not found at {where}. " + OFFLINE_HINT.format(
        archive=ARCHIVE, folder=FOLDER, cache=cache_dir() / "cifar10")
    if source.path is None:
        message += " Or set data.source.download: true to fetch it (163 MB)."
    raise DataError(message)
