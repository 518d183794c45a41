"""Keras training speed: `specforge run --backend keras`, the built script, `model.fit`.

Run: python bench/keras_train.py [--steps N] [--rounds R]. All three train the seed
document's CIFAR-10 model (specs/cifar.yaml: 3 conv + 2 dense, Adam, batch 32) on CIFAR-sized
synthetic images without augmentation, each in a fresh process, leaving out their first
steps (tracing, allocation); this one run prints images/s and the ratios to the hand-written
`fit`, measured right before and after each contender. Goal: at least 0.97 of `fit`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import compare  # noqa: E402 - bench/ is not a package

GOAL = 0.97
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

HAND_WRITTEN = """
import sys, time
import numpy as np
import keras

def hand_written(steps):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(128, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.rand(8192, 32, 32, 3).astype("float32")
    y = np.random.randint(0, 10, 8192)
    model.fit(x[:320], y[:320], batch_size=32, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(x[:steps * 32], y[:steps * 32], batch_size=32, epochs=1, verbose=0,
              shuffle=False)
    return steps * 32 / (time.perf_counter() - start)

if __name__ == "__main__":
    print(hand_written(int(sys.argv[1])))
"""


def overrides(steps: int) -> list[str]:
    return ["data.source={type: synthetic, samples: 8192}", "data.split.validation=0",
            "data.augment={}", "training.epochs=1", f"training.steps_per_epoch={steps}"]


def hand_written(steps: int, work: Path) -> float:
    script = work / "hand_written.py"
    script.write_text(HAND_WRITTEN)
    out = subprocess.run([sys.executable, str(script), str(steps)], check=True, env=ENV,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def specforge_run(steps: int, work: Path) -> float:
    sets = [a for o in overrides(steps) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "specforge", "run", "specs/cifar.yaml", "-b", "keras",
                    "--quiet", "--run-dir", str(work / "run"), *sets], check=True, cwd=ROOT,
                   env=ENV, capture_output=True)
    return json.loads((work / "run" / "summary.json").read_text())["train_images_per_second"]


def built_script(steps: int, work: Path) -> float:
    script = work / "cifar_keras.py"
    sets = [a for o in overrides(steps) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "specforge", "build", "specs/cifar.yaml", "-b",
                    "keras", "-o", str(script), *sets], check=True, cwd=ROOT,
                   capture_output=True)
    out = subprocess.run([sys.executable, str(script)], check=True, cwd=work, env=ENV,
                         capture_output=True, text=True).stdout
    return float(re.search(r"\(([\d,]+) images/s\)", out).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}, batch 32, "
          f"{args.steps} steps x {args.rounds} rounds")
    compare({"specforge run": specforge_run, "built script": built_script}, hand_written,
            "model.fit", args.steps, args.rounds, GOAL)


if __name__ == "__main__":
    main()
