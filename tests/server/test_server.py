"""Tier 3: a real ComfyUI server on 127.0.0.1 runs our nodes and every shipped workflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from comfyui_ip2p.cli.workflow import ui_to_api
from PIL import Image

pytestmark = pytest.mark.server

PACK = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK / "example_workflows").glob("*.json"))
# Edit workflows need only a checkpoint and an image; the dataset and training workflows have their own tests.
EDIT_WORKFLOWS = sorted((PACK / "example_workflows").glob("instruct_edit*.json"))
# The CosXL Edit template runs on the tiny SD1.5 model like the others, which proves its wiring and its own widget
# values (guidances, sampler) on the server: its graph is the one-node edit, the same for every model family. It
# cannot run on a small SDXL-IP2P model: ComfyUI builds SDXL's two text encoders only at full size (~820M
# parameters, too big for the tests to build) and a checkpoint without them gives no CLIP. SDXL-IP2P and CosXL Edit
# under the edit nodes are proven in tests/comfy/test_sdxl_ip2p.py and tests/comfy/test_diffusers_folder.py.
SD15_STAND_IN = {"instruct_edit_sdxl.json"}


def edit_workflow_id(workflow: Path) -> str:
    return workflow.name + ("-wiring-on-sd15" if workflow.name in SD15_STAND_IN else "")
OUR_NODES = ["LoadIP2PModel", "ConvertToIP2P", "InstructEdit", "DualCFGSampler", "IP2PGuider", "IP2PGuidanceGrid",
             "IP2PReferenceResize", "IP2PAutoGuidance", "IP2PComputePrecision", "EditRowsFromImages", "DatasetInfo"]


def output_files(comfy_base: Path, entry: dict) -> list[Path]:
    return [comfy_base / "output" / image["subfolder"] / image["filename"]
            for node_output in entry["outputs"].values() for image in node_output.get("images", [])
            if image.get("type") == "output"]


def test_our_nodes_are_listed_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    for name in OUR_NODES:
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        assert node["description"], f"{name} has no description"
        assert node["python_module"].startswith("custom_nodes.")
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                if name in ("InstructEdit", "LoadIP2PModel", "DualCFGSampler", "IP2PGuider"):
                    assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    edit = info["InstructEdit"]["input"]["required"]
    assert edit["image_guidance"][1]["default"] == 1.5
    assert edit["text_guidance"][1]["default"] == 7.5


def test_smoke_workflow_runs_our_node_and_writes_an_image(comfy_server, comfy_base, input_image):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": input_image}},
        "2": {"class_type": "IP2PReferenceResize", "inputs": {"image": ["1", 0], "resolution": 128}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "smoke"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    files = output_files(comfy_base, entry)
    assert len(files) == 1 and files[0].is_file()
    # 80x48 at 128: the reference rounds the short side up to 128 first, so the long side becomes 192
    assert Image.open(files[0]).size == (192, 128)


def shrink_for_test(prompt: dict, checkpoint: str, image_name: str) -> dict:
    """Same graph, tiny model and few steps: structure and wiring are what is under test."""
    overrides = {"checkpoint": checkpoint, "ckpt_name": checkpoint, "image": image_name, "steps": 2,
                 "resolution": 64}
    for node in prompt.values():
        for key, value in list(node["inputs"].items()):
            if key in overrides and not isinstance(value, list):
                node["inputs"][key] = overrides[key]
    return prompt


@pytest.mark.parametrize("workflow", EDIT_WORKFLOWS, ids=[edit_workflow_id(w) for w in EDIT_WORKFLOWS])
def test_shipped_workflow_executes_on_the_server(comfy_server, comfy_base, tiny_ip2p_ckpt, input_image,
                                                 workflow):
    ui = json.loads(workflow.read_text())
    prompt = shrink_for_test(ui_to_api(ui, comfy_server.get("/object_info")), tiny_ip2p_ckpt, input_image)
    entry = comfy_server.run(prompt, timeout=600)
    files = output_files(comfy_base, entry)
    assert files, f"{workflow.name} saved no image"
    for path in files:
        pixels = np.asarray(Image.open(path))
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0


def test_workflows_are_listed_as_templates(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    ours = next((v for k, v in templates.items() if "comfyui_ip2p" in k), None)
    assert ours is not None, f"pack missing from templates: {list(templates)}"
    assert {Path(w).stem for w in ours} >= {w.stem for w in WORKFLOWS}


def test_server_reports_bad_input_with_node_name(comfy_server, tiny_t2i_ckpt):
    prompt = {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_t2i_ckpt}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(RuntimeError, match="ConvertToIP2P"):
        comfy_server.run(prompt, timeout=120)


def test_headless_main_writes_the_edit(tmp_path, input_image, comfy_base):
    base = tmp_path / "base"
    (base / "input").mkdir(parents=True)
    source = comfy_base / "input" / input_image
    output = tmp_path / "out" / "edited.png"
    cmd = [sys.executable, "-m", "comfyui_ip2p.cli.edit", "--base-dir", str(base), "--image", str(source),
           "--output", str(output), "--steps", "2", "--resolution", "64", "--instruction", "make it snow"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EMBEDDED RANDOM model" in done.stdout
    # ComfyUI's complaints about its optional parts are one line (tests/comfy/test_runtime_startup.py).
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert Image.open(output).size == Image.open(source).size
    missing = subprocess.run([*cmd[:3], "--base-dir", str(base), "--image", str(tmp_path / "nope.png")],
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_masked_template_edits_only_the_painted_region(comfy_server, comfy_base, tiny_ip2p_ckpt):
    """What the mask editor writes: a photo whose alpha is 0 where the user painted (Load Image's MASK = 1 - alpha)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    alpha = np.full((48, 80), 255, dtype=np.uint8)
    alpha[:, 50:] = 0  # painted: the right part
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(comfy_base / "input" / "painted.png")
    ui = json.loads((PACK / "example_workflows" / "instruct_edit_masked.json").read_text())
    prompt = shrink_for_test(ui_to_api(ui, comfy_server.get("/object_info")), tiny_ip2p_ckpt, "painted.png")
    entry = comfy_server.run(prompt, timeout=600)
    (path,) = output_files(comfy_base, entry)
    edited = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert edited.shape == rgb.shape
    assert np.array_equal(edited[:, :50], rgb[:, :50]), "pixels outside the painted mask must be the photo's own"
    assert np.abs(edited[:, 58:] - rgb[:, 58:]).mean() > 5, "the painted region was not edited"
