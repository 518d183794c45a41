"""The data pipeline: sources, splits, determinism and augmentation numerics.

All data is built in ``tmp_path``; nothing is downloaded (``urlopen`` is monkeypatched
wherever a download could start).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
import textwrap
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specforge.compiler import compile_spec
from specforge.data import DataError, augment, build_pipeline, cifar, folders
from specforge.data.augment import AugmentParams
from specforge.data.pipeline import split_indices
from specforge.data.sources import load_source
from specforge.spec.data import Augment, DigitsSource, SyntheticSource

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
DIGITS = SPECS / "digits.yaml"
AUGMENT = ["data.augment.rotation=15", "data.augment.width_shift=0.1",
           "data.augment.height_shift=0.1", "data.augment.horizontal_flip=true"]


# --------------------------------------------------------------------------- helpers


def write_spec(folder: Path, data: str, input_shape: tuple[int, ...] = (8, 8, 1),
               units: int = 10, name: str = "spec.yaml") -> Path:
    """A tiny model with ``units`` softmax outputs and the given `data:` section."""
    text = textwrap.dedent(f"""\
        seed: 0
        model:
          input: {list(input_shape)}
          layers:
            - {{type: conv2d, filters: 2, kernel: 3}}
            - {{type: flatten}}
            - {{type: dense, units: {units}, activation: softmax}}
        loss: {{type: cross_entropy}}
        optimizer: {{type: sgd}}
        data:
        """) + textwrap.indent(data, "  ") + "\n"
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def pipeline_for(spec: Path, overrides: tuple[str, ...] | list[str] = ()):
    return build_pipeline(compile_spec(spec, overrides), spec.parent)


def source_of(spec: Path):
    """The spec's source as loaded (before the split), train and test."""
    program = compile_spec(spec)
    return load_source(program.spec.data.source, tuple(program.graph.input.shape),
                       spec.parent, program.seed)


def q(path: Path) -> str:
    """A path as a quoted YAML scalar."""
    return json.dumps(str(path))


def error_of(call, tmp_path: Path) -> str:
    """The DataError message of ``call()``, with tmp_path (which holds the test's name, so
    could match by accident) replaced by ``<tmp>``."""
    with pytest.raises(DataError) as info:
        call()
    return str(info.value).replace(str(tmp_path), "<tmp>")


def forbid_urlopen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", urlopen)
    return calls


# --------------------------------------------------------------------------- CIFAR-10

N = 20  # images per fake batch
BATCHES = [*cifar.TRAIN_BATCHES, cifar.TEST_BATCH]
#: (batch, image, row, col, channel) of the one pixel of value 255 in a batch.
MARKS = {"data_batch_3": (7, 5, 17, 2), "test_batch": (4, 31, 0, 0)}


def batch_labels(b: int) -> list[int]:
    return [(3 * i + b) % 10 for i in range(N)]


