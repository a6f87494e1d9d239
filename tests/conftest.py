"""Shared fixtures: one ComfyUI base folder per test session, tiny random checkpoints, a real server.

Pure unit tests (tests/unit) never touch these fixtures and never import ComfyUI.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def models_released_before_exit():
    """Drops the models tests kept alive while Python still runs: ComfyUI's ModelPatcher.__del__ fails noisily
    when it first runs during interpreter shutdown."""
    yield
    import gc
    import sys

    if "comfy.model_management" not in sys.modules:
        return
    import comfy.model_management
    from comfyui_ip2p.testing import probe_nodes

    probe_nodes.forget_checkpoints()
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory booted in this process, with this pack in its custom_nodes."""
    from comfyui_ip2p.cli import runtime
    from comfyui_ip2p.testing.comfy_server import link_pack

    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base)
    runtime.boot(base, cpu=True)
    return base


@pytest.fixture(scope="session")
def comfy_nodes(comfy_base) -> dict:
    from comfyui_ip2p.cli import runtime

    return runtime.load_nodes()


@pytest.fixture(scope="session")
def tiny_ip2p_ckpt(comfy_base) -> str:
    """Name (as ComfyUI lists it) of a tiny random SD1.5-InstructPix2Pix checkpoint."""
    from comfyui_ip2p.testing.tiny_models import write_checkpoint

    write_checkpoint(comfy_base / "models/checkpoints/tiny_ip2p.safetensors", "ip2p", "tiny", seed=0)
    return "tiny_ip2p.safetensors"


@pytest.fixture(scope="session")
def tiny_t2i_ckpt(comfy_base) -> str:
    """Name of a tiny random SD1.5 text-to-image checkpoint (4 input channels)."""
    from comfyui_ip2p.testing.tiny_models import write_checkpoint

    write_checkpoint(comfy_base / "models/checkpoints/tiny_t2i.safetensors", "t2i", "tiny", seed=10)
    return "tiny_t2i.safetensors"


@pytest.fixture(scope="session")
def comfy_server(comfy_base, tiny_ip2p_ckpt, tiny_t2i_ckpt):
    """A real ComfyUI server on 127.0.0.1 sharing the session's base folder; always stopped."""
    from comfyui_ip2p.cli.runtime import comfyui_dir
    from comfyui_ip2p.testing.comfy_server import ComfyServer

    server = ComfyServer(comfyui_dir(), comfy_base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def input_image(comfy_base) -> str:
    """A small RGB photo-like test image in ComfyUI's input folder; returns its name."""
    import numpy as np
    from PIL import Image

    name = "ip2p_test_input.png"
    path = comfy_base / "input" / name
    if not path.exists():
        y, x = np.mgrid[0:48, 0:80]
        rgb = np.stack([x * 3 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(path)
    return name

