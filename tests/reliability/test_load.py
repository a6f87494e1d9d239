"""Load: 50 edit prompts queued back to back on a real ComfyUI server all complete, the server's memory stops
growing after the first few, and nothing is left in ComfyUI's temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.server]

PROMPTS = 50
WARM_UP = 10  # prompts after which memory must stay flat (allocator and caches settle in the first few)
# The edit returns a 512x512 image (keep_input_size), 3 MiB as a float tensor: a leak of each result alone would
# add 120 MiB over the 40 prompts after warm-up. Measured growth without a leak: see the report in the assert.
MAX_GROWTH_MIB = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, comfy_base, tiny_ip2p_ckpt):
    """A server of its own (its own base folder), so its memory is ours alone."""
    from comfyui_ip2p.cli.runtime import comfyui_dir
    from comfyui_ip2p.testing.comfy_server import ComfyServer

    base = tmp_path_factory.mktemp("load_base")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / tiny_ip2p_ckpt).symlink_to(comfy_base / "models" / "checkpoints" /
                                                                   tiny_ip2p_ckpt)
    (base / "input").mkdir()
    y, x = np.mgrid[0:512, 0:512]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(base / "input" / "load.png")
    server = ComfyServer(comfyui_dir(), base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def edit_prompt(checkpoint: str, seed: int) -> dict:
    return {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": checkpoint}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "load.png"}},
            "3": {"class_type": "InstructEdit", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0],
                "instruction": "make it winter", "image_guidance": 1.5, "text_guidance": 7.5, "steps": 2,
                "seed": seed, "sampler_name": "euler", "scheduler": "normal", "resolution": 64,
                "keep_input_size": True}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"load/{seed}"}}}


def test_fifty_edits_back_to_back_complete_without_memory_growth_or_temp_files(load_server, tiny_ip2p_ckpt):
    server = load_server
    pid = server.process.pid
    ids = [server.queue(edit_prompt(tiny_ip2p_ckpt, seed)) for seed in range(PROMPTS)]
    rss = []
    for prompt_id in ids:
        entry = server.wait(prompt_id, timeout=300)
        rss.append(rss_mib(pid))
        assert len(entry["outputs"]["4"]["images"]) == 1

    saved = sorted((server.base_dir / "output" / "load").glob("*.png"))
    assert len(saved) == PROMPTS, "every prompt ran (different seeds: nothing answered from the cache)"
    assert Image.open(saved[-1]).size == (512, 512)
    temp = server.base_dir / "temp"
    assert not temp.exists() or sorted(os.listdir(temp)) == [], "nothing of ours may be left in temp/"

    growth = rss[-1] - rss[WARM_UP - 1]
    report = (f"RSS MiB after prompt 1: {rss[0]:.0f}, {WARM_UP}: {rss[WARM_UP - 1]:.0f}, {PROMPTS}: {rss[-1]:.0f}, "
              f"max {max(rss):.0f}; growth after warm-up {growth:.1f} MiB")
    print(report)
    assert growth < MAX_GROWTH_MIB, report
    assert max(rss[WARM_UP:]) - rss[WARM_UP - 1] < 2 * MAX_GROWTH_MIB, report
