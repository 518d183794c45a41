"""Image folders with one subfolder per class (Keras `flow_from_directory`, torchvision
`ImageFolder`): PNG and JPEG, resized to the model's input with bilinear filtering.

Classes are the subfolder names in sorted order. Folders whose decoded images fit in
:data:`IN_MEMORY_BYTES` are decoded once; larger ones are decoded batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specforge.data.sources import DataError, Dataset, SourceData

EXTENSIONS = (".jpeg", ".jpg", ".png")
#: Decoded folders up to this size are held in memory; larger ones are streamed.
IN_MEMORY_BYTES = 1 << 30


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders need Pillow: pip install pillow") from None
    return Image


class ImageFiles:
    """A lazy (N, H, W, C) uint8 array over image files: indexing decodes the files."""

    def __init__(self, paths: Sequence[Path], shape: tuple[int, int, int]) -> None:
        self.paths = list(paths)
        self.image_shape = shape

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *self.image_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> np.ndarray:
        indices = np.arange(len(self.paths))[index]
        if np.ndim(indices) == 0:
            return decode(self.paths[int(indices)], self.image_shape)
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        for i, j in enumerate(indices):
            out[i] = decode(self.paths[int(j)], self.image_shape)
        return out

    def subset(self, indices: np.ndarray) -> ImageFiles:
        return ImageFiles([self.paths[int(i)] for i in indices], self.image_shape)


def decode(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """One image as uint8 (H, W, C), resized (bilinear) to ``shape``."""
    image_module = _pil()
    height, width, channels = shape
    try:
        with image_module.open(path) as image:
            if image.mode.startswith("I;16"):  # 16-bit grayscale: scale, don't clip
                eight_bit = np.round(np.asarray(image, np.float64) / 257).astype(np.uint8)
                image = image_module.fromarray(eight_bit, "L")
            elif image.mode in ("I", "F"):
                raise DataError(f"{path}: 32-bit images (mode {image.mode}) are not "
                                "supported; save it as 8-bit PNG or JPEG")
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), image_module.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    # a DecompressionBombError is Pillow's refusal of an image of too many pixels
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return array.reshape(shape)


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[Path], np.ndarray, list[str]]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{folder} has no class subfolders: put each class's images in "
                        f"{folder}/<class name>/")
    if classes is not None and found != classes:
        raise DataError(f"{folder} has classes {found}, but the training folder has {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        files = sorted(p for p in (folder / name).rglob("*")
                       if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"class folder {folder / name} holds no PNG or JPEG images")
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, np.int64), found


def _check_modes(paths: list[Path], channels: int) -> None:
    """Read headers only: unreadable files and grayscale mixed with colour fail early."""
    image_module = _pil()
    first: dict[str, Path] = {}
    for path in paths:
        try:
            with image_module.open(path) as image:
                mode = "gray" if image.mode in ("1", "L", "I;16", "I", "F", "LA") else "color"
        except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        first.setdefault(mode, path)
    if len(first) > 1:
        raise DataError(f"grayscale and colour images are mixed: {first['gray']} is grayscale, "
                        f"{first['color']} is colour; convert them to one kind")
    if "gray" in first and channels == 3:
        raise DataError(f"the images are grayscale (e.g. {first['gray']}) but the model's "
                        "input has 3 channels: set model.input to [H, W, 1]")


def _dataset(folder: Path, shape: tuple[int, int, int], classes: list[str] | None) -> Dataset:
    paths, labels, names = _scan(folder, classes)
    _check_modes(paths, shape[2])
    files = ImageFiles(paths, shape)
    images: Any = files
    if len(paths) * int(np.prod(shape)) <= IN_MEMORY_BYTES:
        images = files[:]
    return Dataset(images, labels, names, str(folder))


def load_image_folders(source: Any, input_shape: Sequence[int], spec_dir: Path) -> SourceData:
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    train = _dataset(spec_dir / source.train, shape, None)
    test = _dataset(spec_dir / source.test, shape, train.class_names) if source.test else None
    return SourceData(train, test)
