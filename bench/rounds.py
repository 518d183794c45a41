"""Interleaved rounds: this machine's speed drifts by 20% within a minute, so each round
measures the reference right before and right after each contender and takes the ratio to
their mean; the median over rounds is reported with every round's ratio."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

Measure = Callable[[int, Path], float]


def compare(contenders: dict[str, Measure], reference: Measure, reference_name: str,
            steps: int, rounds: int, goal: float, for_comparison: Collection[str] = ()
            ) -> None:
    """Print each contender's rate and its ratio to the reference, judged against ``goal``
    except for the contenders named in ``for_comparison`` (shown only to compare)."""
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    baseline: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, measure in contenders.items():
                work = Path(tmp) / f"{r}-{name.replace(' ', '_')}"
                work.mkdir()
                before = reference(steps, work)
                rate = measure(steps, work)
                after = reference(steps, work)
                ratios[name].append(rate / ((before + after) / 2))
                rates[name].append(rate)
                baseline += [before, after]
    print(f"{reference_name:>14}: {statistics.median(baseline):8,.0f} images/s (median)")
    for name in contenders:
        ratio = statistics.median(ratios[name])
        shown_only = name in for_comparison
        judged = "no goal: for comparison" if shown_only else f"goal >= {goal}"
        outcome = "" if shown_only else (": met" if ratio >= goal else ": NOT met")
        print(f"{name:>14}: {statistics.median(rates[name]):8,.0f} images/s  ratio {ratio:.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios[name])}; {judged}){outcome}")
