"""A full disk while writing: SaveEditDataset (every format), TrainIP2P's checkpoint and the LLM answer cache.

The writes fail for real: the graphs run in a ComfyUI worker process (ComfyUI's own executor, in-process there)
whose file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) is lowered for one run, so the kernel refuses every
write past the limit with EFBIG, exactly where a full disk would stop it. Each time the node must fail naming
itself, the disk and the place; what was on disk before must still load completely, no temporary or half row
may remain, and once space is back a rerun completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from comfyui_ip2p.dataset.formats import FORMATS, load_rows
from comfyui_ip2p.dataset.instruction_cache import InstructionCache
from comfyui_ip2p.dataset.records import EditRow, open_image
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from PIL import Image

pytestmark = pytest.mark.slow

WORKER = r"""
import json, resource, signal, sys
from comfyui_ip2p.cli import runtime

runtime.boot(sys.argv[1], cpu=True)
runtime.load_nodes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
print("@@READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    limit = job.get("file_size_limit")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit if limit is not None else soft, hard))
    try:
        result = runtime.run_prompt(job["prompt"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out = {"ok": result.ok, "error": result.error, "node_errors": result.node_errors, "outputs": result.outputs}
    print("@@RESULT " + json.dumps(out, default=str), flush=True)
"""


class Worker:
    """A ComfyUI process on the session's base folder that runs API graphs, each under an optional size limit."""

    def __init__(self, base: Path) -> None:
        self.log: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(base)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                        start_new_session=True)
        self._read_until("@@READY")

    def _read_until(self, marker: str) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(marker):
                return line[len(marker):]
            self.log.append(line)
        raise AssertionError("the worker died:\n" + "".join(self.log[-40:]))

    def run(self, prompt: dict, file_size_limit: int | None = None) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"prompt": prompt, "file_size_limit": file_size_limit}) + "\n")
        self.process.stdin.flush()
        return json.loads(self._read_until("@@RESULT "))

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker(comfy_base, comfy_nodes, tiny_ip2p_ckpt):
    process = Worker(comfy_base)
    try:
        yield process
    finally:
        process.stop()


def failure_message(result: dict, node: str) -> str:
    assert not result["ok"], "the write under a full disk must fail"
    error = result["error"]
    assert error["node_type"] == node, error
    return error["exception_message"]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def files_under(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (the writer's lock file aside)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".ip2p_writer.lock"}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# --- SaveEditDataset --------------------------------------------------------------------------------------


def noisy_rows(groups: int = 2, per_group: int = 3, size: int = 64) -> list[EditRow]:
    """Incompressible images (~12 KB as PNG), so every image file is far past the size limit used below."""
    rng = np.random.default_rng(7)
    rows = []
    for g in range(groups):
        for s in range(per_group):
            pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]
            rows.append(EditRow(f"a field {g}", "make it snow", f"a snowy field {g}", Image.fromarray(pixels[0]),
                                Image.fromarray(pixels[1]), seed=10 * g + s))
    return rows


@pytest.fixture(scope="module")
def source_dataset(comfy_base) -> str:
    name = unique("disk_full_source")
    write_rows(noisy_rows(), comfy_base / "input", name, "reference", image_format="png")
    return name


def save_graph(source: str, target: str, fmt: str, max_rows: int) -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"input/{source}", "format": "auto",
                                                              "max_rows": max_rows, "preview_count": 0}},
            "2": {"class_type": "SaveEditDataset", "inputs": {"rows": ["1", 1], "dataset_name": target,
                                                              "format": fmt, "image_format": "png"}}}


