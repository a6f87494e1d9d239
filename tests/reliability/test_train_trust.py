"""TrainIP2P and shared workflows (issue 12, the training rows): a workflow names files and hands over values the
user never looked at, so training must never replace a file it did not write, never read a dataset outside
ComfyUI's input and output folders (nor say whether a path out there exists), never resume another run's state
with a different model or dataset, and never start a run that cannot fit in memory.

Through ComfyUI's executor in-process, and the overwrite and handle cases also through a real ComfyUI server."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from comfyui_ip2p.cli.runtime import format_error, run_prompt
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.synthetic import invert_rows
from comfyui_ip2p.testing.threads import torch_threads

TAG = uuid.uuid4().hex[:8]
SETTINGS = {"mode": "full", "steps": 1, "batch_size": 1, "grad_accumulation": 1, "learning_rate": 1e-4,
            "resolution": 16, "seed": 0, "ema_decay": 0.0, "cache_latents": True, "gradient_checkpointing": False,
            "lora_rank": 2, "checkpoint_every": 0, "validation_every": 0, "resume": True, "validation_count": 0,
            "validation_steps": 1}
OUTSIDE_TEXT = "TrainIP2P: the dataset handle points outside ComfyUI's input and output folders"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: a second thread gains little and spins on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", autouse=True)
def remove_runs(comfy_base):
    """Every run, model file and dataset of this module has TAG in its name."""
    yield
    for folder in ("models/checkpoints", "models/loras", "output", "output/ip2p_train", "input"):
        for path in (comfy_base / folder).glob(f"*{TAG}*"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@pytest.fixture(scope="module")
def dataset(comfy_base) -> str:
    name = f"trust_a_{TAG}"
    write_rows(invert_rows(2, size=16, seed=0), comfy_base / "output", name, "reference")
    return name


@pytest.fixture(scope="module")
def other_dataset(comfy_base) -> str:
    name = f"trust_b_{TAG}"
    write_rows(invert_rows(3, size=16, seed=7), comfy_base / "output", name, "reference")
    return name


@pytest.fixture(scope="module")
def outside(comfy_base) -> Path:
    """A real dataset beside the base folder, outside every folder of ComfyUI."""
    folder = comfy_base.parent / f"outside_{TAG}"
    write_rows(invert_rows(2, size=16, seed=3), folder, "dataset", "reference")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def graph(ckpt: str, name: str, dataset: str | dict, loader: str = "LoadIP2PModel", **overrides) -> dict:
    widget = "checkpoint" if loader == "LoadIP2PModel" else "ckpt_name"
    prompt = {"1": {"class_type": loader, "inputs": {widget: ckpt}}}
    if isinstance(dataset, str):
        prompt["2"] = {"class_type": "LoadEditDataset", "inputs": {"dataset": f"output/{dataset}", "format": "auto",
                                                                   "max_rows": 0, "preview_count": 0}}
        dataset = ["2", 0]
    prompt["3"] = {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "dataset": dataset, "checkpoint_name": name,
                                                         **SETTINGS, **overrides}}
    return prompt


def refused(result) -> str:
    assert not result.ok, "TrainIP2P must refuse this"
    assert result.error and result.error.get("node_type") == "TrainIP2P", format_error(result)
    message = result.error["exception_message"].rstrip("\n")  # the executor adds a newline
    assert message.startswith("TrainIP2P: "), message
    return message


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every file under the folders with size and mtime: what a refused run must leave as it was."""
    found = {}
    for folder in folders:
        for here, _dirs, files in os.walk(folder):
            for name in files:
                stat = (Path(here) / name).lstat()
                found[os.path.join(here, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def written_by_runs(comfy_base: Path) -> dict[str, tuple]:
    return snapshot(comfy_base / "models", comfy_base / "output")


def user_file(path: Path, run_id: str | None) -> str:
    """A safetensors file the user owns; with `run_id`, one that even claims to come from a training run."""
    from safetensors.torch import save_file

    metadata = {"comfyui_ip2p.run_id": run_id} if run_id else None
    save_file({"w": torch.arange(16, dtype=torch.float32)}, str(path), metadata=metadata)
    return sha256(path)


# --- 1. the user's checkpoint or LoRA is never replaced ---------------------------------------------------------

@pytest.mark.parametrize(("mode", "folder", "claimed"), [("full", "checkpoints", None), ("lora", "loras", "other-run")])
def test_an_existing_model_file_is_refused_not_replaced(comfy_nodes, comfy_base, tiny_ip2p_ckpt, dataset, mode,
                                                        folder, claimed):
    name = f"users_{mode}_{TAG}"
    path = comfy_base / "models" / folder / f"{name}.safetensors"
    digest = user_file(path, claimed)
    before = written_by_runs(comfy_base)
    message = refused(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, mode=mode)))
    assert message == (f"TrainIP2P: {path.resolve()} already exists and was not written by this training run; "
                       "choose another checkpoint_name, or move or delete that file"), message
    assert sha256(path) == digest
    assert written_by_runs(comfy_base) == before, "a refused run writes nothing"
    # resume off does not make it ours either
    refused(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, mode=mode, resume=False)))
    assert sha256(path) == digest


