"""PyTorch training speed: `specforge run`, the built script and a hand-written loop.

Run: python bench/torch_train.py [--steps N] [--rounds R] [--device cpu|cuda]. All three
train the seed document's CIFAR-10 model (specs/cifar.yaml: 3 conv + 2 dense, Adam,
batch 32) on CIFAR-sized synthetic images without augmentation, each in a fresh process,
leaving out the first 5 steps; this one run prints images/s and the ratios to the
hand-written loop. Goal: each at least 0.97 of the hand-written loop.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import compare  # noqa: E402 - bench/ is not a package

GOAL = 0.97


def overrides(steps: int, device: str) -> list[str]:
    return ["data.source={type: synthetic, samples: 8192}", "data.split.validation=0",
            "data.augment={}", "training.epochs=1", f"training.steps_per_epoch={steps}",
            f"training.device={device}"]


def specforge_run(steps: int, device: str, work: Path) -> float:
    sets = [a for o in overrides(steps, device) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "specforge", "run", "specs/cifar.yaml", "-b", "torch",
                    "--quiet", "--run-dir", str(work / "run"), *sets], check=True, cwd=ROOT,
                   capture_output=True)
    return json.loads((work / "run" / "summary.json").read_text())["train_images_per_second"]


def built_script(steps: int, device: str, work: Path) -> float:
    script = work / "cifar_torch.py"
    sets = [a for o in overrides(steps, device) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "specforge", "build", "specs/cifar.yaml", "-b",
                    "torch", "-o", str(script), *sets], check=True, cwd=ROOT,
                   capture_output=True)
    out = subprocess.run([sys.executable, str(script), "--device", device], check=True,
                         cwd=work, capture_output=True, text=True).stdout
    return float(re.search(r"\(([\d,]+) images/s\)", out).group(1).replace(",", ""))


HAND_WRITTEN = """
import sys, time, torch
from torch import nn

def hand_written(steps, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.rand(8192, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (8192,), device=device)
    for step in range(steps + 5):
        if step == 5:  # warm-up left out, as the others leave out theirs
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        i = (step * 32) % 8192
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images[i:i + 32]), labels[i:i + 32])
        loss.backward()
        optimizer.step()
        loss.item()  # the others read the loss every step too
    return steps * 32 / (time.perf_counter() - start)

if __name__ == "__main__":
    print(hand_written(int(sys.argv[1]), sys.argv[2]))
"""
_namespace: dict = {}
exec(compile(HAND_WRITTEN, "hand_written", "exec"), _namespace)
hand_written = _namespace["hand_written"]


def hand_written_process(steps: int, device: str, work: Path) -> float:
    """The loop one would write by hand, data already in tensors, in a fresh process."""
    script = work / "hand_written.py"
    script.write_text(HAND_WRITTEN)
    out = subprocess.run([sys.executable, str(script), str(steps), device], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch 32, {args.steps} steps x {args.rounds} rounds")

    def bind(measure: Callable[[int, str, Path], float]) -> Callable[[int, Path], float]:
        return lambda steps, work: measure(steps, args.device, work)

    compare({"specforge run": bind(specforge_run), "built script": bind(built_script)},
            bind(hand_written_process), "hand-written", args.steps, args.rounds, GOAL)


if __name__ == "__main__":
    main()
