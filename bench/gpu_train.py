"""Training speed on a GPU: `specforge run`'s PyTorch loop against a hand-written loop.

Run: python bench/gpu_train.py [--device cuda] [--steps 300] [--configs 512:bf16:compiled,...]

The seed document's CIFAR-10 model (specs/cifar.yaml) on CIFAR-sized synthetic images held
on the device, without augmentation, at batch 32 and 512, in fp32 and bf16 (autocast),
eager and compiled (torch.compile; --configs also takes its reduce-overhead and
max-autotune modes), channels_last. For each configuration, in this one process: the
hand-written loop, `specforge run`'s loop (run_training: batches assembled on
the device, the step log, training metrics), the hand-written loop again; specforge's
images/s and its ratio to the mean of the two hand-written runs. Both read every step's
loss; the hand-written loop at once (`loss.item()`), specforge one step later (it starts the
next step first, see specforge.runner.Loop.run).
Goals: at least 100,000 images/s at batch 512 on an H100, and a ratio of at least 1.0
everywhere. Meant to take under five minutes on an H100, most of it compiling (not yet
timed there: no GPU has been lent so far); each row prints its own seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from specforge.runner import WARMUP_STEPS

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 50_000  # CIFAR-10's training set size
WARMUP = WARMUP_STEPS  # steps left out of the timing, as `specforge run` leaves them out


def hand_written(batch: int, precision: str, mode: str, device: str, steps: int) -> float:
    """The loop one would write by hand: data on the device, torch's own layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    forward = model if mode == "eager" else torch.compile(model, mode=torch_mode(mode))
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


def with_specforge(batch: int, precision: str, mode: str, device: str, steps: int) -> float:
    """`specforge run`'s whole loop in this process (batches on the device, metrics, the step
    log); its own images/s, which leaves out the first WARMUP steps as this script does."""
    from specforge.backends import RunOptions, load_backend
    from specforge.compiler import compile_spec
    from specforge.runner import run_training

    program = compile_spec(ROOT / "specs" / "cifar.yaml", [
        f"data.source={{type: synthetic, samples: {SAMPLES}}}", "data.split.validation=0",
        "data.augment={}", f"data.batch_size={batch}", f"training.precision={precision}",
        f"training.compile={'false' if mode == 'eager' else torch_mode(mode)}",
        "training.channels_last=true",
        "training.data_on_device=true", "training.epochs=1",
        f"training.steps_per_epoch={steps + WARMUP}", f"training.device={device}"])
    with tempfile.TemporaryDirectory() as folder:
        options = RunOptions(run_dir=Path(folder) / "run", spec_dir=ROOT / "specs", quiet=True)
        result = run_training(load_backend("torch"), program, options)
        summary = json.loads((result.run_dir / "summary.json").read_text())
    return float(summary["train_images_per_second"])


def torch_mode(mode: str) -> str:
    """torch.compile's mode for a configuration's mode ("compiled": torch's default)."""
    return "default" if mode == "compiled" else mode


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    # eager first: their numbers come before the minutes of compiling
    parser.add_argument("--configs", default="32:fp32:eager,32:bf16:eager,512:fp32:eager,"
                        "512:bf16:eager,32:fp32:compiled,32:bf16:compiled,512:fp32:compiled,"
                        "512:bf16:compiled", help="batch:fp32|bf16:eager|compiled|"
                        "reduce-overhead|max-autotune, ...")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.steps} timed steps per run", flush=True)
    print(f"{'batch':>5} {'precision':>9} {'mode':>15} {'hand-written':>13} {'specforge':>10} "
          f"{'ratio':>6} {'seconds':>8}", flush=True)
    worst, began = float("inf"), time.perf_counter()
    for config in args.configs.split(","):
        started = time.perf_counter()
        size, precision, mode = config.split(":")
        options = (int(size), precision, mode, args.device, args.steps)
        before = hand_written(*options)
        ours = with_specforge(*options)
        after = hand_written(*options)
        ratio = ours / ((before + after) / 2)
        worst = min(worst, ratio)
        print(f"{size:>5} {precision:>9} {mode:>15} {(before + after) / 2:13,.0f} "
              f"{ours:10,.0f} {ratio:6.3f} {time.perf_counter() - started:8.1f}", flush=True)
    print(f"worst ratio {worst:.3f} (goal >= 1.0); {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