def test_a_runs_own_file_is_updated_by_resume_and_replaced_by_a_restart(comfy_nodes, comfy_base, tiny_ip2p_ckpt,
                                                                       dataset):
    name = f"own_{TAG}"
    model = comfy_base / "models" / "checkpoints" / f"{name}.safetensors"
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, dataset)))
    first = sha256(model)
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, steps=2)))
    state_path = comfy_base / "output" / "ip2p_train" / name / "state.pt"
    assert torch.load(state_path, weights_only=True)["step"] == 2, "resumed from step 1"
    second = sha256(model)
    assert second != first
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, steps=1, resume=False)))
    assert torch.load(state_path, weights_only=True)["step"] == 1, "resume off starts over"
    assert sha256(model) != second, "and replaces the run's own file"


# --- 3. a saved state resumes only with its own model and dataset --------------------------------------------

def test_resuming_with_another_model_or_dataset_is_refused(comfy_nodes, comfy_base, tiny_ip2p_ckpt, tiny_t2i_ckpt,
                                                           dataset, other_dataset):
    name = f"resume_{TAG}"
    model = comfy_base / "models" / "checkpoints" / f"{name}.safetensors"
    run_dir = comfy_base / "output" / "ip2p_train" / name
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, dataset)))
    kept = snapshot(model.parent, run_dir)

    fix = "choose another checkpoint_name, or set resume off to start it over (its files are then replaced)"
    other_model = refused(run_prompt(graph(tiny_t2i_ckpt, name, dataset, loader="CheckpointLoaderSimple",
                                           steps=2)))
    assert other_model == (f"TrainIP2P: the saved run {name!r} ({run_dir.resolve() / 'state.pt'}) was trained from "
                           f"a different model than the one connected now; {fix}"), other_model
    other_data = refused(run_prompt(graph(tiny_ip2p_ckpt, name, other_dataset, steps=2)))
    assert "was trained from a different dataset than the one connected now" in other_data, other_data
    assert snapshot(model.parent, run_dir) == kept, "a refused resume changes nothing"

    # A state from before fingerprints cannot be checked: refused too, never resumed blindly.
    state = torch.load(run_dir / "state.pt", weights_only=True)
    del state["fingerprint"]
    torch.save(state, run_dir / "state.pt")
    legacy = refused(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, steps=2)))
    assert "does not record which model and dataset" in legacy and fix in legacy, legacy

    checked(run_prompt(graph(tiny_t2i_ckpt, name, other_dataset, loader="CheckpointLoaderSimple", resume=False,
                     steps=1)))
    checked(run_prompt(graph(tiny_t2i_ckpt, name, other_dataset, loader="CheckpointLoaderSimple",
                     steps=2)))
    assert torch.load(run_dir / "state.pt", weights_only=True)["step"] == 2, "its own model and dataset resume"


# --- 2. a dataset handle written into the workflow stays inside input/ and output/ ----------------------------

