"""Cold-start time of `specforge validate specs/cifar.yaml` against a bare interpreter.

Run: python bench/cold_start.py [--repeat N]. Both are measured in this run, alternating, as
fresh processes; the goal is less than 0.3 s above `python -c pass` (median).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 0.3


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    bare_cmd = [sys.executable, "-c", "pass"]
    validate_cmd = [sys.executable, "-m", "specforge", "validate", "specs/cifar.yaml"]
    timed(validate_cmd)  # warm the file cache and __pycache__
    bare, validate = [], []
    for _ in range(args.repeat):
        bare.append(timed(bare_cmd))
        validate.append(timed(validate_cmd))
    b, v = statistics.median(bare), statistics.median(validate)
    print(f"python -c pass                       median {b * 1000:7.1f} ms")
    print(f"specforge validate specs/cifar.yaml  median {v * 1000:7.1f} ms")
    print(f"overhead {(v - b) * 1000:.1f} ms (goal < {GOAL_S * 1000:.0f} ms), ratio {v / b:.2f}x: "
          f"{'met' if v - b < GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
