"""Training batches prepared ahead in worker processes (`data.workers`, `data.prefetch`)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specforge.compiler import compile_spec
from specforge.data import build_pipeline
from specforge.data import folders as folders_module
from specforge.data.pipeline import Batch
from specforge.data.prefetch import PrefetchedBatches, default_workers
from specforge.data.sources import DataError
from tests.conftest import ROOT
from tests.processes import ENV, refused, run_all, sets, specforge

DIGITS = ROOT / "specs" / "digits.yaml"
AUGMENTED = ["data.augment={rotation: 20, width_shift: 0.1, zoom: 0.1, horizontal_flip: true,"
             " crop_padding: 1}", "data.batch_size=50"]


def digits_pipeline(*overrides: str):
    return build_pipeline(compile_spec(DIGITS, [*AUGMENTED, *overrides]), DIGITS.parent)


class SlowSteps:
    """A batch source whose batches take a step-dependent time, so that workers finish out
    of order (later steps first)."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def train_batch(self, step: int):
        time.sleep(0.02 * ((7 - step) % 4))
        return self.pipeline.train_batch(step)


class FailsAt:
    """A batch source that raises a DataError at one step, as a corrupt image would."""

    def __init__(self, pipeline, step: int) -> None:
        self.pipeline, self.step = pipeline, step

    def train_batch(self, step: int):
        if step == self.step:
            raise DataError(f"cannot read image broken.jpg (step {step})")
        return self.pipeline.train_batch(step)


def no_workers_left() -> bool:
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_are_the_serial_ones_whatever_the_workers_and_their_order(workers):
    pipeline = digits_pipeline()
    steps = [*range(0, 9), 30, 31, 32]  # a jump, as a resumed run makes
    serial = [pipeline.train_batch(s) for s in steps]
    batches = PrefetchedBatches(SlowSteps(pipeline), workers, prefetch=2, end=40)
    try:
        for step, expected in zip(steps, serial, strict=True):
            batch = batches.train_batch(step)
            assert np.array_equal(batch.x, expected.x), step  # augmented: not trivial
            assert np.array_equal(batch.y, expected.y), step
            assert len(batches.pending) <= workers * 2  # bounded: O(workers x prefetch)
    finally:
        batches.close()
    assert no_workers_left()
    assert not np.array_equal(serial[0].x, serial[1].x)


def test_a_worker_that_raises_stops_the_run_with_its_message_and_no_processes_left():
    batches = PrefetchedBatches(FailsAt(digits_pipeline(), 4), workers=2, prefetch=2, end=20)
    try:
        for step in range(4):
            batches.train_batch(step)
        with pytest.raises(DataError, match=r"broken\.jpg"):
            batches.train_batch(4)
    finally:
        batches.close()
    assert no_workers_left()


def test_the_default_uses_spare_cores_beside_an_accelerator_and_none_beside_cpu_training():
    cores = len(os.sched_getaffinity(0))
    assert default_workers(accelerated=True) == max(0, min(4, cores - 1))
    assert default_workers(accelerated=False) == 0  # training's threads use every core
    program = compile_spec(DIGITS)
    assert program.spec.data.workers == "auto" and program.spec.data.prefetch == 2


class GrowingBatches:
    """A source whose batches grow after the first: they no longer fit the shared memory
    sized by it."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def train_batch(self, step: int):
        batch = self.pipeline.train_batch(step)
        if step == 0:
            return batch
        return Batch(np.concatenate([batch.x] * 3), np.concatenate([batch.y] * 3))


def test_batches_larger_than_the_shared_memory_come_back_whole_and_memory_is_freed():
    from multiprocessing import shared_memory

    pipeline = digits_pipeline()
    batches = PrefetchedBatches(GrowingBatches(pipeline), workers=2, prefetch=2, end=6)
    try:
        for step in range(6):
            batch = batches.train_batch(step)
            expected = GrowingBatches(pipeline).train_batch(step)
            assert np.array_equal(batch.x, expected.x) and np.array_equal(batch.y, expected.y)
        names = [memory.name for memory in batches.slots]
        assert len(names) == 4  # one slot per batch in flight
    finally:
        batches.close()
    for name in names:  # unlinked: nothing left in /dev/shm
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def write_folder(root: Path, images: int, size: int = 48) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def folder_spec(root: Path) -> Path:
    spec = root / "folder.yaml"
    spec.write_text("""name: folder
