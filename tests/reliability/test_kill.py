"""SIGKILL of a real ComfyUI server during dataset building and training, then the same workflow queued again on
a fresh server over the same folders: nothing finished is lost, nothing is there twice, nothing is paid twice,
and training goes on from its last checkpoint to the weights an uninterrupted run reaches.

Each test starts its own servers on a base folder of its own (tiny models written at test time).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from comfyui_ip2p.cli.runtime import comfyui_dir
from comfyui_ip2p.dataset.formats import load_rows
from comfyui_ip2p.dataset.paths import is_temp, read_jsonl
from comfyui_ip2p.testing.comfy_server import ComfyServer
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from comfyui_ip2p.testing.synthetic import invert_rows
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip
from comfyui_ip2p.testing.tiny_models import write_checkpoint
from PIL import Image

# comfy_base boots ComfyUI in this process too: the tiny model writer builds ComfyUI's own modules.
pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.usefixtures("comfy_base")]

CAPTIONS = ["a red car on a street", "a blue house by a lake", "a green tree in a field", "a cat on a sofa"]
SAMPLES = 4
STEPS = 4


def make_base(root: Path) -> Path:
    for sub in ("models/checkpoints", "models/loras", "models/clip_filter", "input", "output", "temp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def dataset_base(tmp_path: Path) -> tuple[Path, str]:
    """A base folder of the test's own with a tiny text-to-image checkpoint and tiny CLIP filter weights."""
    base = make_base(tmp_path / "base")
    write_checkpoint(base / "models/checkpoints/tiny_t2i.safetensors", "t2i", "tiny", seed=10)
    return base, write_tiny_clip(base / "models" / "clip_filter", "tiny_clip_kill", seed=2)


def kill(server: ComfyServer) -> None:
    """SIGKILL to the server's whole process group, as the OOM killer or a power cut would end it."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def wait_for(condition: Callable[[], object], server: ComfyServer, timeout: float = 300.0,
             interval: float = 0.001) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if server.process.poll() is not None:
            raise AssertionError(f"ComfyUI ended before the kill:\n{server.log_tail()}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting to kill the server:\n{server.log_tail()}")


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files (ours: hidden '.x.tmp-<pid>' or '.x.<pid>.tmp') under `folders`."""
    return [p for folder in folders for p in folder.rglob("*") if is_temp(p) or p.name.endswith(".tmp")]


# --- dataset building ------------------------------------------------------------------------------------


def dataset_graph(llm: FakeOpenAIServer, ckpt: str, clip: str, name: str, fmt: str = "reference") -> dict:
    return {
        "1": {"class_type": "GenerateEditInstructions", "inputs": {
            "captions": "\n".join(CAPTIONS), "captions_file": "none", "base_url": llm.base_url, "model": "fake",
            "mode": "chat", "api_key_env": "", "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1,
            "max_tokens": 256, "concurrency": 2, "cache": True, "request_seed": 0}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "P2PPairGenerator", "inputs": {
            "model": ["2", 0], "clip": ["2", 1], "vae": ["2", 2], "rows": ["1", 0], "samples_per_pair": SAMPLES,
            "steps": STEPS, "width": 64, "height": 64, "seed": 5, "p_min": 0.1, "p_max": 0.9, "cfg_min": 7.5,
            "cfg_max": 15.0, "sampler_name": "euler_ancestral", "scheduler": "normal", "batch_size": 2}},
        # A random CLIP scores randomly: floors at -1 and no cap keep every pair, so the count is known.
        "4": {"class_type": "CLIPDirectionFilter", "inputs": {
            "rows": ["3", 0], "clip_weights": clip, "min_sim_0": -1.0, "min_sim_1": -1.0, "min_sim_dir": -1.0,
            "min_sim_image": -1.0, "top_k": 0, "batch_size": 8}},
        "5": {"class_type": "SaveEditDataset", "inputs": {
            "rows": ["4", 0], "dataset_name": name, "format": fmt, "image_format": "png"}},
    }


