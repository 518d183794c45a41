"""Augmentation behind data workers: what a user pays for the seed's augmentation.

Run: python bench/data_workers.py [--steps N] [--rounds R] [--workers W]. `specforge run
-b torch` trains the seed document's CIFAR-10 model (specs/cifar.yaml) on CIFAR-sized
synthetic images, each run in a fresh process: with the seed's augmentation prepared in W
data workers (default `auto`) and in the training process (`data.workers: 0`), against the
same run without augmentation (the baseline, measured before and after each contender).
Goal: with workers, augmentation costs at most 3% (ratio >= 0.97); in the training process
it cost 25% when the workers were written (2,033 against 2,702 images/s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import compare  # noqa: E402 - bench/ is not a package

GOAL = 0.97
SEED_AUGMENTATION = ("data.augment={rotation: 15, width_shift: 0.1, height_shift: 0.1, "
                     "horizontal_flip: true}")


def run_rate(steps: int, work: Path, *overrides: str) -> float:
    sets = ["data.source={type: synthetic, samples: 8192}", "data.split.validation=0",
            "training.epochs=1", f"training.steps_per_epoch={steps}", *overrides]
    folder = work / f"run{len(list(work.iterdir()))}"
    subprocess.run([sys.executable, "-m", "specforge", "run", "specs/cifar.yaml", "-b", "torch",
                    "--quiet", "--run-dir", str(folder), *(a for o in sets for a in ("--set", o))],
                   check=True, cwd=ROOT, capture_output=True)
    return json.loads((folder / "summary.json").read_text())["train_images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="auto")
    args = parser.parse_args()
    compare({f"augment, workers {args.workers}":
             lambda s, w: run_rate(s, w, SEED_AUGMENTATION, f"data.workers={args.workers}"),
             "augment, workers 0":
             lambda s, w: run_rate(s, w, SEED_AUGMENTATION, "data.workers=0")},
            lambda s, w: run_rate(s, w, "data.augment={}", "data.workers=0"),
            "no augmentation", args.steps, args.rounds, GOAL)


if __name__ == "__main__":
    main()
