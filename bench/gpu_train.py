"""Training speed on a GPU: specforge's PyTorch trainer against a hand-written loop.

Run: python bench/gpu_train.py [--device cuda] [--steps 300] [--configs 512:bf16:compiled,...]

The seed document's CIFAR-10 model (specs/cifar.yaml) on CIFAR-sized synthetic images held
on the device, without augmentation, at batch 32 and 512, in fp32 and bf16 (autocast),
eager and compiled (torch.compile), channels_last. For each configuration, in this one
process: the hand-written loop, specforge's trainer (TorchTrainer fed by DeviceBatches, what
`specforge run` uses), the hand-written loop again; specforge's images/s and its ratio to the
mean of the two hand-written runs. Both read the loss every step (specforge logs it).
Goals: at least 100,000 images/s at batch 512 on an H100, and a ratio of at least 1.0
everywhere. About four minutes on an H100 (most of it compiling).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 50_000  # CIFAR-10's training set size
WARMUP = 10


def hand_written(batch: int, precision: str, compiled: bool, device: str, steps: int
                 ) -> float:
    """The loop one would write by hand: data on the device, torch's own layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    forward = torch.compile(model) if compiled else model
    images = torch.randint(0, 256, (SAMPLES, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (SAMPLES,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    order = torch.randperm(SAMPLES, device=device)
    for step in range(steps + WARMUP):
        if step == WARMUP:
            _sync(device)
            start = time.perf_counter()
        index = order[(step * batch) % (SAMPLES - batch):][:batch]
        x = (images[index].float() / 255).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(forward(x).float(), labels[index])
        loss.backward()
        optimizer.step()
        loss.item()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def with_specforge(batch: int, precision: str, compiled: bool, device: str, steps: int
                   ) -> float:
    """specforge's trainer and device batches, as `specforge run` drives them."""
    from specforge_torch.trainer import TorchTrainer

    from specforge.compiler import compile_spec
    from specforge.data.pipeline import build_pipeline
    from specforge.ir.program import lr_at

    program = compile_spec(ROOT / "specs" / "cifar.yaml", [
        f"data.source={{type: synthetic, samples: {SAMPLES}}}", "data.split.validation=0",
        "data.augment={}", f"data.batch_size={batch}", f"training.precision={precision}",
        f"training.compile={str(compiled).lower()}", "training.channels_last=true",
        "training.data_on_device=true"])
    trainer = TorchTrainer(program, device)
    batches = trainer.batch_source(build_pipeline(program, ROOT / "specs"))
    for step in range(steps + WARMUP):
        if step == WARMUP:
            _sync(device)
            start = time.perf_counter()
        b = batches.train_batch(step)
        trainer.train_step(b.x, b.y, lr_at(program.optimizer, step, 1000))
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--configs", default="32:fp32:eager,32:bf16:eager,32:fp32:compiled,"
                        "32:bf16:compiled,512:fp32:eager,512:bf16:eager,512:fp32:compiled,"
                        "512:bf16:compiled", help="batch:precision:eager|compiled, ...")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.steps} timed steps per run", flush=True)
    print(f"{'batch':>5} {'precision':>9} {'mode':>8} {'hand-written':>13} {'specforge':>10} "
          f"{'ratio':>6}", flush=True)
    worst = float("inf")
    for config in args.configs.split(","):
        size, precision, mode = config.split(":")
        options = (int(size), precision, mode == "compiled", args.device, args.steps)
        before = hand_written(*options)
        ours = with_specforge(*options)
        after = hand_written(*options)
        ratio = ours / ((before + after) / 2)
        worst = min(worst, ratio)
        print(f"{size:>5} {precision:>9} {mode:>8} {(before + after) / 2:13,.0f} "
              f"{ours:10,.0f} {ratio:6.3f}", flush=True)
    print(f"worst ratio {worst:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    sys.exit(main())
