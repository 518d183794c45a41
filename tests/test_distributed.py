"""Data-parallel training with torchrun and DDP, on the CPU (gloo): two processes with half
a batch each compute what one process computes with the whole batch."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specforge.weights import load_weights
from tests.conftest import ROOT
from tests.processes import (
    ENV,
    n_step_tolerances,
    ok,
    read_jsonl,
    refused,
    run_all,
    sets,
    specforge,
    stop_after_steps,
)

pytest.importorskip("torch")

DIGITS = str(ROOT / "specs" / "digits.yaml")
# 33 images a step: shards of 17 and 16, so the shares of an uneven split are exercised
SMALL = ["data.batch_size=33", "training.epochs=1", "training.steps_per_epoch=15"]
# digits as written: its dropout's masks are specforge's, counted over the whole batch, so
# N processes drop what one process drops
WITH_DROPOUT = "model.layers.5.rate=0.2"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2"]


# batch norm over the whole batch: the processes' shards together
WITH_BATCH_NORM = (
    "model.layers=[{type: conv2d, filters: 8, kernel: 3, padding: same, bias: false},"
    " {type: batch_norm}, {type: activation, fn: relu}, {type: max_pool2d, pool: 2},"
    " {type: flatten}, {type: dense, units: 16, bias: false}, {type: batch_norm},"
    " {type: activation, fn: relu}, {type: dense, units: 10, activation: softmax}]")


@pytest.mark.parametrize("model", [WITH_DROPOUT, WITH_BATCH_NORM], ids=["digits", "batch-norm"])
def test_a_last_batch_smaller_than_the_processes(tmp_path: Path, model: str):
    """1259 training images in batches of 37: the last has one image, so one process's shard
    is empty (it used to crash in flatten, and its mean loss was NaN)."""
    one, two = tmp_path / "one", tmp_path / "two"
    options = sets(model, "data.batch_size=37", "training.epochs=1")
    results = run_all(
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(one), "--quiet", *options),
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(two), "--quiet",
                  "--nproc-per-node", "2", *options), timeout=600)
    for result in results:
        ok(result)
    losses = {run: [s["loss"] for s in read_jsonl(run / "steps.jsonl")] for run in (one, two)}
    assert len(losses[one]) == len(losses[two]) == 35
    # 35 steps from one process's losses: measured 5.3e-7 (digits) and 6.4e-7 (batch norm);
    # a NaN or a wrong share is off by O(1)
    assert np.abs(np.subtract(losses[one], losses[two])).max() <= 1e-4


@pytest.mark.parametrize("model", [WITH_DROPOUT, WITH_BATCH_NORM], ids=["digits", "batch-norm"])
def test_two_processes_compute_what_one_computes(tmp_path: Path, model: str):
    one, two, conform = tmp_path / "one", tmp_path / "two", tmp_path / "conform"
    results = run_all(
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(one), "--quiet",
                  *sets(model, *SMALL)),
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(two), "--quiet",
                  "--nproc-per-node", "2", *sets(model, *SMALL)),
        specforge("conform", DIGITS, "--backends", "torch", "--steps", "15", "--out",
                  str(conform), *sets(model, *SMALL)), timeout=600)
    for result in results:
        ok(result)
    # the tolerance of one backend against itself after 15 steps, from its chaos floor
    tolerance = n_step_tolerances(conform)
    losses = {run: [s["loss"] for s in read_jsonl(run / "steps.jsonl")] for run in (one, two)}
    assert len(losses[one]) == len(losses[two]) == 15  # rank 0 alone writes the log
    gap = np.abs(np.subtract(losses[one], losses[two])).max()
    assert gap <= tolerance["loss per step"], (gap, tolerance["loss per step"])
    w1, w2 = load_weights(one / "weights.npz"), load_weights(two / "weights.npz")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert np.abs(w1[name] - w2[name]).max() <= tolerance[name], name
    summary = {run: json.loads((run / "summary.json").read_text()) for run in (one, two)}
    assert summary[two]["device"] == "cpu x 2 processes"
    # each process evaluates its shard of every test batch: the whole set's numbers
    tests = [summary[run]["test"] for run in (one, two)]
    assert abs(tests[0]["loss"] - tests[1]["loss"]) <= tolerance["loss per step"]
    assert abs(tests[0]["accuracy"] - tests[1]["accuracy"]) <= 1 / 359  # one test image
    assert results[1].stderr.count("test: ") == 1  # one process reports
    # rank 0 alone writes TensorBoard's event files: one file, each step once
    if importlib.util.find_spec("tensorboard"):
        from tests.event_files import check_event_files

        check_event_files(two)
        assert len(list(two.glob("events.out.tfevents.*"))) == 1


def test_the_built_script_runs_under_torchrun(tmp_path: Path):
    script = tmp_path / "train_digits.py"
    ok(run_all(specforge("build", DIGITS, "-b", "torch", "--style", "exact", "--distributed",
                         "-o", str(script),
                         *sets(WITH_DROPOUT, *SMALL)))[0])
    run_dir = tmp_path / "run"
    built, ran = run_all(
        [*TORCHRUN, str(script), "--log-steps", "L.jsonl"],
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(run_dir), "--quiet",
                  "--nproc-per-node", "2", *sets(WITH_DROPOUT, *SMALL)),
        cwd=tmp_path, timeout=600)
    ok(built)
    ok(ran)
    logged = read_jsonl(tmp_path / "L.jsonl")
    assert len(logged) == 15
    # the same code, sharding and reductions: equal to the last bit
    assert [s["loss"] for s in logged] == [s["loss"] for s in read_jsonl(run_dir /
                                                                         "steps.jsonl")]
    assert built.stdout.count("test: ") == 1


RESUME = ["data.batch_size=33", "training.epochs=3", "training.steps_per_epoch=30"]


def test_resume_under_ddp_gives_the_uninterrupted_weights(tmp_path: Path):
    a, b = tmp_path / "A", tmp_path / "B"
    command = ["run", DIGITS, "-b", "torch", "--quiet", "--nproc-per-node", "2",
               *sets(*RESUME)]  # with dropout: its masks follow from the step
    ok(run_all(specforge(*command, "--run-dir", str(a)), timeout=600)[0])
    part = subprocess.Popen(specforge(*command, "--run-dir", str(b)), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = stop_after_steps(part, b / "steps.jsonl", wait=300)
    finally:
        if part.poll() is None:
            part.kill()
            part.wait()
    assert part.returncode == 130, err[-3000:]
    assert not (b / "summary.json").exists()
    stopped = len(read_jsonl(b / "steps.jsonl"))
    assert 10 <= stopped < 90
    one_process = run_all(specforge("run", DIGITS, "-b", "torch", "--quiet", "--resume",
                                    str(b), *sets(*RESUME)))[0]
    refused(one_process, "written by 2 process(es)", "--nproc-per-node")
    ok(run_all(specforge("run", DIGITS, "-b", "torch", "--quiet", "--nproc-per-node", "2",
                         "--resume", str(b), *sets(*RESUME)), timeout=600)[0])
    wa, wb = load_weights(a / "weights.npz"), load_weights(b / "weights.npz")
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name
    assert read_jsonl(a / "steps.jsonl") == read_jsonl(b / "steps.jsonl")


def test_launch_options_are_checked():
    keras, nodes = run_all(
        specforge("run", DIGITS, "-b", "keras", "--nproc-per-node", "2"),
        specforge("run", DIGITS, "-b", "torch", "--nnodes", "2"))
    refused(keras, "the keras backend trains data-parallel with --data-parallel")
    refused(nodes, "--rdzv-endpoint")


# --- Keras: the distribution API over two (emulated) devices, on JAX -----------------------

KERAS_JAX = {**ENV, "KERAS_BACKEND": "jax",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
SHARDED = """\
import numpy as np
from specforge.compiler import compile_spec
from specforge_keras.trainer import KerasTrainer
trainer = KerasTrainer(compile_spec({spec!r}), data_parallel=True)
print(trainer.device)
print(trainer._split(np.zeros((32, 8, 8, 1), np.float32)).sharding.spec)
print(type(trainer._split(np.zeros((33, 8, 8, 1), np.float32))).__name__)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_keras_data_parallel_computes_what_one_device_computes(tmp_path: Path):
    """Two devices in one process, and two processes (as on two machines) with one device
    each, against one device."""
    pytest.importorskip("jax")
    pytest.importorskip("keras")
    one, two, conform = tmp_path / "one", tmp_path / "two", tmp_path / "conform"
    apart = tmp_path / "two-processes"
    small = sets(WITH_DROPOUT, "training.epochs=1", "training.steps_per_epoch=15")
    process = {**ENV, "KERAS_BACKEND": "jax",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{_free_port()}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    commands = [
        specforge("run", DIGITS, "-b", "keras", "--run-dir", str(one), "--quiet", *small),
        specforge("run", DIGITS, "-b", "keras", "--run-dir", str(two), "--quiet",
                  "--data-parallel", *small),
        specforge("conform", DIGITS, "--backends", "keras", "--steps", "15", "--out",
                  str(conform), *small),
        [sys.executable, "-c", SHARDED.format(spec=DIGITS)],
        *[specforge("run", DIGITS, "-b", "keras", "--run-dir", str(apart), "--quiet",
                    "--data-parallel", *small)] * 2]
    envs = [KERAS_JAX] * 4 + [{**process, "KERAS_DISTRIBUTION_PROCESS_ID": str(i)}
                              for i in (0, 1)]
    results = run_all(*commands, envs=envs, timeout=600)
    for result in results:
        ok(result)
    assert [r.stderr.count("test: ") for r in results[4:]] == [1, 0]  # process 0 reports
    device, spec, whole = results[3].stdout.splitlines()[-3:]
    assert "data-parallel over 2 devices (cpu:0, cpu:1)" in device
    assert spec.startswith(("P('batch'", "PartitionSpec('batch'"))  # the batch is cut in two
    assert whole == "ndarray"  # 33 does not divide by 2: that batch stays whole
    tolerance = n_step_tolerances(conform)
    w1 = load_weights(one / "weights.npz")
    losses = [s["loss"] for s in read_jsonl(one / "steps.jsonl")]
    for run in (two, apart):
        theirs = [s["loss"] for s in read_jsonl(run / "steps.jsonl")]
        assert len(theirs) == len(losses) == 15
        assert np.abs(np.subtract(losses, theirs)).max() <= tolerance["loss per step"]
        w2 = load_weights(run / "weights.npz")
        for name in w1:
            assert np.abs(w1[name] - w2[name]).max() <= tolerance[name], (run, name)
        device = json.loads((run / "summary.json").read_text())["device"]
        assert "data-parallel over 2 devices" in device


def test_keras_data_parallel_needs_jax():
    pytest.importorskip("tensorflow")
    refused(run_all(specforge("run", DIGITS, "-b", "keras", "--data-parallel"),
                    env={**ENV, "KERAS_BACKEND": "tensorflow"})[0],
            "KERAS_BACKEND=jax")
    refused(run_all(specforge("run", DIGITS, "-b", "torch", "--data-parallel"))[0],
            "--nproc-per-node")
    if importlib.util.find_spec("jax"):
        half = {**ENV, "KERAS_BACKEND": "jax", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
        refused(run_all(specforge("run", DIGITS, "-b", "keras", "--data-parallel"),
                        env=half)[0], "missing KERAS_DISTRIBUTION_JOB_ADDRESSES")