def test_a_literal_dataset_handle_outside_is_refused_without_telling_whether_it_exists(comfy_nodes, comfy_base,
                                                                                       tiny_ip2p_ckpt, outside):
    link = comfy_base / "output" / f"link_{TAG}"
    link.symlink_to(outside, target_is_directory=True)
    before = written_by_runs(comfy_base)
    messages = {}
    for label, path in (("exists", outside / "dataset"), ("missing", outside / "no_such_dataset"),
                        ("dotdot", comfy_base / "output" / ".." / ".." / outside.name / "dataset"),
                        ("relative-up", f"../../{outside.name}/dataset")):
        for fmt in ("reference", "auto"):
            handle = {"path": str(path), "format": fmt}
            messages[label, fmt] = refused(run_prompt(graph(tiny_ip2p_ckpt, f"lit_{TAG}", handle)))
    absolute = {messages[label, fmt] for label in ("exists", "missing", "dotdot") for fmt in ("reference", "auto")}
    assert len(absolute) == 1 and absolute.pop().startswith(OUTSIDE_TEXT)
    assert "'..'" in messages["relative-up", "auto"]
    # Through a symlink inside output/: refused the same whether the target exists or not.
    through_link = {refused(run_prompt(graph(tiny_ip2p_ckpt, f"lit_{TAG}", {"path": str(link / sub),
                                                                             "format": "reference"})))
                    .replace(f"/{sub}'", "/X'") for sub in ("dataset", "no_such_dataset")}
    assert len(through_link) == 1 and "leads outside" in through_link.pop()
    for message in messages.values():
        assert str(outside) not in message
    assert written_by_runs(comfy_base) == before, "nothing trained, nothing written"


@pytest.mark.parametrize(("handle", "expected"), [
    ({"path": "x", "format": "pickle"}, "TrainIP2P: the dataset handle's format 'pickle' is not one of auto, "),
    ({"path": 3, "format": "auto"}, "TrainIP2P: dataset must be a dataset handle from Load Edit Dataset"),
    ({"format": "auto"}, "TrainIP2P: dataset must be a dataset handle from Load Edit Dataset"),
    ({"path": "no_such_dataset_anywhere", "format": "auto"}, "TrainIP2P: no dataset 'no_such_dataset_anywhere' in "),
])
def test_malformed_handles_are_refused(comfy_nodes, tiny_ip2p_ckpt, handle, expected):
    message = refused(run_prompt(graph(tiny_ip2p_ckpt, f"bad_{TAG}", handle)))
    assert message.startswith(expected), message


def test_a_literal_handle_inside_output_trains(comfy_nodes, comfy_base, tiny_ip2p_ckpt, dataset):
    name = f"literal_ok_{TAG}"
    handle = {"path": str(comfy_base / "output" / dataset), "format": "reference"}
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, handle)))
    assert (comfy_base / "models" / "checkpoints" / f"{name}.safetensors").is_file()


# --- 4. memory pre-flight ------------------------------------------------------------------------------------

def test_training_that_cannot_fit_is_refused_before_any_step_with_the_figures(comfy_nodes, comfy_base,
                                                                              tiny_ip2p_ckpt, dataset, monkeypatch):
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 64 * 1024**2)
    name = f"oom_{TAG}"
    before = written_by_runs(comfy_base)
    steps = []
    started = time.monotonic()
    result = run_prompt(graph(tiny_ip2p_ckpt, name, dataset, batch_size=64, resolution=256),
                        on_event=lambda event, data: steps.append(data) if event == "progress" else None)
    message = refused(result)
    assert time.monotonic() - started < 60
    assert message.startswith("TrainIP2P: training is too large for this CPU: it needs about "), message
    assert "batch_size 64 at 256x256" in message and "but only 0.1 GiB is available" in message, message
    assert "To fix: lower batch_size (raise grad_accumulation" in message and "resolution" in message, message
    assert not [s for s in steps if s.get("node") == "3"], "refused before any step"
    assert written_by_runs(comfy_base) == before


def test_the_estimate_follows_the_real_model_and_refuses_on_real_free_memory(comfy_nodes, comfy_base,
                                                                             tiny_ip2p_ckpt, dataset):
    from comfyui_ip2p.pipeline.loading import load_ip2p
    from comfyui_ip2p.pipeline.memory import activation_bytes, meta_unet

    model = load_ip2p(tiny_ip2p_ckpt)[0]
    per_sample = activation_bytes(meta_unet(model), 4, 768, 256)
    # Measured for this UNet on CPU: 205 MiB saved for the backward pass per 256 px sample.
    assert 180 * 1024**2 < per_sample < 300 * 1024**2, per_sample / 1024**2
    # The real free memory, unpatched: 1024 samples at 2048 px are far beyond any machine.
    message = refused(run_prompt(graph(tiny_ip2p_ckpt, f"huge_{TAG}", dataset, batch_size=1024, resolution=2048)))
    assert "training is too large" in message and "GiB" in message, message