def make_cifar(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A fake `cifar-10-batches-py/` in the official format; returns it and the raw data."""
    folder = root / cifar.FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw = {}
    for b, name in enumerate(BATCHES):
        data = rng.integers(0, 255, (N, 3072), dtype=np.uint8)  # 0..254: 255 marks a pixel
        if name in MARKS:
            image, row, col, channel = MARKS[name]
            data[image, channel * 1024 + row * 32 + col] = 255
        batch = {b"batch_label": f"batch {b + 1}".encode(), b"labels": batch_labels(b),
                 b"data": data, b"filenames": [f"img_{b}_{i}.png".encode() for i in range(N)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        raw[name] = data
    return folder, raw


def make_archive(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=cifar.FOLDER)
    return target


def cifar_spec(folder: Path, source: str) -> Path:
    return write_spec(folder, f"source: {source}", (32, 32, 3), 10)


class Booby:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def fake_cifar(tmp_path: Path):
    folder, raw = make_cifar(tmp_path / "data")
    return folder, raw


def check_cifar(source) -> None:
    train, test = source.train, source.test
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (20, 32, 32, 3)
    # the marked pixel lands at (row, col, channel) of the right image
    assert np.argwhere(train.images == 255).tolist() == [[2 * N + 7, 5, 17, 2]]
    assert np.argwhere(test.images == 255).tolist() == [[4, 31, 0, 0]]
    assert train.labels.tolist() == [y for b in range(5) for y in batch_labels(b)]
    assert test.labels.tolist() == batch_labels(5)
    assert train.labels.dtype == np.int64
    assert train.class_names == test.class_names == cifar.CLASSES
    assert cifar.CLASSES[:3] == ["airplane", "automobile", "bird"] and len(cifar.CLASSES) == 10


def test_cifar_folder_pixels_labels_and_sizes(tmp_path, fake_cifar):
    folder, raw = fake_cifar
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(folder)}}}")
    source = source_of(spec)
    check_cifar(source)
    # every pixel: channel-major rows of 1024, each row-major 32 x 32
    rng = np.random.default_rng(1)
    for _ in range(200):
        n, row, col, ch = (int(v) for v in rng.integers(0, [100, 32, 32, 3]))
        expected = raw[cifar.TRAIN_BATCHES[n // N]][n % N, ch * 1024 + row * 32 + col]
        assert source.train.images[n, row, col, ch] == expected
    pipeline = pipeline_for(spec)
    assert len(pipeline.train) == 100 and len(pipeline.test) == 20
    assert pipeline.validation is None
    assert pipeline.train.class_names == cifar.CLASSES


def test_cifar_path_may_name_the_parent_folder(tmp_path, fake_cifar):
    folder, _ = fake_cifar
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(folder.parent)}}}")
    check_cifar(source_of(spec))


def test_cifar_tar_gz(tmp_path, fake_cifar):
    folder, _ = fake_cifar
    archive = make_archive(folder, tmp_path / "cifar.tar.gz")
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(archive)}}}")
    check_cifar(source_of(spec))
    pipeline = pipeline_for(spec)
    assert (len(pipeline.train), len(pipeline.test)) == (100, 20)


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_cifar_from_the_cache(tmp_path, fake_cifar, monkeypatch, layout):
    folder, _ = fake_cifar
    cache = tmp_path / "cache"
    (cache / "cifar10").mkdir(parents=True)
    if layout == "folder":
        folder.rename(cache / "cifar10" / cifar.FOLDER)
    else:
        make_archive(folder, cache / "cifar10" / cifar.ARCHIVE)
    monkeypatch.setenv("SPECFORGE_CACHE", str(cache))
    calls = forbid_urlopen(monkeypatch)
    check_cifar(source_of(cifar_spec(tmp_path, "{type: cifar10}")))
    assert calls == []


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_booby_trapped_pickle_is_refused(tmp_path, fake_cifar, layout):
    folder, _ = fake_cifar
    marker = tmp_path / "pwned"
    trap = {b"labels": [0] * N, b"data": Booby(marker), b"batch_label": b"x"}
    (folder / "data_batch_1").write_bytes(pickle.dumps(trap, protocol=2))
    path = folder if layout == "folder" else make_archive(folder, tmp_path / "c.tar.gz")
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(path)}}}")
    message = error_of(lambda: source_of(spec), tmp_path)
    assert "data_batch_1" in message and "system" in message
    assert not marker.exists()


BAD_LABELS = {
    "strings": ["cat"] * N, "nested lists": [[1], [2, 3]] + [[0]] * (N - 2),
    "2**70": [2**70] + [0] * (N - 1), "a (N, 2) array": np.zeros((N, 2), np.int64),
    "None": None, "floats": [1.5] * N, "booleans": [True] * N,
}


@pytest.mark.parametrize("labels", BAD_LABELS, ids=lambda k: k.replace(" ", "-"))
def test_cifar_labels_that_are_not_integers_are_refused(tmp_path, fake_cifar, labels):
    """Each used to escape read_batch as a ValueError, OverflowError or TypeError; floats
    were truncated (1.5 read as 1)."""
    folder, raw = fake_cifar
    batch = {b"labels": BAD_LABELS[labels], b"data": raw["data_batch_2"]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(folder)}}}")
    message = error_of(lambda: source_of(spec), tmp_path)
    assert "<tmp>/data/cifar-10-batches-py/data_batch_2" in message and "labels" in message


def test_cifar_labels_may_be_a_numpy_array(tmp_path, fake_cifar):
    folder, raw = fake_cifar
    labels = np.array(batch_labels(1), np.uint8)
    batch = {b"labels": labels, b"data": raw["data_batch_2"]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    check_cifar(source_of(cifar_spec(tmp_path, f"{{type: cifar10, path: {q(folder)}}}")))


def test_truncated_archive(tmp_path, fake_cifar):
    folder, _ = fake_cifar
    archive = make_archive(folder, tmp_path / "cifar.tar.gz")
    whole = archive.read_bytes()
    archive.write_bytes(whole[:len(whole) // 2])
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(archive)}}}")
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        source_of(spec)
    assert str(archive) in str(info.value)


def test_archive_that_is_not_gzip(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    archive.write_bytes(b"<html>not found</html>")
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(archive)}}}")
    with pytest.raises(DataError, match="truncated or corrupt"):
        source_of(spec)


@pytest.mark.parametrize("missing", ["data_batch_1", "data_batch_3", "data_batch_5"])
@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_missing_batch_is_named(tmp_path, fake_cifar, missing, layout):
    folder, _ = fake_cifar
    (folder / missing).unlink()
    path = folder if layout == "folder" else make_archive(folder, tmp_path / "c.tar.gz")
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(path)}}}")
    assert missing in error_of(lambda: source_of(spec), tmp_path)


def test_missing_test_batch_is_named(tmp_path, fake_cifar):
    folder, _ = fake_cifar
    (folder / "test_batch").unlink()
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(folder)}}}")
    assert "test_batch" in error_of(lambda: source_of(spec), tmp_path)


def test_missing_archive_member_is_named(tmp_path, fake_cifar):
    folder, _ = fake_cifar
    (folder / "test_batch").unlink()
    archive = make_archive(folder, tmp_path / "c.tar.gz")
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(archive)}}}")
    assert "test_batch is missing" in error_of(lambda: source_of(spec), tmp_path)


def cifar_pickle() -> bytes:
    data = np.zeros((2, 3072), np.uint8)
    return pickle.dumps({b"labels": [1, 2], b"data": data}, protocol=2)


@pytest.mark.parametrize("raw", [
    pytest.param(b"", id="empty"),
    pytest.param(b"<!DOCTYPE html><html></html>", id="html"),
    pytest.param(cifar_pickle()[:3000], id="truncated"),
    pytest.param(pickle.dumps([1, 2, 3], protocol=2), id="not-a-dict"),
    pytest.param(pickle.dumps({b"labels": [1], b"data": np.zeros((1, 100), np.uint8)},
                              protocol=2), id="wrong-shape"),
    pytest.param(pickle.dumps({b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)},
                              protocol=2), id="label-10"),
    pytest.param(cifar_pickle().replace(b"latin1", b"matin1", 1), id="bad-codec-name"),
    pytest.param(b"\x80\x02\x96" + b"\xff" * 8, id="huge-length"),
])
def test_corrupt_batch_gives_data_error(raw):
    with pytest.raises(DataError, match="where/data_batch_1"):
        cifar.read_batch(raw, "where/data_batch_1")


def test_missing_cifar_says_where_to_put_it(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("SPECFORGE_CACHE", str(cache))
    calls = forbid_urlopen(monkeypatch)
    spec = cifar_spec(tmp_path, "{type: cifar10}")
    assert compile_spec(spec).spec.data.source.download is False
    with pytest.raises(DataError) as info:
        pipeline_for(spec)
    message = str(info.value)
    assert str(cache / "cifar10") in message
    assert cifar.ARCHIVE in message and cifar.FOLDER in message
    assert "specs/digits.yaml" in message
    assert "download: true" in message
    assert calls == []
    assert list(cache.rglob("*")) == []


def test_missing_cifar_at_a_path_does_not_suggest_download(tmp_path, monkeypatch):
    forbid_urlopen(monkeypatch)
    spec = cifar_spec(tmp_path, f"{{type: cifar10, path: {q(tmp_path / 'nope')}, "
                                "download: true}")
    with pytest.raises(DataError) as info:
        source_of(spec)
    assert "download: true" not in str(info.value)


def test_download_network_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECFORGE_CACHE", str(cache))

    def urlopen(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", urlopen)
    spec = cifar_spec(tmp_path, "{type: cifar10, download: true}")
    with pytest.raises(DataError, match="cannot download") as info:
        source_of(spec)
    assert str(cache / "cifar10") in str(info.value)
    assert "specs/digits.yaml" in str(info.value)
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no temporary file left
    assert not (cache / "cifar10" / cifar.ARCHIVE).exists()


class BreaksMidway(io.BytesIO):
    def read(self, size=-1):
        if self.tell() > 0:
            raise urllib.error.URLError("connection reset")
        return super().read(10)


def test_download_broken_midway_leaves_no_part_file(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.urllib.request, "urlopen",
                        lambda url, timeout=None: BreaksMidway(b"x" * 100))
    target = tmp_path / "dl" / cifar.ARCHIVE
    with pytest.raises(DataError, match=re.escape(str(target.parent))):
        cifar.download(target, url="http://example.invalid/c.tgz")
    assert sorted(p.name for p in target.parent.iterdir()) == []


def test_download_md5_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(b"not cifar at all"))
    target = tmp_path / "dl" / cifar.ARCHIVE
    with pytest.raises(DataError, match="MD5"):
        cifar.download(target, url="http://example.invalid/c.tgz")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_download_with_matching_md5(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 4100  # more than one 1 MiB chunk
    monkeypatch.setattr(cifar.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(payload))
    target = tmp_path / "dl" / cifar.ARCHIVE
    cifar.download(target, url="http://example.invalid/c.tgz",
                   md5=hashlib.md5(payload).hexdigest())
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == [cifar.ARCHIVE]


def test_download_true_checks_the_md5(tmp_path, fake_cifar, monkeypatch):
    """download: true fetches into the cache, and a file with the wrong MD5 is not kept."""
    folder, _ = fake_cifar
    payload = make_archive(folder, tmp_path / "served.tar.gz").read_bytes()
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECFORGE_CACHE", str(cache))
    urls = []

    def urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(cifar.urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError, match="MD5"):
        source_of(cifar_spec(tmp_path, "{type: cifar10, download: true}"))
    assert urls == [cifar.URL]
    assert [p for p in cache.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------- image folders


def write_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB",
                seed: int = 0) -> np.ndarray:
    """A random image of ``size`` (width, height); returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)
    return pixels


