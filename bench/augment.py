"""Augmentation throughput against the seed model's training rate, in one run.

Run: python bench/augment.py [--seconds S]. It times specforge's training batches (the seed
document's augmentation: rotation 15, shifts 0.1, horizontal flip; plus normalisation) on
CIFAR-sized synthetic images on ONE thread, and a hand-written PyTorch training loop of the
seed CIFAR-10 model (Adam, batch 32) on all cores. Goal: augmentation >= 3x training.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the pipeline's numpy: one core

import numpy as np

from specforge.compiler import compile_spec
from specforge.data import build_pipeline

GOAL = 3.0
SPEC_OVERRIDES = ["data.source={type: synthetic, samples: 4096}", "data.split.validation=0"]


def augmentation_rate(seconds: float) -> tuple[float, int]:
    program = compile_spec("specs/cifar.yaml", SPEC_OVERRIDES)
    pipeline = build_pipeline(program)
    pipeline.train_batch(0)
    step, images, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(pipeline.train_batch(step).y)
        step += 1
    return images / (time.perf_counter() - start), pipeline.batch_size


def training_rate(seconds: float, batch: int) -> float:
    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count() or 1)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(5):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    aug, batch = augmentation_rate(args.seconds)
    train = training_rate(args.seconds, batch)
    ratio = aug / train
    print(f"augmentation (1 thread, batch {batch}): {aug:10,.0f} images/s")
    print(f"training, hand-written torch loop ({os.cpu_count()} cores): {train:10,.0f} images/s")
    print(f"ratio {ratio:.2f}x (goal >= {GOAL:.0f}x): {'met' if ratio >= GOAL else 'NOT met'}")
    print(f"numpy {np.__version__}")


if __name__ == "__main__":
    main()