def test_a_small_run_passes_the_pre_flight(comfy_nodes, comfy_base, tiny_ip2p_ckpt, dataset):
    name = f"small_{TAG}"
    checked(run_prompt(graph(tiny_ip2p_ckpt, name, dataset, batch_size=2, resolution=32, mode="lora")))
    assert (comfy_base / "models" / "loras" / f"{name}.safetensors").is_file()


# --- the same attacks over HTTP ------------------------------------------------------------------------------

def http_outcome(server, prompt: dict) -> str:
    """'' when the prompt ran, else the node's exception message(s) from /history."""
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = server.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {})
        if status.get("completed") is not None:
            if status.get("status_str") == "success":
                return ""
            return "\n".join(data.get("exception_message", "") for event, data in status.get("messages", [])
                             if event == "execution_error")
        time.sleep(0.2)
    raise TimeoutError(prompt_id)


@pytest.mark.server
def test_over_http_a_users_file_and_a_literal_outside_handle_are_refused(comfy_server, comfy_base, tiny_ip2p_ckpt,
                                                                          dataset, outside):
    name = f"http_users_{TAG}"
    path = comfy_base / "models" / "loras" / f"{name}.safetensors"
    digest = user_file(path, None)
    text = http_outcome(comfy_server, graph(tiny_ip2p_ckpt, name, dataset, mode="lora"))
    assert text.startswith(f"TrainIP2P: {path.resolve()} already exists and was not written by this training run"), text
    assert sha256(path) == digest

    before = written_by_runs(comfy_base)
    texts = {http_outcome(comfy_server, graph(tiny_ip2p_ckpt, f"http_lit_{TAG}",
                                              {"path": str(outside / sub), "format": "reference"}))
             for sub in ("dataset", "no_such_dataset")}
    assert len(texts) == 1
    text = texts.pop()
    assert text.startswith(OUTSIDE_TEXT) and str(outside) not in text, text
    assert written_by_runs(comfy_base) == before

    # and the run's own file is still updated over HTTP
    own = f"http_own_{TAG}"
    assert http_outcome(comfy_server, graph(tiny_ip2p_ckpt, own, dataset, mode="lora")) == ""
    assert http_outcome(comfy_server, graph(tiny_ip2p_ckpt, own, dataset, mode="lora", steps=2)) == ""
    assert torch.load(comfy_base / "output" / "ip2p_train" / own / "state.pt", weights_only=True)["step"] == 2


@pytest.mark.server
def test_over_http_a_resume_with_another_dataset_and_a_run_too_large_are_refused(comfy_server, comfy_base,
                                                                                 tiny_ip2p_ckpt, dataset,
                                                                                 other_dataset):
    """Rows 10 and 11 of the issue through a real server: the same checkpoint_name from a workflow with another
    dataset is refused (never silently resumed), and a run far beyond the machine's memory is refused before
    any work, with the figures."""
    name = f"http_resume_{TAG}"
    assert http_outcome(comfy_server, graph(tiny_ip2p_ckpt, name, dataset, mode="lora")) == ""
    state = comfy_base / "output" / "ip2p_train" / name / "state.pt"
    kept = snapshot(state.parent, comfy_base / "models" / "loras")
    text = http_outcome(comfy_server, graph(tiny_ip2p_ckpt, name, other_dataset, mode="lora", steps=2))
    assert "was trained from a different dataset than the one connected now" in text, text
    assert snapshot(state.parent, comfy_base / "models" / "loras") == kept

    before = written_by_runs(comfy_base)
    started = time.monotonic()
    text = http_outcome(comfy_server, graph(tiny_ip2p_ckpt, f"http_huge_{TAG}", dataset, batch_size=1024,
                                            resolution=2048))
    assert text.startswith("TrainIP2P: training is too large") and "GiB" in text, text
    assert time.monotonic() - started < 120
    assert written_by_runs(comfy_base) == before