def committed_lines(folder: Path) -> int:
    """Rows a reference-layout writer has committed (whole metadata.jsonl lines), read while it runs."""
    if not folder.is_dir():
        return 0
    return sum(len(read_jsonl(pair / "metadata.jsonl")) for pair in folder.iterdir() if pair.is_dir())


def sampling_started(server: ComfyServer) -> bool:
    # ComfyUI's sampler progress bar (tqdm) in the server log: P2PPairGenerator is drawing pairs.
    return re.search(rf"\b[1-9]/{STEPS} \[", server.log_tail(20000)) is not None


def rows_by_caption_and_seed(folder: Path) -> Counter:
    rows = load_rows(folder)
    for row in rows:
        for image in (row.input_image, row.edited_image):
            Image.open(image).load()  # every listed image is whole
    return Counter((row.input_caption, row.seed) for row in rows)


def test_killed_dataset_build_reruns_to_every_pair_exactly_once_without_paying_twice(tmp_path):
    base, clip = dataset_base(tmp_path)
    name = "kill/dataset"
    folder = base / "output" / name
    expected = len(CAPTIONS) * SAMPLES

    with FakeOpenAIServer() as llm:
        prompt = dataset_graph(llm, "tiny_t2i.safetensors", clip, name)

        # 1. Killed while the pairs are drawn: the answers are cached, no row is written yet.
        server = ComfyServer(comfyui_dir(), base).start()
        try:
            server.queue(prompt)
            wait_for(lambda: sampling_started(server), server, interval=0.02)
            kill(server)
        finally:
            server.stop()
        assert len(llm.requests) == len(CAPTIONS)
        assert committed_lines(folder) == 0, "the kill was meant to land before the dataset was written"

        # 2. Killed while the rows are written: the rerun pays nothing and is stopped after the first rows.
        llm.reset()
        server = ComfyServer(comfyui_dir(), base).start()
        try:
            server.queue(prompt)
            wait_for(lambda: committed_lines(folder), server)
            kill(server)
        finally:
            server.stop()
        assert llm.requests == [], "finished captions must come from the LLM cache"
        on_disk = rows_by_caption_and_seed(folder)
        assert 0 < sum(on_disk.values()) < expected, "the kill was meant to land while the rows were written"
        assert max(on_disk.values()) == 1

        # 3. The rerun completes the dataset: every pair once, the rows written before the kill untouched.
        before = {path: path.read_bytes() for path in folder.rglob("*_[01].png")
                  if int(path.name.split("_")[0]) in {seed for _, seed in on_disk}}
        server = ComfyServer(comfyui_dir(), base).start()
        try:
            entry = server.run(prompt, timeout=600)
        finally:
            server.stop()
        assert llm.requests == []

    done = rows_by_caption_and_seed(folder)
    assert max(done.values()) == 1, "a pair is in the dataset twice"
    assert sorted(done) == sorted((caption, 5 + n) for n, caption in
                                  enumerate(c for c in CAPTIONS for _ in range(SAMPLES)))
    assert set(on_disk) <= set(done)
    assert all(path.read_bytes() == data for path, data in before.items())
    texts = [t for out in entry["outputs"].values() for t in out.get("text", []) if "in total" in t]
    assert texts == [f"{expected - sum(on_disk.values())} new rows, {expected} in total, in output/{name} "
                     "(reference)"]
    assert json.loads((folder / ".ip2p_dataset.json").read_text())["clean"] is True
    assert leftovers(base / "output") == []


