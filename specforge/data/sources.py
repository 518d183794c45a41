"""Where images come from: CIFAR-10, image folders, .npz, scikit-learn digits, synthetic.

Each source returns :class:`Dataset` objects holding uint8 images ``(N, H, W, C)`` (or, for
image folders too large for memory, a lazy :class:`ImageFiles` array) and int64 labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from specforge.errors import UsageError


class DataError(UsageError):
    """Bad or missing data: names the file and says what would work (exit code 2)."""


class ImageArray(Protocol):
    """What a dataset's images must support: a length, a shape and fancy indexing."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...
    def __getitem__(self, index: Any) -> np.ndarray: ...


@dataclass
class Dataset:
    """Images and integer labels of one part of a source (train or test)."""

    images: ImageArray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    #: Where the images came from, for messages.
    origin: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Dataset:
        images = self.images[indices] if isinstance(self.images, np.ndarray) else \
            self.images.subset(indices)  # type: ignore[attr-defined]
        return Dataset(images, self.labels[indices], self.class_names, self.origin)


@dataclass
class SourceData:
    """A source's training data and, when it has one, its own test set."""

    train: Dataset
    test: Dataset | None = None


def load_source(source: Any, input_shape: Sequence[int], spec_dir: Path,
                seed: int) -> SourceData:
    """Load the spec's `data.source`; relative paths are relative to the spec's folder."""
    kind = source.type
    if kind == "cifar10":
        from specforge.data.cifar import load_cifar10

        return load_cifar10(source, spec_dir)
    if kind == "image_folder":
        from specforge.data.folders import load_image_folders

        return load_image_folders(source, input_shape, spec_dir)
    if kind == "npz":
        return _load_npz(spec_dir / source.path, source.x_key, source.y_key)
    if kind == "digits":
        return _load_digits()
    if kind == "synthetic":
        return _synthetic(source.samples, source.classes, tuple(input_shape), seed)
    raise DataError(f"unknown data source {kind!r}")


def _load_npz(path: Path, x_key: str, y_key: str) -> SourceData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (x_key, y_key) if k not in archive.files]
            if missing:
                raise DataError(f"{path}: no array named {', '.join(missing)}; it holds "
                                f"{', '.join(archive.files) or 'nothing'}")
            parts = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    train = _npz_dataset(parts[x_key], parts[y_key], f"{path}:{x_key}")
    test = None
    if f"{x_key}_test" in parts and f"{y_key}_test" in parts:
        test = _npz_dataset(parts[f"{x_key}_test"], parts[f"{y_key}_test"],
                            f"{path}:{x_key}_test")
    return SourceData(train, test)


def _npz_dataset(x: np.ndarray, y: np.ndarray, origin: str) -> Dataset:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{origin}: expected images (N, H, W, C) and labels (N,), got "
                        f"{x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{origin}: labels must be integers, got {y.dtype}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or x.min() < 0 or x.max() > 255:
            raise DataError(f"{origin}: images must be uint8 or numbers in 0..255")
        x = x.astype(np.uint8) if np.all(x == np.round(x)) else x.astype(np.float32)
    return Dataset(x, y.astype(np.int64), [], origin)


def _load_digits() -> SourceData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn: pip install scikit-learn") \
            from None
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # pixel values 0..16
    return SourceData(Dataset(images, digits.target.astype(np.int64),
                              [str(i) for i in range(10)], "sklearn digits"))


def _synthetic(samples: int, classes: int, shape: tuple[int, ...], seed: int) -> SourceData:
    """Images that are noisy copies of one random prototype per class: learnable, and
    generated from the seed alone."""
    rng = np.random.default_rng([seed, 0x5E7])
    prototypes = rng.integers(0, 256, (classes, *shape)).astype(np.float32)
    labels = rng.integers(0, classes, samples)
    noise = rng.normal(0, 40, (samples, *shape))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return SourceData(Dataset(images, labels.astype(np.int64),
                              [f"class_{i}" for i in range(classes)], "synthetic"))
