"""PyTorch training speed: `specforge run`, the built script and a hand-written loop.

Run: python bench/torch_train.py [--steps N] [--device cpu|cuda]. All three train the seed
document's CIFAR-10 model (specs/cifar.yaml: 3 conv + 2 dense, Adam, batch 32) on CIFAR-sized
synthetic images without augmentation, in this one run, and print images/s and the ratios to
the hand-written loop. Goal: each at least 0.97 of the hand-written loop.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.97


def overrides(steps: int, device: str) -> list[str]:
    return ["data.source={type: synthetic, samples: 8192}", "data.split.validation=0",
            "data.augment={}", "training.epochs=1", f"training.steps_per_epoch={steps}",
            f"training.device={device}"]


def specforge_run(steps: int, device: str, work: Path) -> float:
    from specforge.backends import RunOptions, load_backend
    from specforge.compiler import compile_spec

    program = compile_spec(ROOT / "specs/cifar.yaml", overrides(steps, device))
    folder = work / "run"
    load_backend("torch").run(program, RunOptions(run_dir=folder, quiet=True))
    return json.loads((folder / "summary.json").read_text())["train_images_per_second"]


def built_script(steps: int, device: str, work: Path) -> float:
    script = work / "cifar_torch.py"
    sets = [a for o in overrides(steps, device) for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "specforge", "build", "specs/cifar.yaml", "-b",
                    "torch", "-o", str(script), *sets], check=True, cwd=ROOT,
                   capture_output=True)
    out = subprocess.run([sys.executable, str(script), "--device", device], check=True,
                         cwd=work, capture_output=True, text=True).stdout
    return float(re.search(r"\(([\d,]+) images/s\)", out).group(1).replace(",", ""))


def hand_written(steps: int, device: str) -> float:
    """The loop one would write by hand, data already in tensors."""
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
    start = None
    for step in range(steps + 5):
        if step == 5:  # warm-up excluded, as the others' first steps are not
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = hand_written(args.steps, args.device)
        rates = {"specforge run": specforge_run(args.steps, args.device, work),
                 "built script": built_script(args.steps, args.device, work)}
        base_again = hand_written(args.steps, args.device)  # drift check
    baseline = max(base, base_again)
    print(f"hand-written loop: {base:,.0f} and {base_again:,.0f} images/s "
          f"(the higher is the baseline), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, rate in rates.items():
        ratio = rate / baseline
        print(f"{name:>14}: {rate:8,.0f} images/s  ratio {ratio:.3f} "
              f"(goal >= {GOAL}): {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
