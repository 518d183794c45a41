"""`specforge summary`: a table like Keras's ``model.summary()``, one row per spec layer."""

from __future__ import annotations

from itertools import groupby

from rich.console import Console
from rich.table import Table

from specforge.ir.graph import Node
from specforge.ir.program import Program


def _shape(node: Node) -> str:
    return "(" + ", ".join(["None", *map(str, node.shape)]) + ")"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.3g}P"


def summary_table(program: Program) -> Table:
    graph = program.graph
    table = Table(title=f'Model: "{program.name}"', title_justify="left")
    table.add_column("Layer (type)")
    table.add_column("Output Shape")
    table.add_column("Param #", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("Inputs")
    for layer, group in groupby(graph, key=lambda n: n.layer or n.name):
        nodes = list(group)
        first, last = nodes[0], nodes[-1]
        ops = " + ".join(n.attrs["fn"] if n.op == "activation" and n is not first else n.op
                         for n in nodes)
        table.add_row(f"{layer} ({ops})", _shape(last), f"{sum(n.param_count for n in nodes):,}",
                      _human(sum(n.flops for n in nodes)),
                      ", ".join(first.inputs) if len(first.inputs) > 1 else "")
    return table


def totals_text(program: Program) -> str:
    g = program.graph
    total = g.trainable_params + g.non_trainable_params
    lines = [
        f"Total params: {total:,} ({total * 4 / 1024:,.2f} KB as float32)",
        f"Trainable params: {g.trainable_params:,}",
        f"Non-trainable params: {g.non_trainable_params:,}",
        f"FLOPs per sample (forward): {g.flops:,} ({_human(g.flops)})",
    ]
    if program.output_activation:
        lines.append(f"Output: logits; {program.output_activation} is applied for "
                     f"predictions and folded into the {program.loss.kind} loss.")
    return "\n".join(lines)


def print_summary(program: Program, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(program))
    console.print(totals_text(program), highlight=False)
