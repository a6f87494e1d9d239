"""The training command line in real subprocesses: two gloo processes under torchrun against one process with
the same global batch, and a run killed with SIGKILL after a checkpoint, resumed, against an uninterrupted one.

Every run uses one CPU thread per process, so reductions happen in the same order and the single-process
runs are bitwise reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from comfyui_ip2p.dataset.paths import is_temp
from comfyui_ip2p.testing.synthetic import invert_rows

pytestmark = pytest.mark.slow

STEPS = 6
CLI = ["-m", "comfyui_ip2p.cli.train"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, comfy_base, tiny_ip2p_ckpt) -> Iterator[dict[str, Path]]:
    from comfyui_ip2p.testing.edit_rows import write_rows

    root = tmp_path_factory.mktemp("train_cli")
    write_rows(invert_rows(12, size=32, seed=0), root, "dataset", "reference")
    yield {"checkpoint": comfy_base / "models" / "checkpoints" / tiny_ip2p_ckpt, "dataset": root / "dataset",
           "root": root}
    shutil.rmtree(root, ignore_errors=True)  # three runs of fp32 states and checkpoints: ~2 GB


def cli_args(inputs: dict[str, Path], out: str, batch_size: int, checkpoint_every: int = 0) -> list[str]:
    return ["--model", str(inputs["checkpoint"]), "--dataset", str(inputs["dataset"]),
            "--output-dir", str(inputs["root"] / out), "--name", "run", "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--resolution", "32", "--learning-rate", "1e-4", "--ema-decay", "0.9",
            "--checkpoint-every", str(checkpoint_every), "--validation-every", "0", "--threads", "1"]


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_cli(argv: list[str], timeout: float = 600) -> list[dict]:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return events(done.stdout)


def final_state(inputs: dict[str, Path], out: str) -> dict:
    return torch.load(inputs["root"] / out / "run" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(inputs) -> tuple[list[dict], dict]:
    """One process, global batch 2, checkpoints every 3 steps: the reference for both tests."""
    run = run_cli([*CLI, *cli_args(inputs, "single", batch_size=2, checkpoint_every=3)])
    return run, final_state(inputs, "single")


def test_two_gloo_processes_step_in_lockstep_and_equal_one_process(inputs, single):
    from comfyui_ip2p.testing.comfy_server import free_port

    argv = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *CLI, *cli_args(inputs, "ddp", batch_size=1)]
    run = run_cli(argv)
    start = next(e for e in run if e["event"] == "start")
    assert start["processes"] == 2 and start["samples_per_step"] == 2
    steps = {rank: [e for e in run if e["event"] == "step" and e["rank"] == rank] for rank in (0, 1)}
    assert [e["step"] for e in steps[0]] == [e["step"] for e in steps[1]] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in steps[0]] == [e["loss"] for e in steps[1]]
    done = {e["rank"]: e for e in run if e["event"] == "done"}
    assert done[0]["weights_fingerprint"] == done[1]["weights_fingerprint"], "ranks drifted apart"

    reference_run, reference = single
    state = final_state(inputs, "ddp")
    reference_losses = [e["loss"] for e in reference_run if e["event"] == "step"]
    assert [e["loss"] for e in steps[0]] == pytest.approx(reference_losses, rel=1e-4)
    # Summation order differs between one batch of 2 and two all-reduced batches of 1; Adam's normalisation
    # turns the resulting 1e-7 gradient differences into weight differences up to a small fraction of the
    # learning rate (1e-4 per step), on a handful of weights.
    worst = max((state["params"][k] - reference["params"][k]).abs().max().item() for k in reference["params"])
    mean = statistics.mean((state["params"][k] - reference["params"][k]).abs().mean().item()
                           for k in reference["params"])
    assert worst < 2e-5 and mean < 1e-8, (worst, mean)


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(inputs, single):
    argv = [sys.executable, *CLI, *cli_args(inputs, "killed", batch_size=2, checkpoint_every=3)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("{") and json.loads(line)["event"] == "checkpoint":
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert final_state(inputs, "killed")["step"] == 3

    resumed = run_cli(argv[1:])
    assert [e["step"] for e in resumed if e["event"] == "step"] == [4, 5, 6]
    state, reference = final_state(inputs, "killed"), single[1]
    assert state["step"] == STEPS and state["losses"] == reference["losses"]
    for key in reference["params"]:
        assert torch.equal(state["params"][key], reference["params"][key]), key
    for key in reference["ema"]["shadow"]:
        assert torch.equal(state["ema"]["shadow"][key], reference["ema"]["shadow"][key]), key
    leftovers = [p.name for p in (inputs["root"] / "killed").rglob("*") if is_temp(p)]
    assert leftovers == []
