"""Data workers: what a user pays for augmentation, and how fast image folders decode.

Run: python bench/data_workers.py [--steps N] [--rounds R] [--images N]. In one run:

1. `specforge run -b torch` trains the seed document's CIFAR-10 model (specs/cifar.yaml) on
   CIFAR-sized synthetic images, each run in a fresh process: with the seed's augmentation
   as `data.workers: auto` chooses on the CPU (none) and prepared in one data worker,
   against the same run without augmentation (measured before and after each contender).
   Goal on 2 cores, for `auto` (the default): at least 0.82 (perfect overlap would give
   about 0.86; 0.75 before this work). The 1-worker figure is for comparison.
2. A streamed image folder of 320x256 JPEGs decoded and resized to 224x224 by specforge's
   pipeline in 1 and 2 workers, against a hand-written torch `DataLoader` (PIL, the same
   resize, batches of 32) with the same number of workers. Goals: at least as fast as the
   DataLoader, and 2 workers at least 1.7x as fast as 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import compare  # noqa: E402 - bench/ is not a package

GOAL = 0.82
FOLDER_BATCH = 32
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


def write_jpegs(root: Path, images: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    for i in range(images):
        folder = root / "train" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i}.jpg", quality=90)


def specforge_decoding(root: Path, workers: int, steps: int) -> float:
    """Images/s of specforge's streamed folder pipeline in ``workers`` processes."""
    from specforge.compiler import compile_text
    from specforge.data import build_pipeline, folders
    from specforge.data.prefetch import PrefetchedBatches

    folders.IN_MEMORY_BYTES = 0  # stream, as a folder over 1 GiB decoded is
    program = compile_text(f"""name: decode
model: {{input: [224, 224, 3], layers: [{{type: flatten}}, {{type: dense, units: 4}}]}}
loss: {{type: cross_entropy, from_logits: true}}
optimizer: {{type: sgd}}
data: {{source: {{type: image_folder, train: train}}, batch_size: {FOLDER_BATCH}}}
""", "decode.yaml")
    pipeline = build_pipeline(program, root)
    batches = PrefetchedBatches(pipeline, workers, 2, steps + 2)
    try:
        batches.train_batch(0)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            batches.train_batch(step)
        return steps * FOLDER_BATCH / (time.perf_counter() - start)
    finally:
        batches.close()


def dataloader_decoding(root: Path, workers: int, steps: int) -> float:
    """Images/s of a hand-written torch DataLoader reading the same folder."""
    import torch
    from PIL import Image

    paths = sorted((root / "train").rglob("*.jpg"))

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(paths[i]) as image:
                image = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255
            return torch.from_numpy(pixels)

    loader = torch.utils.data.DataLoader(Files(), batch_size=FOLDER_BATCH, shuffle=True,
                                         num_workers=workers, prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)
            next(batches)
        done += 1
    return done * FOLDER_BATCH / (time.perf_counter() - start)


def folder_decoding(images: int, steps: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, images)
        rates: dict[str, list[float]] = {}
        for _ in range(rounds):  # interleaved: this machine's speed drifts
            for workers in (1, 2):
                for name, measure in (("specforge", specforge_decoding),
                                      ("DataLoader", dataloader_decoding)):
                    rates.setdefault(f"{name}, {workers} workers", []).append(
                        measure(root, workers, steps))
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"{name:>24}: {rate:8,.0f} images/s (rounds: "
              f"{', '.join(f'{x:,.0f}' for x in rates[name])})")
    for workers in (1, 2):
        ratio = median[f"specforge, {workers} workers"] / median[f"DataLoader, {workers} workers"]
        print(f"specforge / DataLoader, {workers} workers: {ratio:.3f} (goal >= 1.0): "
              f"{'met' if ratio >= 1.0 else 'NOT met'}")
    scaling = median["specforge, 2 workers"] / median["specforge, 1 workers"]
    print(f"specforge 2 workers / 1 worker: {scaling:.3f} (goal >= 1.7): "
          f"{'met' if scaling >= 1.7 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--folder-steps", type=int, default=40)
    args = parser.parse_args()
    compare({"augment, 1 worker":
             lambda s, w: run_rate(s, w, SEED_AUGMENTATION, "data.workers=1"),
             "augment, auto": (  # on the CPU: no workers
                 lambda s, w: run_rate(s, w, SEED_AUGMENTATION, "data.workers=auto"))},
            lambda s, w: run_rate(s, w, "data.augment={}", "data.workers=0"),
            "no augmentation", args.steps, args.rounds, GOAL,
            for_comparison=["augment, 1 worker"])  # the goal is for the default, auto
    folder_decoding(args.images, args.folder_steps, args.rounds)


if __name__ == "__main__":
    main()