def make_folders(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    seed = 0
    for part, count in (("train", per_class), ("test", 1)):
        for name in classes:
            for i in range(count):
                size = (10, 12) if i % 2 else (8, 8)  # some need resizing
                write_image(root / part / name / f"{i}.png", size, seed=seed)
                seed += 1


def folder_spec(root: Path, source: str = "{type: image_folder, train: train, test: test}",
                units: int = 2, channels: int = 3, extra: str = "") -> Path:
    return write_spec(root, f"source: {source}\n{extra}", (8, 8, channels), units)


def test_image_folders(tmp_path):
    make_folders(tmp_path)
    source = source_of(folder_spec(tmp_path))
    train, test = source.train, source.test
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 1]
    assert isinstance(train.images, np.ndarray)
    assert train.images.shape == (6, 8, 8, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (2, 8, 8, 3)
    # an 8x8 image is read as is; a 10x12 one is resized (bilinear) to 8x8
    exact = np.asarray(Image.open(tmp_path / "train/cat/0.png"))
    np.testing.assert_array_equal(train.images[0], exact)
    with Image.open(tmp_path / "train/cat/1.png") as image:
        assert image.size == (10, 12)
        resized = np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(train.images[1], resized)
    pipeline = pipeline_for(folder_spec(tmp_path))
    assert (len(pipeline.train), len(pipeline.test)) == (6, 2)


def test_resize_to_a_non_square_input(tmp_path):
    path = tmp_path / "a.png"
    write_image(path, (10, 12))
    out = folders.decode(path, (8, 6, 3))  # height 8, width 6
    with Image.open(path) as image:
        expected = np.asarray(image.resize((6, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_sixteen_bit_png_is_not_saturated(tmp_path):
    path = tmp_path / "deep.png"
    pixels = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    try:
        out = folders.decode(path, (8, 8, 1))[..., 0]
    except DataError:
        return  # refusing it is fine too
    np.testing.assert_allclose(out, pixels / 257, atol=1)


def test_truncated_png_is_named(tmp_path):
    path = tmp_path / "cut.png"
    write_image(path, (64, 64))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=re.escape(str(path))):
        folders.decode(path, (8, 8, 3))


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header declares width x height 8-bit gray pixels
    (Pillow judges an image's size by its header, before it decodes anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_named(tmp_path):
    """A 20000x20000 PNG (400 million pixels, over Pillow's default limit: nothing lowers
    it here) is refused as bad data naming the file, in decode and in an image folder."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS * 2 < 20000 ** 2
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError, match=re.escape(str(bomb)) + ".*decompression bomb"):
        folders.decode(bomb, (8, 8, 1))
    write_image(tmp_path / "train/a/0.png", (8, 8), "L")
    png_declaring(tmp_path / "train/b/0.png", 20000, 20000)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train/b/0.png"))):
        source_of(folder_spec(tmp_path, "{type: image_folder, train: train}", channels=1))


def test_grayscale_folders_for_one_channel(tmp_path):
    write_image(tmp_path / "train/a/0.png", (8, 8), "L")
    write_image(tmp_path / "train/b/0.png", (9, 9), "L", seed=1)
    source = source_of(folder_spec(tmp_path, "{type: image_folder, train: train}",
                                   channels=1))
    assert source.train.images.shape == (2, 8, 8, 1) and source.test is None
    with pytest.raises(DataError, match=r"grayscale.*\[H, W, 1\]"):
        source_of(folder_spec(tmp_path, "{type: image_folder, train: train}", channels=3))


def test_empty_class_folder(tmp_path):
    make_folders(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train" / "bird"))):
        source_of(folder_spec(tmp_path, units=3))


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        source_of(folder_spec(tmp_path, "{type: image_folder, train: train}"))


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        source_of(folder_spec(tmp_path, "{type: image_folder, train: nowhere}"))


def test_corrupt_png_is_named(tmp_path):
    make_folders(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    with pytest.raises(DataError, match=re.escape(str(bad))):
        source_of(folder_spec(tmp_path))


def test_grayscale_mixed_with_rgb(tmp_path):
    make_folders(tmp_path)
    gray = tmp_path / "train" / "dog" / "gray.png"
    write_image(gray, (8, 8), "L")
    with pytest.raises(DataError) as info:
        source_of(folder_spec(tmp_path))
    message = str(info.value)
    assert "grayscale" in message and "colour" in message
    assert str(gray) in message


def test_test_folder_with_other_classes(tmp_path):
    make_folders(tmp_path)
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "wolf")
    message = error_of(lambda: source_of(folder_spec(tmp_path)), tmp_path)
    assert "wolf" in message and "'cat', 'dog'" in message


def test_streamed_folders_give_the_same_batches(tmp_path, monkeypatch):
    make_folders(tmp_path, per_class=5)
    extra = "split: {validation: 0.2}\nbatch_size: 3"
    spec = folder_spec(tmp_path, extra=extra)
    in_memory = pipeline_for(spec, AUGMENT)
    assert isinstance(in_memory.train.images, np.ndarray)
    monkeypatch.setattr(folders, "IN_MEMORY_BYTES", 0)
    assert isinstance(source_of(spec).train.images, folders.ImageFiles)
    streamed = pipeline_for(spec, AUGMENT)
    assert isinstance(streamed.train.images, folders.ImageFiles)
    assert isinstance(streamed.test.images, folders.ImageFiles)
    assert streamed.train.images.shape == in_memory.train.images.shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(streamed.train.images[np.arange(8)], in_memory.train.images)
    for a, b in zip(streamed.train_batches(0, 6), in_memory.train_batches(0, 6), strict=True):
        assert a.x.tobytes() == b.x.tobytes() and np.array_equal(a.y, b.y)
    for split in ("validation", "test"):
        pairs = zip(streamed.eval_batches(split), in_memory.eval_batches(split), strict=True)
        for a, b in pairs:
            assert a.x.tobytes() == b.x.tobytes() and np.array_equal(a.y, b.y)


# --------------------------------------------------------------------------- npz, digits, ...


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def npz_arrays(n: int = 40, shape=(8, 8, 1), classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            (np.arange(n) % classes).astype(np.int64))


def test_npz(tmp_path):
    x, y = npz_arrays()
    tx, ty = npz_arrays(10, seed=1)
    write_npz(tmp_path / "d.npz", x=x, y=y, x_test=tx, y_test=ty)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}\nsplit: {validation: 0.25}")
    source = source_of(spec)
    np.testing.assert_array_equal(source.train.images, x)
    np.testing.assert_array_equal(source.train.labels, y)
    np.testing.assert_array_equal(source.test.images, tx)
    pipeline = pipeline_for(spec)
    assert (len(pipeline.train), len(pipeline.validation), len(pipeline.test)) == (30, 10, 10)


def test_own_test_set_and_split_test(tmp_path):
    x, y = npz_arrays()
    write_npz(tmp_path / "d.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}\nsplit: {test: 0.2}")
    with pytest.raises(DataError, match="has its own test set"):
        pipeline_for(spec)


def test_npz_other_keys_and_3d_images(tmp_path):
    x, y = npz_arrays()
    write_npz(tmp_path / "d.npz", images=x[..., 0], targets=y)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz, x_key: images, "
                                "y_key: targets}")
    source = source_of(spec)
    assert source.train.images.shape == (40, 8, 8, 1) and source.test is None


def test_npz_missing_key(tmp_path):
    x, y = npz_arrays()
    write_npz(tmp_path / "d.npz", x=x, labels=y)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}")
    with pytest.raises(DataError, match=r"no array named y; it holds .*labels"):
        source_of(spec)


def test_npz_missing_file(tmp_path):
    spec = write_spec(tmp_path, "source: {type: npz, path: missing.npz}")
    with pytest.raises(DataError, match=r"missing\.npz"):
        source_of(spec)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_labels_out_of_range(tmp_path, bad_label):
    x, y = npz_arrays()
    y[5] = bad_label
    write_npz(tmp_path / "d.npz", x=x, y=y)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}")
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        pipeline_for(spec)


def test_more_classes_than_outputs(tmp_path):
    make_folders(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(DataError, match="3 classes, more than the model's 2 outputs"):
        pipeline_for(folder_spec(tmp_path, units=2))


def test_image_shape_mismatch(tmp_path):
    x, y = npz_arrays(shape=(8, 8, 3))
    write_npz(tmp_path / "d.npz", x=x, y=y)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}", (8, 8, 1))
    with pytest.raises(DataError, match=r"\(8, 8, 3\).*model\.input is \[8, 8, 1\]"):
        pipeline_for(spec)


def test_digits_source():
    source = load_source(DigitsSource(type="digits"), (8, 8, 1), Path("."), 0)
    images = source.train.images
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16
    assert sorted(set(source.train.labels.tolist())) == list(range(10))
    assert source.test is None


def test_synthetic_source():
    kind = SyntheticSource(type="synthetic", samples=50, classes=3)
    a = load_source(kind, (6, 5, 2), Path("."), 7).train
    b = load_source(kind, (6, 5, 2), Path("."), 7).train
    c = load_source(kind, (6, 5, 2), Path("."), 8).train
    assert a.images.shape == (50, 6, 5, 2) and a.images.dtype == np.uint8
    assert set(a.labels.tolist()) <= {0, 1, 2} and a.class_names == ["class_0", "class_1",
                                                                      "class_2"]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_spec_without_data(tmp_path):
    spec = write_spec(tmp_path, "source: {type: digits}")
    spec.write_text(spec.read_text().split("data:")[0])
    with pytest.raises(DataError, match="no `data:` section"):
        pipeline_for(spec)


# --------------------------------------------------------------------------- splits


def check_partition(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize(("n", "sizes"), [(100, (80, 20)), (1797, (1438, 359)), (10, (8, 2))])
def test_split_80_20(n, sizes):
    labels = np.arange(n) % 10
    train, val, test = split_indices(labels, 0.2, 0.0, False, seed=0)
    assert (len(train), len(val), len(test)) == (*sizes, 0)
    check_partition([train, val, test], n)
    train, val, test = split_indices(labels, 0.0, 0.2, False, seed=0)  # as `test: 0.2`
    assert (len(train), len(val), len(test)) == (sizes[0], 0, sizes[1])
    check_partition([train, val, test], n)


def test_split_three_ways_is_deterministic():
    labels = np.random.default_rng(0).integers(0, 5, 500)
    a = split_indices(labels, 0.1, 0.2, False, seed=3)
    b = split_indices(labels, 0.1, 0.2, False, seed=3)
    c = split_indices(labels, 0.1, 0.2, False, seed=4)
    assert [len(p) for p in a] == [350, 50, 100]
    check_partition(a, 500)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    assert set(a[1].tolist()) != set(c[1].tolist())


def test_stratified_split_keeps_proportions():
    counts = [50, 23, 7, 91, 14, 3]
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(len(counts)), counts))
    train, val, test = split_indices(labels, 0.2, 0.1, True, seed=0)
    check_partition([train, val, test], len(labels))
    for c, count in enumerate(counts):
        assert abs(np.sum(labels[val] == c) - 0.2 * count) <= 1
        assert abs(np.sum(labels[test] == c) - 0.1 * count) <= 1
        assert np.sum(labels[train] == c) == count - np.sum(labels[val] == c) - np.sum(
            labels[test] == c)
    again = split_indices(labels, 0.2, 0.1, True, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((train, val, test), again, strict=True))


# --------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def digits_pipelines():
    return {
        "a": build_pipeline(compile_spec(DIGITS, AUGMENT), SPECS),
        "b": build_pipeline(compile_spec(DIGITS, AUGMENT), SPECS),
        "seed1": build_pipeline(compile_spec(DIGITS, [*AUGMENT, "seed=1"]), SPECS),
        "plain": build_pipeline(compile_spec(DIGITS), SPECS),
    }


def test_same_spec_same_batches(digits_pipelines):
    a, b = digits_pipelines["a"], digits_pipelines["b"]
    assert a.data.augment.rotation == 15 and a.data.augment.horizontal_flip
    assert (len(a.train), len(a.validation), len(a.test)) == (1259, 179, 359)
    for x, y in zip(a.train_batches(0, 6), b.train_batches(0, 6), strict=True):
        assert x.x.dtype == np.float32 and x.x.shape == (32, 8, 8, 1)
        assert x.x.tobytes() == y.x.tobytes() and x.y.tobytes() == y.y.tobytes()
    for split in ("validation", "test"):
        for x, y in zip(a.eval_batches(split), b.eval_batches(split), strict=True):
            assert x.x.tobytes() == y.x.tobytes() and x.y.tobytes() == y.y.tobytes()


def test_other_seed_other_batches(digits_pipelines):
    a, other = digits_pipelines["a"], digits_pipelines["seed1"]
    for x, y in zip(a.train_batches(0, 6), other.train_batches(0, 6), strict=True):
        assert x.x.tobytes() != y.x.tobytes()
    assert not np.array_equal(a.validation.labels, other.validation.labels)


def test_batches_are_random_access(digits_pipelines):
    a = digits_pipelines["a"]
    iterated = list(a.train_batches(0, 8))
    direct = a.train_batch(7)
    assert direct.x.tobytes() == iterated[7].x.tobytes()
    assert np.array_equal(direct.y, iterated[7].y)
    # a step of a later pass, reached directly
    step = a.batches_per_pass + 3
    assert a.train_batch(step).x.tobytes() == list(a.train_batches(step - 1, 2))[1].x.tobytes()


def test_batches_follow_the_documented_streams(digits_pipelines):
    """Batch b of pass p: order from rng([seed, SHUFFLE, p]), augmentation from
    rng([seed, AUGMENT, p, b]), as the pipeline module documents."""
    from specforge.data.pipeline import AUGMENT as AUG_KEY
    from specforge.data.pipeline import SHUFFLE

    a = digits_pipelines["a"]
    aug = a.data.augment
    for step in (0, 5, a.batches_per_pass + 2):
        p, b = divmod(step, a.batches_per_pass)
        order = np.random.default_rng([0, SHUFFLE, p]).permutation(len(a.train))
        indices = order[b * 32:(b + 1) * 32]
        images = a.train.images[indices].astype(np.float32)
        params = augment.draw_params(aug, 32, 8, 8, np.random.default_rng([0, AUG_KEY, p, b]))
        expected = augment.apply_augmentation(images, params, aug) * np.float32(0.0625)
        batch = a.train_batch(step)
        np.testing.assert_array_equal(batch.y, a.train.labels[indices])
        np.testing.assert_allclose(batch.x, expected, rtol=1e-6, atol=1e-6)


def test_each_pass_augments_afresh():
    pipeline = build_pipeline(compile_spec(DIGITS, [*AUGMENT, "data.shuffle=false"]), SPECS)
    first, again = pipeline.train_batch(1), pipeline.train_batch(pipeline.batches_per_pass + 1)
    assert np.array_equal(first.y, again.y)  # same images, unshuffled
    assert not np.array_equal(first.x, again.x)  # drawn anew


def test_each_pass_is_a_permutation(digits_pipelines):
    a, plain = digits_pipelines["a"], digits_pipelines["plain"]
    per_pass = a.batches_per_pass
    assert per_pass == -(-1259 // 32)
    orders = []
    for p in range(2):
        order = a.pass_order(p)
        assert np.array_equal(np.sort(order), np.arange(len(a.train)))
        labels = np.concatenate([b.y for b in a.train_batches(p * per_pass, per_pass)])
        np.testing.assert_array_equal(labels, a.train.labels[order])
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    # without augmentation, a pass gives exactly the (normalised) training images
    xs = np.concatenate([b.x for b in plain.train_batches(0, per_pass)])
    expected = plain.train.images[plain.pass_order(0)].astype(np.float32) * np.float32(0.0625)
    np.testing.assert_array_equal(xs, expected)
    # augmentation does not change the order or the labels, only the pixels
    first_aug, first_plain = a.train_batch(0), plain.train_batch(0)
    assert np.array_equal(first_aug.y, first_plain.y)
    assert not np.array_equal(first_aug.x, first_plain.x)


def test_normalisation():
    pipeline = build_pipeline(compile_spec(DIGITS, ["data.normalize.mean=0.5",
                                                    "data.normalize.std=0.25"]), SPECS)
    batch = pipeline.train_batch(0)
    indices = pipeline.pass_order(0)[:32]
    pixels = pipeline.train.images[indices].astype(np.float64)
    np.testing.assert_allclose(batch.x, (pixels * 0.0625 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    assert batch.x.dtype == np.float32
    first = next(pipeline.eval_batches("validation"))
    pixels = pipeline.validation.images[:32].astype(np.float64)
    np.testing.assert_allclose(first.x, (pixels * 0.0625 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_per_channel_normalisation(tmp_path):
    x, y = npz_arrays(12, shape=(8, 8, 3))
    write_npz(tmp_path / "d.npz", x=x, y=y)
    spec = write_spec(tmp_path, "source: {type: npz, path: d.npz}\n"
                                "normalize: {scale: 1.0, mean: [1, 2, 3], std: [2, 4, 8]}\n"
                                "batch_size: full\nshuffle: false", (8, 8, 3))
    pipeline = pipeline_for(spec)
    batch = pipeline.train_batch(0)
    expected = (pipeline.train.images.astype(np.float64) - [1, 2, 3]) / [2, 4, 8]
    np.testing.assert_allclose(batch.x, expected, rtol=1e-6)
    assert batch.x.shape == (12, 8, 8, 3)


# --------------------------------------------------------------------------- augmentation


def make_params(n: int, **values) -> AugmentParams:
    base = {"angle": 0.0, "shift_y": 0.0, "shift_x": 0.0, "zoom_y": 1.0, "zoom_x": 1.0,
            "flip_h": False, "flip_v": False, "crop_y": 0, "crop_x": 0}
    base.update(values)
    return AugmentParams(**{k: np.broadcast_to(np.asarray(v), (n,)).copy()
                            for k, v in base.items()})


def images_of(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
def test_identity_parameters_return_the_input(fill_mode):
    aug = Augment(rotation=30, width_shift=0.2, height_shift=0.2, zoom=0.2,
                  horizontal_flip=True, vertical_flip=True, crop_padding=2,
                  fill_mode=fill_mode, fill_value=99)
    images = images_of((3, 7, 9, 2))
    out = augment.apply_augmentation(images, make_params(3), aug)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize(("degrees", "k"), [(90, 1), (-90, -1), (180, 2)])
def test_rotation_by_quarter_turns(degrees, k):
    aug = Augment(rotation=180, fill_mode="constant")
    images = images_of((2, 6, 6, 3))
    out = augment.apply_augmentation(images, make_params(2, angle=np.deg2rad(degrees)), aug)
    np.testing.assert_allclose(out, np.rot90(images, k=k, axes=(1, 2)), atol=1e-4)


def test_positive_angle_turns_counter_clockwise():
    image = np.zeros((1, 5, 5, 1), np.float32)
    image[0, 0, 4, 0] = 1  # top right
    out = augment.apply_augmentation(image, make_params(1, angle=np.pi / 2), Augment(rotation=90))
    assert np.unravel_index(np.argmax(out), out.shape) == (0, 0, 0, 0)  # now top left


@pytest.mark.parametrize("fill_value", [0.0, 7.0])
def test_integer_shift_with_constant_fill(fill_value):
    aug = Augment(width_shift=0.5, height_shift=0.5, fill_mode="constant",
                  fill_value=fill_value)
    images = images_of((2, 6, 7, 2))
    out = augment.apply_augmentation(images, make_params(2, shift_x=2, shift_y=-1), aug)
    # content moves 2 right and 1 up
    expected = np.roll(np.roll(images, 2, axis=2), -1, axis=1)
    expected[:, :, :2] = fill_value
    expected[:, -1:, :] = fill_value
    np.testing.assert_array_equal(out, expected)


def row_image(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(1, 1, -1, 1)


@pytest.mark.parametrize(("mode", "shift", "expected"), [
    # a b c d e shifted right by 2: the two new columns come from beyond the left edge
    ("reflect", 2, [2, 1, 1, 2, 3]),    # dcba|abcd: mirrored including the edge pixel
    ("reflect", -2, [3, 4, 5, 5, 4]),
    ("nearest", 2, [1, 1, 1, 2, 3]),    # the edge pixel repeated
    ("nearest", -2, [3, 4, 5, 5, 5]),
    ("constant", 2, [0, 0, 1, 2, 3]),
])
def test_fill_modes_at_the_border(mode, shift, expected):
    aug = Augment(width_shift=0.5, fill_mode=mode)
    out = augment.apply_augmentation(row_image([1, 2, 3, 4, 5]), make_params(1, shift_x=shift), aug)
    np.testing.assert_array_equal(out, row_image(expected))


def test_reflect_over_more_than_one_width():
    # ...abcd dcba | abcd | dcba abcd...: period 2 * width
    aug = Augment(width_shift=0.9, fill_mode="reflect")
    out = augment.apply_augmentation(row_image([1, 2, 3, 4]), make_params(1, shift_x=6), aug)
    np.testing.assert_array_equal(out, row_image([3, 4, 4, 3]))


def test_reflect_vertically():
    aug = Augment(height_shift=0.5, fill_mode="reflect")
    column = np.asarray([1, 2, 3, 4], np.float32).reshape(1, 4, 1, 1)
    out = augment.apply_augmentation(column, make_params(1, shift_y=1), aug)
    np.testing.assert_array_equal(out.ravel(), [1, 1, 2, 3])


def test_flips():
    images = images_of((2, 5, 6, 3))
    out = augment.apply_augmentation(images, make_params(2, flip_h=[True, False]),
                        Augment(horizontal_flip=True))
    np.testing.assert_array_equal(out[0], images[0, :, ::-1])
    np.testing.assert_array_equal(out[1], images[1])
    out = augment.apply_augmentation(images, make_params(2, flip_v=True),
                                     Augment(vertical_flip=True))
    np.testing.assert_array_equal(out, images[:, ::-1])
    out = augment.apply_augmentation(images, make_params(2, flip_h=True),
                                     Augment(horizontal_flip=True))
    np.testing.assert_array_equal(out, images[:, :, ::-1])


def test_crop_is_a_zero_filled_integer_shift():
    images = images_of((2, 6, 7, 2)) + 1  # no zeros inside
    out = augment.apply_augmentation(images, make_params(2, crop_y=2, crop_x=-1),
                                     Augment(crop_padding=3))
    # out[i, j] = images[i + 2, j - 1]
    expected = np.roll(np.roll(images, -2, axis=1), 1, axis=2)
    expected[:, -2:] = 0
    expected[:, :, :1] = 0
    np.testing.assert_array_equal(out, expected)
    shifted = augment.apply_augmentation(images, make_params(2, shift_y=-2, shift_x=1),
                            Augment(width_shift=0.5, fill_mode="constant"))
    np.testing.assert_array_equal(out, shifted)


def test_flip_comes_before_crop():
    images = images_of((1, 4, 5, 1)) + 1
    aug = Augment(horizontal_flip=True, crop_padding=1)
    out = augment.apply_augmentation(images, make_params(1, flip_h=True, crop_x=1), aug)
    flipped = images[:, :, ::-1]
    np.testing.assert_array_equal(out[:, :, :-1], flipped[:, :, 1:])
    np.testing.assert_array_equal(out[:, :, -1], 0)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
def test_sampling_in_chunks_gives_the_bits_of_one_pass(monkeypatch, fill_mode):
    """Chunks that start and end inside images (37 pixels of 9x10 ones) see each pixel's
    own image: the same bits as sampling the batch in one chunk."""
    aug = Augment(rotation=40, width_shift=0.3, height_shift=0.3, zoom=0.3,
                  fill_mode=fill_mode, fill_value=7)
    images = images_of((3, 9, 10, 2))
    params = augment.draw_params(aug, 3, 9, 10, np.random.default_rng(5))
    monkeypatch.setattr(augment, "CHUNK_PIXELS", 10**9)
    whole = augment.apply_augmentation(images, params, aug)
    monkeypatch.setattr(augment, "CHUNK_PIXELS", 37)
    chunked = augment.apply_augmentation(images, params, aug)
    assert not np.array_equal(whole, images)
    assert whole.tobytes() == chunked.tobytes()


def test_zero_ranges_draw_identity_parameters():
    params = augment.draw_params(Augment(), 64, 8, 8, np.random.default_rng(0))
    identity = make_params(64)
    for name in AugmentParams.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(params, name), getattr(identity, name),
                                      err_msg=name)
    assert augment.is_identity(Augment())


def test_draws_respect_the_ranges():
    aug = Augment(rotation=15, width_shift=0.1, height_shift=0.25, zoom=0.3,
                  horizontal_flip=True, crop_padding=2)
    params = augment.draw_params(aug, 4000, 20, 30, np.random.default_rng(0))
    degrees = np.rad2deg(params.angle)
    assert np.all(np.abs(degrees) <= 15) and np.abs(degrees).max() > 14
    assert np.all(np.abs(params.shift_x) <= 0.1 * 30) and np.abs(params.shift_x).max() > 2.9
    assert np.all(np.abs(params.shift_y) <= 0.25 * 20)
    for zoom in (params.zoom_x, params.zoom_y):
        assert np.all((zoom >= 0.7) & (zoom <= 1.3))
    assert sorted(set(params.crop_y.tolist())) == [-2, -1, 0, 1, 2]
    assert 0.45 < params.flip_h.mean() < 0.55
    assert not params.flip_v.any()


def test_one_option_does_not_change_the_others_draws():
    rotation_only = augment.draw_params(Augment(rotation=20), 50, 8, 8,
                                        np.random.default_rng(5))
    more = augment.draw_params(Augment(rotation=20, zoom=0.2, horizontal_flip=True,
                                       crop_padding=4), 50, 8, 8, np.random.default_rng(5))
    np.testing.assert_array_equal(rotation_only.angle, more.angle)
