"""A conformance report as rich tables, a JSON file and a PNG of the loss curves."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from specforge.atomic import write_atomically
from specforge.conformance.check import PHASES, Report, Row
from specforge.conformance.suite import CaseResult


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def phase_table(report: Report, phase: str) -> Table | None:
    rows = [r for r in report.rows if r.phase == phase]
    if not rows:
        return None
    title = phase.replace("N steps", f"{report.steps} steps")
    table = Table(title=title, title_justify="left", title_style="bold")
    table.add_column("quantity", no_wrap=True)
    pairs = list(rows[0].pairs)
    for pair in pairs:
        table.add_column(f"{pair.replace(' vs ', ' - ')}\nmax abs", justify="right")
        table.add_column("\nmax rel", justify="right")
    table.add_column("tolerance\nabs", justify="right")
    if rows[0].floor is not None:
        table.add_column("chaos\nfloor", justify="right")
    table.add_column("result")
    for row in rows:
        cells = [row.quantity]
        for pair in pairs:
            d = row.pairs[pair]
            cells += [_number(d.max_abs), _number(d.max_rel)]
        cells.append(_number(row.tolerance))
        if row.floor is not None:
            cells.append(_number(row.floor))
        cells.append(_verdict(row))
        table.add_row(*cells)
    return table


def _verdict(row: Row) -> str:
    return "[green]pass[/]" if row.passed else "[red]FAIL[/]" + _blame(row)


def _blame(row: Row) -> str:
    """Which backends a failed row is off on, as " (keras off)" (nothing when unknown)."""
    return f" ({', '.join(row.off)} off)" if row.off else ""


def print_report(report: Report, console: Console) -> None:
    """The per-quantity tables, the notes and a one-line verdict."""
    for phase in PHASES:
        table = phase_table(report, phase)
        if table is not None:
            console.print(table)
    for name, device in report.devices.items():
        console.print(f"  {name}: {device}")
    for note in report.notes:
        console.print(f"  note: {note}")
    console.print("  chaos floor: the largest change in each backend's own run when trained "
                  "again with its initial weights and every batch's pixels moved by one "
                  "float32 ulp (about 1e-7); the N-step tolerance is "
                  f"{report.tolerance.chaos_factor:g} x that floor, or "
                  f"{report.tolerance.steps_rtol:g} relative if larger; the backends "
                  "against each other decide, the reference names the one that strays")
    failed = report.failures()
    counts = ", ".join(f"{p.replace('N steps', f'{report.steps} steps')} "
                       f"{sum(r.phase == p for r in report.rows)}" for p in PHASES)
    if failed:
        console.print(f"[red]conformance FAILED[/]: {len(failed)} of {len(report.rows)} "
                      f"quantities differ ({', '.join(r.quantity for r in failed[:5])}"
                      f"{', ...' if len(failed) > 5 else ''})")
    else:
        console.print(f"[green]conformance passed[/]: {', '.join(report.backends)}"
                      f"{' and the reference' if report.reference else ''} agree on all "
                      f"{len(report.rows)} quantities ({counts})")


def report_json(report: Report) -> dict[str, Any]:
    return {
        "spec": report.spec, "steps": report.steps, "backends": report.backends,
        "reference": report.reference, "passed": report.passed,
        "devices": report.devices, "notes": report.notes,
        "tolerance": asdict(report.tolerance),
        "rows": [{"phase": r.phase, "quantity": r.quantity, "tolerance": r.tolerance,
                  "floor": r.floor, "ceiling": r.ceiling, "passed": r.passed, "off": r.off,
                  "decided_by": list(r.decisive),
                  "pairs": {p: {"max_abs": d.max_abs, "max_rel": d.max_rel}
                            for p, d in r.pairs.items()}} for r in report.rows],
        "losses": report.losses,
    }


def write_report(report: Report, folder: Path) -> list[Path]:
    """report.json and losses.png in ``folder``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "report.json"]
    write_atomically(written[0], json.dumps(report_json(report), indent=1))
    if report.steps and write_loss_plot(folder / "losses.png", report):
        written.append(folder / "losses.png")
    return written


def write_loss_plot(path: Path, report: Report) -> bool:
    """The per-step losses of every run, and each run's distance from the first backend's
    (log scale: the perturbed run's distance is the chaos floor)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(11, 3.8))
    first = report.losses[report.backends[0]]
    steps = range(1, len(first) + 1)
    for name, losses in report.losses.items():
        style = {"linestyle": "--"} if name not in report.backends else {}
        curves.plot(steps, losses, label=name, **style)
        if name != report.backends[0]:
            gaps.semilogy(steps, [max(abs(a - b), 1e-12) for a, b in zip(losses, first,
                                                                          strict=True)],
                          label=f"{name} - {report.backends[0]}", **style)
    curves.set(title=f"{report.spec}: loss per step", xlabel="step", ylabel="loss")
    gaps.set(title="|difference| (floor 1e-12)", xlabel="step")
    curves.legend(fontsize=8)
    gaps.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())
    return True


def worst_ratio(report: Report) -> float:
    """The largest deciding difference as a share of its tolerance (above 1 fails)."""
    return max((r.pairs[p].max_abs / r.tolerance if r.tolerance else float("inf")
                for r in report.rows for p in r.decisive if r.pairs[p].max_abs),
               default=0.0)


def print_suite(results: list[CaseResult], console: Console) -> None:
    """One row per case, the exclusions with their reasons, and a verdict."""
    table = Table(title="conformance suite", title_justify="left", title_style="bold")
    for column in ("case", "backends", *PHASES, "worst diff / tol", "result"):
        table.add_column(column, justify="left" if column in ("case", "backends", "result")
                         else "right")
    for result in results:
        report = result.report
        if report is None:
            table.add_row(result.case.name, "-", "", "", "", "", "[yellow]excluded[/]")
            continue
        counts = [f"{sum(r.passed for r in report.rows if r.phase == p)}/"
                  f"{sum(r.phase == p for r in report.rows)}" for p in PHASES]
        failed = report.failures()
        verdict = "[green]pass[/]" if not failed else "[red]FAIL[/] " + ", ".join(
            r.quantity + _blame(r) for r in failed[:3])
        table.add_row(result.case.name, ",".join(report.backends), *counts,
                      f"{worst_ratio(report):.2f}", verdict)
    console.print(table)
    exclusions = [(r.case.name, b, why) for r in results for b, why in r.excluded.items()]
    for case, backend, reason in exclusions:
        console.print(f"  excluded: {case} on {backend}: {reason}")
    if not exclusions:
        console.print("  excluded: nothing")
    ran = [r for r in results if r.report is not None]
    failed = [r for r in ran if not r.report.passed]
    quantities = sum(len(r.report.rows) for r in ran)
    worst = max((worst_ratio(r.report) for r in ran), default=0.0)
    if failed:
        console.print(f"[red]conformance suite FAILED[/]: {len(failed)} of {len(ran)} cases "
                      f"({', '.join(r.case.name for r in failed[:5])})")
    else:
        console.print(f"[green]conformance suite passed[/]: {len(ran)} cases, {quantities} "
                      f"quantities, the largest difference {worst:.2f} of its tolerance")


def write_suite(results: list[CaseResult], folder: Path) -> Path:
    """suite.json: every case's report, and the exclusions."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suite.json"
    write_atomically(path, json.dumps({
        "passed": all(r.passed for r in results),
        "cases": [{"name": r.case.name, "excluded": r.excluded,
                   "report": None if r.report is None else report_json(r.report)}
                  for r in results]}, indent=1))
    return path