model:
  input: [48, 48, 3]
  layers:
    - {type: flatten}
    - {type: dense, units: 2}
loss: {type: sparse_categorical_crossentropy, from_logits: true}
optimizer: {type: sgd}
data:
  source: {type: image_folder, train: train}
  augment: {rotation: 10}
  batch_size: 8
  workers: 2
training: {epochs: 1}
""")
    return spec


def streamed_peak(root: Path, images: int) -> tuple[int, int]:
    """Peak bytes allocated in this process while streaming two passes of a folder of
    ``images`` images through two workers, prefetching two batches each; and the bytes of
    one batch."""
    write_folder(root, images)
    pipeline = build_pipeline(compile_spec(folder_spec(root)), root)
    assert not isinstance(pipeline.train.images, np.ndarray)  # streamed from the files
    steps = 2 * pipeline.batches_per_pass
    batches = PrefetchedBatches(pipeline, workers=2, prefetch=2, end=steps)
    tracemalloc.start()
    try:
        for step in range(steps):
            batch = batches.train_batch(step)
        return tracemalloc.get_traced_memory()[1], batch.x.nbytes
    finally:
        tracemalloc.stop()
        batches.close()


def test_a_streamed_folder_needs_the_same_memory_whatever_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(folders_module, "IN_MEMORY_BYTES", 0)  # stream every folder
    (small, batch), (large, _) = (streamed_peak(tmp_path / "small", 64),
                                  streamed_peak(tmp_path / "large", 1024))
    # the batches in flight live in shared memory; here: the first batch (made here, with
    # its augmentation's float64 work) and the copies handed out, the same for any size
    assert abs(large - small) < batch, (small, large, batch)
    assert large < 1024 * 48 * 48 * 3 / 2  # under half the folder's bytes, even as uint8


def test_a_corrupt_image_read_by_a_worker_stops_the_run_naming_it(tmp_path, monkeypatch,
                                                                  capsys):
    from specforge.cli import main

    monkeypatch.setattr(folders_module, "IN_MEMORY_BYTES", 0)  # decoded by the workers
    write_folder(tmp_path, 40)
    broken = tmp_path / "train" / "class1" / "21.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header survives, the pixels do not
    monkeypatch.setattr("sys.argv", ["specforge", "run", str(folder_spec(tmp_path)), "-b",
                                     "torch", "--run-dir", str(tmp_path / "run"), "--quiet"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read image {broken}" in err and "Traceback" not in err, err
    assert no_workers_left()


def test_ctrl_c_with_workers_running_checkpoints_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    command = specforge("run", str(DIGITS), "-b", "torch", "--run-dir", str(run_dir),
                        "--quiet", *sets("data.workers=2", "training.epochs=50"))
    # a session of its own: Ctrl-C in a terminal signals the whole process group
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        steps = run_dir / "steps.jsonl"
        deadline = time.monotonic() + 120
        while not (steps.exists() and steps.stat().st_size) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.02)
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err[-3000:]
        assert time.monotonic() - signalled < 15
        assert (run_dir / "checkpoint.pt").exists() and "--resume" in err
        with pytest.raises(ProcessLookupError):  # no worker outlived the run
            for _ in range(50):
                os.killpg(process.pid, 0)
                time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_workers_are_a_count(tmp_path):
    refused(run_all(specforge("validate", str(DIGITS), *sets("data.workers=-1")))[0],
            "workers")


def test_under_ddp_each_process_prepares_only_its_shard():
    pytest.importorskip("torch")
    from specforge_torch.distributed import Ranks, ShardedBatches

    from specforge.data.pipeline import shard

    pipeline = digits_pipeline()
    for rank in (0, 1):
        source = ShardedBatches(pipeline, pipeline, Ranks(rank, 2, rank))
        batches = PrefetchedBatches(source, workers=1, prefetch=2, end=3)
        try:
            for step in range(3):
                batch, whole = batches.train_batch(step), pipeline.train_batch(step)
                part = shard(len(whole.y), rank, 2)
                assert np.array_equal(batch.x, whole.x[part])  # this process's images only
                assert np.array_equal(batch.y, whole.y)  # and the labels of the whole batch
        finally:
            batches.close()