def test_killed_parquet_save_reruns_to_a_dataset_that_hugging_face_loads(tmp_path):
    """The shipped workflow's format: one parquet shard is written at the end, whole or not at all."""
    import datasets
    import pyarrow.parquet as pq

    base, clip = dataset_base(tmp_path)
    name = "kill_parquet"
    folder = base / "output" / name
    expected = len(CAPTIONS) * SAMPLES

    with FakeOpenAIServer() as llm:
        prompt = dataset_graph(llm, "tiny_t2i.safetensors", clip, name, fmt="diffusers")
        server = ComfyServer(comfyui_dir(), base).start()
        try:
            server.queue(prompt)
            # The writer's manifest appears when SaveEditDataset opens the dataset, before its rows are added.
            wait_for((folder / ".ip2p_dataset.json").is_file, server)
            kill(server)
        finally:
            server.stop()
        paid = len(llm.requests)
        shards = sorted((folder / "data").glob("*.parquet"))
        assert sum(pq.read_metadata(shard).num_rows for shard in shards) in (0, expected)

        server = ComfyServer(comfyui_dir(), base).start()
        try:
            server.run(prompt, timeout=600)
        finally:
            server.stop()
        assert paid == len(CAPTIONS) and len(llm.requests) == paid, "the rerun must answer from the LLM cache"

    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(loaded) == expected
    keys = Counter(zip(loaded["input_caption"], loaded["seed"], strict=True))
    assert max(keys.values()) == 1 and len(keys) == expected
    assert leftovers(base / "output") == []


# --- training --------------------------------------------------------------------------------------------

TRAIN = {"mode": "lora", "steps": 8, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-3,
         "resolution": 32, "seed": 0, "ema_decay": 0.9, "cache_latents": True, "gradient_checkpointing": False,
         "lora_rank": 4, "checkpoint_every": 2, "validation_every": 0, "resume": True, "validation_count": 0,
         "validation_steps": 2}


def train_graph(ckpt: str, dataset: str, name: str) -> dict:
    return {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": ckpt}},
        "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"output/{dataset}", "format": "auto",
                                                          "max_rows": 0, "preview_count": 0}},
        "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                    "dataset": ["2", 0], "checkpoint_name": name, **TRAIN}},
    }


def state_of(base: Path, name: str) -> dict:
    return torch.load(base / "output" / "ip2p_train" / name / "state.pt", weights_only=True)


def every_safetensors_loads(folder: Path) -> dict[str, int]:
    """The training step each model file says it holds; a torn file would fail to load here."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    steps = {}
    for path in folder.glob("*.safetensors"):
        assert load_file(path), f"{path.name} holds no tensors"
        with safe_open(str(path), "pt") as handle:
            steps[path.stem] = json.loads(handle.metadata()["comfyui_ip2p.training"])["step"]
    return steps


def test_killed_training_resumes_from_its_last_checkpoint_to_the_uninterrupted_weights(tmp_path):
    base = make_base(tmp_path / "base")
    write_checkpoint(base / "models/checkpoints/tiny_ip2p.safetensors", "ip2p", "tiny", seed=0)
    write_rows(invert_rows(8, size=32, seed=0), base / "output", "invert", "reference")
    name, reference = "killed_run", "uninterrupted_run"
    state_path = base / "output" / "ip2p_train" / name / "state.pt"

    server = ComfyServer(comfyui_dir(), base).start()
    try:
        server.queue(train_graph("tiny_ip2p.safetensors", "invert", name))
        wait_for(state_path.is_file, server)
        kill(server)
    finally:
        server.stop()
    killed = state_of(base, name)
    step = killed["step"]
    assert 2 <= step < TRAIN["steps"] and step % TRAIN["checkpoint_every"] == 0
    assert every_safetensors_loads(base / "models" / "loras")[name] >= step

    server = ComfyServer(comfyui_dir(), base).start()
    try:
        server.run(train_graph("tiny_ip2p.safetensors", "invert", name), timeout=600)
        assert f"at step {step}" in server.log_tail(200000), "the rerun must say it resumed from the checkpoint"
        server.run(train_graph("tiny_ip2p.safetensors", "invert", reference), timeout=600)
    finally:
        server.stop()

    resumed, uninterrupted = state_of(base, name), state_of(base, reference)
    assert resumed["step"] == uninterrupted["step"] == TRAIN["steps"]
    assert resumed["losses"][:step] == killed["losses"], "the steps before the kill were not kept"
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5)
    for key, value in uninterrupted["params"].items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=1e-6)
    assert every_safetensors_loads(base / "models" / "loras") == {name: TRAIN["steps"], reference: TRAIN["steps"]}
    assert leftovers(base / "models", base / "output" / "ip2p_train") == []
