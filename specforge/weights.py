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
    missing = sorted(set(table) - set(weights))
    extra = sorted(set(weights) - set(table))
    misshapen = sorted(n for n, p in table.items()
                       if n in weights and np.shape(weights[n]) != p.shape)
    if missing or extra or misshapen:
        wrong = [f"{n}: {np.shape(weights[n])} != {table[n].shape}" for n in misshapen]
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
                 f"wrong shapes {wrong}" if wrong else ""]
        if any(sorted(np.shape(weights[n])) == sorted(table[n].shape) for n in misshapen):
            parts.append(_LAYOUT_HINT)
        raise WeightsError("weights do not match the model: " + "; ".join(p for p in parts if p))


def save_weights(path: str | Path, weights: Mapping[str, np.ndarray]) -> None:
    """Write weights atomically to an .npz file."""
    path = Path(path)
    # a file object: given a name without .npz, np.savez would write to another name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in weights.items()})


def load_weights(path: str | Path) -> Weights:
    """Read weights from an .npz file; pickled objects are refused."""
    with np.load(Path(path), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


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
