"""The memory a training run needs, estimated from the IR before anything is allocated.

A spec can ask for more memory than any machine has in a few characters (a 2048x2048 input
with 65,536 filters, `synthetic: {samples: 10000000}`); the frameworks would then fail
deep inside an allocation, or the machine would swap. Every command that compiles a spec
refuses one whose estimate is above a limit (`--max-memory`, default
:data:`DEFAULT_MAX_MEMORY`), and says what the estimate is made of.

The estimate is a floor, so that a spec that would fit is never refused: float32 values;
every node's output for one batch, kept for the backward pass (gradients and framework
workspaces come on top); weights, their gradients and the optimizer's per-parameter state;
and the data sets whose size the spec alone fixes (synthetic, digits, CIFAR-10; `npz` and
image folders are not estimated).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from specforge.errors import Problem, SpecError
from specforge.ir.program import Program, optimizer_slots
from specforge.spec.source import LoadedSpec

#: Default upper bound on the estimate, in bytes (`--max-memory` changes it).
DEFAULT_MAX_MEMORY = 128 * 2**30
#: Bytes of one value in training: float32.
VALUE_BYTES = 4
#: Peak bytes per pixel value while the synthetic source generates its images (float64
#: noise and sums next to the uint8 result; measured with tracemalloc: 24.3).
SYNTHETIC_BYTES_PER_VALUE = 25
#: Images of the sources whose size is fixed: (count, bytes per pixel value).
FIXED_SOURCES = {"digits": (1_797, 1), "cifar10": (60_000, 1)}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30,
          "gib": 2**30, "t": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs at least, by what holds them."""

    parameters: int
    activations: int
    data: int
    batch: int
    #: The node with the largest output per sample.
    largest: str

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.data


def estimate_memory(program: Program) -> MemoryEstimate:
    """The floor on a training run's memory described in the module docstring."""
    graph = program.graph
    state = 2 + len(optimizer_slots(program.optimizer))  # weights, gradients, slots
    parameters = (graph.trainable_params * state + graph.non_trainable_params) * VALUE_BYTES
    largest = max(graph, key=lambda n: math.prod(n.shape))
    per_sample = sum(math.prod(n.shape) for n in graph) * VALUE_BYTES
    samples, data = _data_bytes(program)
    batch = _batch(program, samples)
    return MemoryEstimate(parameters, per_sample * batch, data, batch, largest.name)


def _data_bytes(program: Program) -> tuple[int | None, int]:
    """The training source's sample count (None when the spec alone does not fix it) and
    the bytes its images take."""
    data = program.spec.data
    if data is None:
        return None, 0
    values = math.prod(program.graph.input.shape)
    source = data.source
    if source.type == "synthetic":
        return source.samples, source.samples * values * SYNTHETIC_BYTES_PER_VALUE
    if source.type in FIXED_SOURCES:
        count, value_bytes = FIXED_SOURCES[source.type]
        return count, count * values * value_bytes
    return None, 0


def _batch(program: Program, samples: int | None) -> int:
    data = program.spec.data
    if data is None:
        return 1
    if data.batch_size == "full":
        return samples or 1
    return data.batch_size


def check_memory(program: Program, loaded: LoadedSpec, max_memory: int) -> None:
    """Raise a located SpecError when the estimate is above ``max_memory`` bytes."""
    estimate = estimate_memory(program)
    if estimate.total <= max_memory:
        return
    parts = {"activations": estimate.activations, "parameters": estimate.parameters,
             "data": estimate.data}
    biggest = max(parts, key=lambda k: parts[k])
    graph = program.graph
    if biggest == "data":
        path: tuple[str | int, ...] = ("data", "source")
        where = loaded.sources.locate(path)
    else:
        node = graph[estimate.largest] if biggest == "activations" else max(
            graph, key=lambda n: n.param_count)
        path, where = ("model",), node.location or loaded.sources.locate(("model",))
    raise SpecError([Problem(
        f"training needs at least {format_size(estimate.total)} of memory, above the limit "
        f"of {format_size(max_memory)}: layer outputs {format_size(estimate.activations)} "
        f"(batch {estimate.batch:,}; largest output '{estimate.largest}' "
        f"{list(graph[estimate.largest].shape)}), weights, gradients and optimizer state "
        f"{format_size(estimate.parameters)}, data {format_size(estimate.data)}",
        where, path, "make the model, its input, the batch or the data smaller, or raise the "
                     f"limit with --max-memory {_round_up(estimate.total)}")])


def _round_up(size: int) -> str:
    """A limit above ``size`` to suggest: a power of two in whole binary units."""
    exponent = max(size - 1, 1).bit_length()
    unit = min(exponent // 10, 4)
    return f"{2 ** (exponent - 10 * unit)}{('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def format_size(size: int) -> str:
    """Bytes in binary units, e.g. ``1.5 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``64GiB``, ``512 MiB``, ``1.5t`` or a number of bytes; ValueError when it is none."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write e.g. 64GiB, 512MiB or 2TiB")
    return int(float(match.group(1)) * _UNITS[unit])

