"""`specforge summary`: a table like Keras's ``model.summary()``, one row per spec layer, and
the same numbers as JSON (``--json``).

Parameters are counted as torchvision and Keras count them: trainable ones are what an
optimizer updates; batch norm's moving mean and variance are non-trainable, and the totals
name them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Any

from rich.console import Console
from rich.table import Table

from specforge.ir.graph import Graph, Shape
from specforge.ir.program import Program

HEADERS = ("Layer (type)", "Output Shape", "Param #", "FLOPs", "Inputs")
#: Room a table takes besides its cells: a border before each column and after the last,
#: and one space of padding on each side of every cell.
_BORDERS_PER_COLUMN, _BORDERS_EXTRA = 3, 1


@dataclass(frozen=True)
class LayerRow:
    """One spec layer: its nodes (a layer and its fused activation) taken together."""

    name: str
    #: The spec's type, then each fused activation: `depthwise_conv2d + relu6`.
    type: str
    #: Per sample (no batch axis), as the IR gives shapes.
    output_shape: Shape
    trainable_params: int
    non_trainable_params: int
    flops: int
    inputs: tuple[str, ...]

    @property
    def params(self) -> int:
        return self.trainable_params + self.non_trainable_params


def layer_rows(graph: Graph) -> list[LayerRow]:
    """One row per spec layer, in the graph's order. Inputs are named by their layers, as
    the spec names them (a fused activation's node `conv.relu` is layer `conv`'s output)."""
    layer_of = {n.name: n.layer or n.name for n in graph}
    rows = []
    for layer, group in groupby(graph, key=lambda n: n.layer or n.name):
        nodes = list(group)
        first, last = nodes[0], nodes[-1]
        kinds = [first.layer_type or first.op,
                 *(n.attrs["fn"] if n.op == "activation" else n.op for n in nodes[1:])]
        params = [p for n in nodes for p in n.params]
        rows.append(LayerRow(
            layer, " + ".join(kinds), last.shape,
            sum(p.size for p in params if p.trainable),
            sum(p.size for p in params if not p.trainable),
            sum(n.flops for n in nodes), tuple(layer_of[i] for i in first.inputs)))
    return rows


def _shape(shape: Shape) -> str:
    return "(" + ", ".join(["None", *map(str, shape)]) + ")"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.3g}P"


def _shrunk(widths: list[int], floors: list[tuple[int, int]], room: int) -> list[int]:
    """``widths`` with columns narrowed towards their floors, one (column, floor) after
    another, until the total fits ``room``."""
    widths = list(widths)
    for column, floor in floors:
        excess = sum(widths) - room
        if excess > 0:
            widths[column] = max(min(floor, widths[column]), widths[column] - excess)
    return widths


def _natural(headers: tuple[str, ...], cells: list[tuple[str, ...]]) -> list[int]:
    return [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]


def summary_table(program: Program, width: int = 80) -> Table:
    """The layer table, fitted to ``width`` terminal columns without cutting a name (two
    layers `block.c0_conv` and `block.c0_bn` must not both read `block.c0_…`): the inputs
    column (empty but for merges) gives way first, then the layer column down to its longest
    name; where the inputs would have to break, they move under their layer's name (and a
    model without merges has no inputs column), and the shapes wrap. Only where the longest
    name itself does not fit does it wrap; numbers never do, and nothing is ever cut."""
    rows = layer_rows(program.graph)
    merged = [r.inputs if len(r.inputs) > 1 else () for r in rows]
    layers = [f"{r.name} ({r.type})" for r in rows]
    numbers = [(_shape(r.output_shape), f"{r.params:,}", _human(r.flops)) for r in rows]
    longest_input = max((len(i) for m in merged for i in m), default=0)
    longest_name = max(len(HEADERS[0]), longest_input, *(len(r.name) for r in rows))
    room = width - _BORDERS_PER_COLUMN * len(HEADERS) - _BORDERS_EXTRA
    headers = HEADERS
    cells = [(lay, *num, ", ".join(m)) for lay, num, m in zip(layers, numbers, merged,
                                                               strict=True)]
    widths = _shrunk(_natural(headers, cells), [(4, max(len(HEADERS[4]), longest_input)),
                                                (0, longest_name)], room)
    if sum(widths) > room or not any(merged):
        arrow = f" <- {HEADERS[4].lower()}" if any(merged) else ""
        headers = (HEADERS[0] + arrow, *HEADERS[1:4])
        cells = [(lay + ("\n<- " + ", ".join(m) if m else ""), *num)
                 for lay, num, m in zip(layers, numbers, merged, strict=True)]
        longest_word = max(len(word) for num in numbers for word in num[0].split())
        widths = _shrunk(_natural(headers, cells), [(0, longest_name), (1, longest_word),
                                                    (0, 1)], room + _BORDERS_PER_COLUMN)
    table = Table(title=f'Model: "{program.name}"', title_justify="left")
    for header, column_width in zip(headers, widths, strict=True):
        table.add_column(header, width=column_width, overflow="fold",
                         justify="right" if header in ("Param #", "FLOPs") else "left")
    for row in cells:
        table.add_row(*row)
    return table


def totals_text(program: Program) -> str:
    """Total, trainable and non-trainable parameters, FLOPs and the output's meaning."""
    g = program.graph
    total = g.trainable_params + g.non_trainable_params
    frozen = " (batch norm's moving mean and variance)" if g.non_trainable_params else ""
    lines = [
        f"Total params: {total:,} ({total * 4 / 1024:,.2f} KB as float32)",
        f"Trainable params: {g.trainable_params:,}",
        f"Non-trainable params: {g.non_trainable_params:,}{frozen}",
        f"FLOPs per sample (forward): {g.flops:,} ({_human(g.flops)})",
    ]
    if program.output_activation:
        lines.append(f"Output: logits; {program.output_activation} is applied for "
                     f"predictions and folded into the {program.loss.kind} loss.")
    return "\n".join(lines)


def summary_json(program: Program) -> dict[str, Any]:
    """The summary's numbers, for `specforge summary --json`."""
    g = program.graph
    return {
        "name": program.name,
        "layers": [{"name": r.name, "type": r.type, "output_shape": list(r.output_shape),
                    "params": r.params, "trainable_params": r.trainable_params,
                    "non_trainable_params": r.non_trainable_params, "flops": r.flops,
                    "inputs": list(r.inputs)} for r in layer_rows(g)],
        "total_params": g.trainable_params + g.non_trainable_params,
        "trainable_params": g.trainable_params,
        "non_trainable_params": g.non_trainable_params,
        "flops": g.flops,
        "output_activation": program.output_activation,
    }


def print_summary(program: Program, console: Console | None = None) -> None:
    """Print the layer table and the totals, fitted to the console's width."""
    console = console or Console()
    console.print(summary_table(program, console.width))
    console.print(totals_text(program), highlight=False)
