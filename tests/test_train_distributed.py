"""The training command line in real subprocesses, on a hub-style folder of three parquet shards: two gloo
processes under torchrun (DistributedDataParallel, latent cache on disk) against one process with the same global
batch, the same with the weights sharded (`--parallel fsdp`, stopped mid-epoch and resumed sharded), and a run
killed with SIGKILL after a mid-epoch checkpoint, resumed, against an uninterrupted one; all count the dataset rows
each step trained ("rows" of the step events): every row once per epoch.

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
ROWS = 10  # global batch 2: an epoch is 5 steps, so the checkpoint at step 3 is mid-epoch and step 6 starts epoch 2
CLI = ["-m", "comfyui_ip2p.cli.train"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, comfy_base, tiny_ip2p_ckpt) -> Iterator[dict[str, Path]]:
    from comfyui_ip2p.testing.public_layouts import write_layout

    root = tmp_path_factory.mktemp("train_cli")
    dataset = write_layout("diffusers", root / "dataset", invert_rows(ROWS, size=32, seed=0), shards=3)
    assert len(list((dataset / "data").glob("train-0000?-of-00003.parquet"))) == 3
    yield {"checkpoint": comfy_base / "models" / "checkpoints" / tiny_ip2p_ckpt, "dataset": dataset, "root": root}
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


def step_rows(run: list[dict]) -> dict[int, list[int]]:
    """step -> the dataset rows trained in it, over every rank."""
    rows: dict[int, list[int]] = {}
    for event in run:
        if event["event"] == "step":
            rows.setdefault(event["step"], []).extend(event["rows"])
    return rows


def assert_every_row_once_per_epoch(rows: dict[int, list[int]]) -> None:
    assert sorted(rows) == list(range(1, STEPS + 1))
    first_epoch = [r for step in range(1, 6) for r in rows[step]]
    assert sorted(first_epoch) == list(range(ROWS)), first_epoch
    assert len(set(rows[6])) == 2  # the second epoch starts with two distinct rows


def final_state(inputs: dict[str, Path], out: str) -> dict:
    return torch.load(inputs["root"] / out / "run" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(inputs) -> tuple[list[dict], dict]:
    """One process, global batch 2, checkpoints every 3 steps: the reference for both tests."""
    run = run_cli([*CLI, *cli_args(inputs, "single", batch_size=2, checkpoint_every=3)])
    return run, final_state(inputs, "single")


def torchrun(*argv: str) -> list[str]:
    from comfyui_ip2p.testing.comfy_server import free_port

    return ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *CLI, *argv]


def weight_differences(state: dict, reference: dict, label: str) -> None:
    """Summation order differs between one batch of 2 and two all-reduced batches of 1; Adam's normalisation turns
    the resulting 1e-7 gradient differences into weight differences up to a small fraction of the learning rate
    (1e-4 per step), on a handful of weights."""
    worst = max((state["params"][k] - reference["params"][k]).abs().max().item() for k in reference["params"])
    mean = statistics.mean((state["params"][k] - reference["params"][k]).abs().mean().item()
                           for k in reference["params"])
    print(f"{label} vs one process after {STEPS} steps: worst weight difference {worst:.3g}, mean {mean:.3g}")
    assert worst < 2e-5 and mean < 1e-8, (worst, mean)


def test_two_gloo_processes_step_in_lockstep_and_equal_one_process(inputs, single):
    run = run_cli(torchrun(*cli_args(inputs, "ddp", batch_size=1), "--cache-location", "disk"))
    assert {e["rank"]: e["cache_location"] for e in run if e["event"] == "done"} == {0: "disk", 1: "disk"}
    assert len(list((inputs["root"] / "ddp" / "latent_cache").glob("*/chunk-000000.pt"))) == 1
    rows = step_rows(run)
    assert_every_row_once_per_epoch(rows)
    assert all(len(e["rows"]) == 1 for e in run if e["event"] == "step")  # each rank trains its own slice
    start = next(e for e in run if e["event"] == "start")
    assert start["processes"] == 2 and start["samples_per_step"] == 2
    steps = {rank: [e for e in run if e["event"] == "step" and e["rank"] == rank] for rank in (0, 1)}
    assert [e["step"] for e in steps[0]] == [e["step"] for e in steps[1]] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in steps[0]] == [e["loss"] for e in steps[1]]
    done = {e["rank"]: e for e in run if e["event"] == "done"}
    assert done[0]["weights_fingerprint"] == done[1]["weights_fingerprint"], "ranks drifted apart"

    reference_run, reference = single
    same = {step: sorted(trained) for step, trained in step_rows(reference_run).items()}
    assert {step: sorted(trained) for step, trained in rows.items()} == same  # one process's global batches
    reference_losses = [e["loss"] for e in reference_run if e["event"] == "step"]
    assert [e["loss"] for e in steps[0]] == pytest.approx(reference_losses, rel=1e-4)
    weight_differences(final_state(inputs, "ddp"), reference, "DDP")


def test_fsdp_shards_in_lockstep_equals_one_process_and_resumes_sharded(inputs, single):
    """--parallel fsdp: weights, gradients, AdamW state and EMA sharded over two gloo processes (FSDP2). Stopped
    after 3 steps (mid-epoch), the state is gathered whole by rank 0; the same command with --steps 6 loads it back
    into shards and finishes the run."""
    argv = [*cli_args(inputs, "fsdp", batch_size=1), "--parallel", "fsdp"]
    first = run_cli(torchrun(*argv, "--steps", "3"))
    stopped = final_state(inputs, "fsdp")
    resumed = run_cli(torchrun(*argv))
    run = first + resumed
    assert [e["step"] for e in resumed if e["event"] == "step" and e["rank"] == 0] == [4, 5, 6]
    rows = step_rows(run)
    assert_every_row_once_per_epoch(rows)
    steps = {rank: [e for e in run if e["event"] == "step" and e["rank"] == rank] for rank in (0, 1)}
    assert [e["loss"] for e in steps[0]] == [e["loss"] for e in steps[1]]
    done = {e["rank"]: e for e in resumed if e["event"] == "done"}
    assert done[0]["weights_fingerprint"] == done[1]["weights_fingerprint"]

    reference_run, reference = single
    assert {step: sorted(trained) for step, trained in rows.items()} == \
        {step: sorted(trained) for step, trained in step_rows(reference_run).items()}
    reference_losses = [e["loss"] for e in reference_run if e["event"] == "step"]
    assert [e["loss"] for e in steps[0]] == pytest.approx(reference_losses, rel=1e-4)
    # The state is the one a single process writes (whole tensors), so either kind of run resumes it.
    assert stopped["step"] == 3
    for key in ("params", "ema"):
        shapes = {k: v.shape for k, v in (stopped[key] if key == "params" else stopped[key]["shadow"]).items()}
        assert shapes == {k: v.shape for k, v in (reference[key] if key == "params"
                                                  else reference[key]["shadow"]).items()}
    moments = [{k: v.shape for k, v in per.items()} for per in stopped["optimizer"]["state"].values()]
    assert moments == [{k: v.shape for k, v in per.items()} for per in reference["optimizer"]["state"].values()]
    state = final_state(inputs, "fsdp")
    assert state["losses"] == [e["loss"] for e in steps[0]]
    weight_differences(state, reference, "FSDP")
    worst_ema = max((state["ema"]["shadow"][k] - reference["ema"]["shadow"][k]).abs().max().item()
                    for k in reference["ema"]["shadow"])
    assert worst_ema < 2e-5, worst_ema


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(inputs, single):
    argv = [sys.executable, *CLI, *cli_args(inputs, "killed", batch_size=2, checkpoint_every=3)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    before_kill: list[dict] = []
    try:
        for line in process.stdout:
            if line.startswith("{"):
                before_kill.append(json.loads(line))
            if before_kill and before_kill[-1]["event"] == "checkpoint":
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert final_state(inputs, "killed")["step"] == 3

    resumed = run_cli(argv[1:])
    assert [e["step"] for e in resumed if e["event"] == "step"] == [4, 5, 6]
    # The killed run's rows up to its checkpoint and the resumed run's rows: every row of the epoch exactly once.
    trained = {**step_rows(before_kill), **step_rows(resumed)}
    assert_every_row_once_per_epoch(trained)
    assert trained == step_rows(single[0])
    state, reference = final_state(inputs, "killed"), single[1]
    assert state["step"] == STEPS and state["losses"] == reference["losses"]
    for key in reference["params"]:
        assert torch.equal(state["params"][key], reference["params"][key]), key
    for key in reference["ema"]["shadow"]:
        assert torch.equal(state["ema"]["shadow"][key], reference["ema"]["shadow"][key]), key
    leftovers = [p.name for p in (inputs["root"] / "killed").rglob("*") if is_temp(p)]
    assert leftovers == []
