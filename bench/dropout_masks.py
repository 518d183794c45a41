"""Dropout with specforge's masks against torch's own nn.Dropout, in one training run.

Run: python bench/dropout_masks.py [--steps N] [--rounds R] [--device cpu|cuda]. It trains
the seed document's CIFAR-10 model (specs/cifar.yaml's layers: 3 conv + 2 dense, Adam, batch
32) with a dropout layer (rate 0.5) before the last dense layer, on CIFAR-sized random
images, once with ``nn.Dropout`` and once with a tiny module that multiplies by
``specforge_torch.randomness.dropout_mask`` (its key set from the step, on the host, as a
trainer would). For a harder case it also puts the dropout after the first convolution
(28,800 draws a sample instead of 128). Rounds interleave the contenders between two
measurements of nn.Dropout (rounds.py); it prints images/s and the ratios. Goal: >= 0.95.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "backends"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import compare  # noqa: E402 - bench/ is not a package
from specforge_torch.randomness import dropout_mask, key_tensor  # noqa: E402

from specforge.ir.randomness import node_key  # noqa: E402

GOAL = 0.95
BATCH = 32
RATE = 0.5


class SpecforgeDropout(nn.Module):
    """Dropout by specforge's generator: the trainer sets the step's key before forward."""

    def __init__(self, rate: float, name: str, ir_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.rate, self.name, self.ir_shape = rate, name, ir_shape  # per sample, NHWC
        self.register_buffer("key", torch.zeros((), dtype=torch.int32), persistent=False)

    def set_step(self, seed: int, step: int) -> None:
        self.key.copy_(key_tensor(node_key(seed, step, self.name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * dropout_mask((x.shape[0], *self.ir_shape), self.rate, self.key)


def model(dropout: nn.Module, where: str) -> nn.Sequential:
    torch.manual_seed(0)
    first = [nn.Conv2d(3, 32, 3), nn.ReLU()]
    if where == "conv":
        first.append(dropout)
    head = [nn.Linear(512, 128), nn.ReLU()]
    if where == "dense":
        head.append(dropout)
    return nn.Sequential(
        *first, nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), *head, nn.Linear(128, 10))


def train_rate(net: nn.Sequential, steps: int, device: str) -> float:
    """Images/s of ``steps`` Adam steps, after 5 left out for warm-up."""
    net = net.to(device).train()
    hooks = [m for m in net if isinstance(m, SpecforgeDropout)]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.rand(1024, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (1024,), device=device)
    for step in range(steps + 5):
        if step == 5:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for module in hooks:
            module.set_step(42, step)
        i = (step * BATCH) % 1024
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(images[i:i + BATCH]), labels[i:i + BATCH])
        loss.backward()
        optimizer.step()
        loss.item()  # as a trainer reads its loss
    return steps * BATCH / (time.perf_counter() - start)


IR_SHAPES = {"dense": (128,), "conv": (30, 30, 32)}


def measure(kind: str, where: str, device: str) -> Callable[[int, Path], float]:
    def run(steps: int, work: Path) -> float:
        dropout = (nn.Dropout(RATE) if kind == "torch"
                   else SpecforgeDropout(RATE, "dropout", IR_SHAPES[where]))
        return train_rate(model(dropout, where), steps, device)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {BATCH}, rate {RATE}, {args.steps} steps x {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for where in ("dense", "conv"):
            print(f"-- dropout {'before the last dense' if where == 'dense' else 'after conv 1'}")
            contender, reference = (measure(kind, where, args.device)
                                    for kind in ("specforge", "torch"))
            for warm_up in (contender, reference):  # first runs pay for allocations
                warm_up(args.steps // 4, Path(tmp))
            compare({"specforge": contender}, reference, "nn.Dropout", args.steps,
                    args.rounds, GOAL)


if __name__ == "__main__":
    main()