def row_contents(path: Path) -> list[tuple]:
    rows = load_rows(path)
    return sorted((r.group, r.seed, r.input_caption, r.instruction, r.output_caption,
                   np.asarray(open_image(r.input_image)).tobytes(), np.asarray(open_image(r.edited_image)).tobytes())
                  for r in rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_on_a_full_disk_fails_clearly_and_keeps_the_dataset(comfy_base, worker, source_dataset, fmt):
    name = unique(f"full_{fmt}")
    folder = comfy_base / "output" / name
    first = worker.run(save_graph(source_dataset, name, fmt, max_rows=4))
    assert first["ok"], first["error"]
    before_rows, before_files = row_contents(folder), files_under(folder)
    assert len(before_rows) == 4

    # Room for the manifest and index files (< 1 KB), none for an image or a shard of two 12 KB rows.
    failed = worker.run(save_graph(source_dataset, name, fmt, max_rows=0), file_size_limit=4096)
    message = failure_message(failed, "SaveEditDataset")
    assert message.startswith(f"SaveEditDataset: could not write the dataset output/{name}: the disk is full"), \
        message
    assert "File too large" in message and "The 4 rows saved before are complete and kept" in message

    assert row_contents(folder) == before_rows, "the dataset on disk must still load, unchanged"
    assert temporaries(folder) == []
    after_files = files_under(folder)
    assert set(after_files) == set(before_files), "no half-written row (image, shard) may remain"
    data_files = {k: v for k, v in after_files.items() if not k.endswith((".json", ".jsonl"))}
    assert data_files == {k: v for k, v in before_files.items() if not k.endswith((".json", ".jsonl"))}

    again = worker.run(save_graph(source_dataset, name, fmt, max_rows=0))
    assert again["ok"], again["error"]
    assert again["outputs"]["2"]["text"] == [f"2 new rows, 6 in total, in output/{name} ({fmt})"]
    assert len(load_rows(folder)) == 6
    assert temporaries(folder) == []


# --- TrainIP2P --------------------------------------------------------------------------------------------


TRAIN = {"mode": "lora", "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-4, "resolution": 32,
         "seed": 0, "ema_decay": 0.9, "cache_latents": True, "gradient_checkpointing": False, "lora_rank": 4,
         "checkpoint_every": 0, "validation_every": 0, "validation_count": 1, "validation_steps": 1}


def train_graph(checkpoint: str, dataset: str, name: str, steps: int, resume: bool) -> dict:
    return {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": checkpoint}},
            "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"input/{dataset}", "format": "auto",
                                                              "max_rows": 0, "preview_count": 0}},
            "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                        "dataset": ["2", 0], "checkpoint_name": name, "steps": steps,
                                                        "resume": resume, **TRAIN}}}


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(comfy_base, worker, tiny_ip2p_ckpt,
                                                                       source_dataset):
    import torch

    name = unique("full_train")
    model = comfy_base / "models" / "loras" / f"{name}.safetensors"
    run_dir = comfy_base / "output" / "ip2p_train" / name
    try:
        first = worker.run(train_graph(tiny_ip2p_ckpt, source_dataset, name, steps=2, resume=False))
        assert first["ok"], first["error"]
        model_bytes, state_bytes = model.read_bytes(), (run_dir / "state.pt").read_bytes()
        assert len(model_bytes) > 8192

        failed = worker.run(train_graph(tiny_ip2p_ckpt, source_dataset, name, steps=4, resume=True),
                            file_size_limit=4096)
        message = failure_message(failed, "TrainIP2P")
        assert message.startswith(f"TrainIP2P: could not write {model}: the disk is full"), message
        assert "previous" in message and "unchanged" in message
        assert model.read_bytes() == model_bytes, "the previous checkpoint must be intact"
        assert (run_dir / "state.pt").read_bytes() == state_bytes, "and its resumable state too"
        assert temporaries(model.parent) == [] and temporaries(run_dir) == []

        again = worker.run(train_graph(tiny_ip2p_ckpt, source_dataset, name, steps=4, resume=True))
        assert again["ok"], again["error"]
        assert torch.load(run_dir / "state.pt", weights_only=True)["step"] == 4
        assert model.read_bytes() != model_bytes
    finally:
        model.unlink(missing_ok=True)
        for path in sorted(run_dir.rglob("*"), reverse=True) if run_dir.exists() else []:
            path.unlink() if path.is_file() else path.rmdir()
        if run_dir.exists():
            run_dir.rmdir()


# --- the LLM answer cache ---------------------------------------------------------------------------------


def instructions_graph(base_url: str, captions: list[str]) -> dict:
    inputs = {"captions": "\n".join(captions), "captions_file": "none", "base_url": base_url, "model": "fake-model",
              "mode": "chat", "api_key_env": "", "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1,
              "max_tokens": 256, "concurrency": 2, "cache": True, "request_seed": 0}
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def test_cache_append_on_a_full_disk_fails_clearly_and_loses_no_answer(comfy_base, worker):
    cache_path = comfy_base / "output" / "ip2p_cache" / "instructions.jsonl"
    tag = uuid.uuid4().hex[:8]
    captions = [f"a lighthouse {i} {tag}" for i in range(4)]
    with FakeOpenAIServer() as llm:
        first = worker.run(instructions_graph(llm.base_url, captions[:2]))
        assert first["ok"], first["error"]
        before = cache_path.read_bytes()

        # Ten more bytes fit: the next answer is torn mid-line, then the disk is full.
        failed = worker.run(instructions_graph(llm.base_url, captions), file_size_limit=len(before) + 10)
        message = failure_message(failed, "GenerateEditInstructions")
        assert message.startswith(f"GenerateEditInstructions: could not write the instruction cache {cache_path}: "
                                  "the disk is full"), message
        assert "answers cached before are kept" in message
        assert cache_path.read_bytes().startswith(before), "nothing cached before may be lost"
        cache = InstructionCache(cache_path)
        assert set(captions[:2]) <= {json.loads(line)["caption"] for line in
                                                          before.decode().splitlines() if '"caption"' in line}
        assert cache.skipped_lines <= 1, "at most the one torn line, which loading skips"

        llm.reset()
        again = worker.run(instructions_graph(llm.base_url, captions))
        assert again["ok"], again["error"]
        summary = again["outputs"]["2"]["text"][0]
        assert summary.startswith("4 rows from 4 captions (2 cached, 2 fetched)"), summary
        assert sorted(r.caption() for r in llm.requests) == sorted(captions[2:])
    lines = cache_path.read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line) for line in lines[-2:]), "the appends after the torn line start on a fresh line"
    assert os.path.getsize(cache_path) > len(before)
