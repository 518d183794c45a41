"""specforge's framework-neutral weights: named numpy arrays in documented layouts.

Names are ``"{node}.{param}"`` (e.g. ``conv2d_1.kernel``); layouts are those of
:mod:`specforge.ir.ops`: conv kernel ``(kh, kw, in/groups, filters)``, dense kernel
``(in, units)``, vectors ``(channels,)``. Files are ``.npz`` archives read with
``allow_pickle=False``, so loading one never runs code.

Initial values are drawn here, in numpy, once: every backend loads the same arrays. Each
tensor has its own generator seeded by (spec seed, tensor name), so adding a layer does not
change the initial weights of the others.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from specforge.atomic import atomic_path
from specforge.errors import UsageError
from specforge.ir.graph import Graph, Param

Weights = dict[str, np.ndarray]


def parameter_table(graph: Graph) -> dict[str, Param]:
    """Every parameter of the graph by its neutral name."""
    return {f"{node.name}.{p.name}": p for node in graph for p in node.params}


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[:-2]))
    return receptive * shape[-2], receptive * shape[-1]


def draw(param: Param, name: str, seed: int) -> np.ndarray:
    """The initial value of one parameter, as float32."""
    if param.init == "zeros":
        return np.zeros(param.shape, np.float32)
    if param.init == "ones":
        return np.ones(param.shape, np.float32)
    if param.init.startswith("constant:"):  # one number for every element (prelu's alpha)
        return np.full(param.shape, float(param.init.split(":", 1)[1]), np.float32)
    if param.init == "glorot_uniform":
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        fan_in, fan_out = _fans(param.shape)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, param.shape).astype(np.float32)
    raise ValueError(f"unknown initializer {param.init!r} for {name}")


def initial_weights(graph: Graph, seed: int) -> Weights:
    """specforge's initial weights for ``graph`` and ``seed``."""
    return {name: draw(p, name, seed) for name, p in parameter_table(graph).items()}


class WeightsError(UsageError, ValueError):
    """Weights that do not fit a model (the CLI's exit code 2; a ValueError to Python)."""


#: Said when a shape is the expected one permuted: most often another framework's layout.
_LAYOUT_HINT = ("specforge's layouts: dense kernel (in, units), the transpose of torch's "
                "Linear.weight; conv kernel (kh, kw, in/groups, filters)")


def check_weights(graph: Graph, weights: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`WeightsError` naming every missing, unexpected and misshapen array
    unless ``weights`` has exactly the graph's names and shapes."""
    table = parameter_table(graph)
    problem = shape_mismatch({n: p.shape for n, p in table.items()},
                             {n: tuple(np.shape(w)) for n, w in weights.items()})
    if problem:
        permuted = any(n in weights and np.shape(weights[n]) != tuple(p.shape)
                       and sorted(np.shape(weights[n])) == sorted(p.shape)
                       for n, p in table.items())
        raise WeightsError(f"weights do not match the model: {problem}"
                           + (f"; {_LAYOUT_HINT}" if permuted else ""))


def shape_mismatch(expected: Mapping[str, tuple[int, ...]],
                   found: Mapping[str, tuple[int, ...]]) -> str | None:
    """What differs between two tables of names and shapes, in words (None: nothing)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{n}: {tuple(found[n])} != {tuple(shape)}" for n, shape in expected.items()
                   if n in found and tuple(found[n]) != tuple(shape))
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
             f"wrong shapes {wrong}" if wrong else ""]
    return "; ".join(p for p in parts if p) or None


#: How the zip comment of an .npz file specforge wrote starts; the arrays' sha256 follows.
DIGEST_PREFIX = b"specforge-sha256:"


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """The sha256 of named arrays: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write named arrays atomically to an .npz file whose zip comment holds their sha256
    (any .npz reader ignores the comment; :func:`load_arrays` checks it)."""
    values = {k: np.asarray(v) for k, v in arrays.items()}
    # a file object: given a name without .npz, np.savez would write to another name
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **values)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.comment = DIGEST_PREFIX + arrays_digest(values).encode()


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Named arrays from an .npz file; pickled objects are refused, and a file whose arrays
    do not match the sha256 it was written with is refused by name (DamagedFile)."""
    from specforge.runfolder import DamagedFile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            comment = archive.comment
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DamagedFile(path, f"not a readable .npz archive ({exc})") from None
    if comment.startswith(DIGEST_PREFIX):  # files written elsewhere carry no digest
        expected = comment[len(DIGEST_PREFIX):].decode("ascii", "replace")
        if arrays_digest(arrays) != expected:
            raise DamagedFile(path, "its arrays do not match the sha256 they were written "
                                    "with (the file changed after it was written)")
    return arrays


def save_weights(path: str | Path, weights: Mapping[str, np.ndarray]) -> None:
    """Write weights atomically to an .npz file, with their sha256."""
    save_arrays(path, weights)


def load_weights(path: str | Path) -> Weights:
    """Read weights from an .npz file; pickled objects and damaged files are refused."""
    return load_arrays(path)


def read_weights_for(graph: Graph, path: str | Path, option: str = "--weights") -> Weights:
    """The weights in the .npz file ``path``, checked against ``graph`` (names, shapes, real
    numbers); a :class:`~specforge.errors.UsageError` naming ``option`` and the file when
    they cannot be read or do not fit."""
    from specforge.errors import UsageError

    path = Path(path)
    try:
        weights = load_weights(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{option} {path}: cannot read neutral weights (.npz): {exc}") from None
    not_real = sorted(n for n, v in weights.items() if v.dtype.kind not in "fiu")
    if not_real:
        raise UsageError(f"{option} {path}: {', '.join(not_real)} do not hold numbers")
    try:
        check_weights(graph, weights)
    except ValueError as exc:
        raise UsageError(f"{option} {path}: {exc}") from None
    return {name: value.astype(np.float32) for name, value in weights.items()}
