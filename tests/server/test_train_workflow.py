"""Tier 3: the shipped train workflow runs for real on a ComfyUI server: a small dataset -> TrainIP2P (LoRA)
-> InstructEdit with the trained model, plus the loss curve and the validation grid."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from comfyui_ip2p.cli.workflow import ui_to_api
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.synthetic import invert_rows
from PIL import Image

pytestmark = pytest.mark.server

PACK = Path(__file__).resolve().parents[2]
WORKFLOW = PACK / "example_workflows" / "train.json"


def by_type(prompt: dict, class_type: str) -> dict:
    matches = [node for node in prompt.values() if node["class_type"] == class_type]
    assert len(matches) == 1, f"expected one {class_type} in the workflow"
    return matches[0]["inputs"]


def saved(comfy_base: Path, entry: dict, prefix: str) -> list[Path]:
    return [comfy_base / "output" / image["subfolder"] / image["filename"]
            for output in entry["outputs"].values() for image in output.get("images", [])
            if image["type"] == "output" and image["filename"].startswith(prefix)]


def test_train_workflow_matches_its_generator(comfy_server):
    sys.path.insert(0, str(PACK / "scripts"))
    try:
        from build_train_workflow import train
    finally:
        sys.path.remove(str(PACK / "scripts"))
    assert train(comfy_server.get("/object_info")) == json.loads(WORKFLOW.read_text()), (
        "example_workflows/train.json is stale: run scripts/build_train_workflow.py")


def test_train_workflow_trains_a_lora_and_edits_with_it(comfy_server, comfy_base, tiny_ip2p_ckpt, input_image):
    dataset = f"train_wf_{uuid.uuid4().hex[:6]}"
    write_rows(invert_rows(6, size=32, seed=1), comfy_base / "output", dataset, "diffusers")
    name = f"wf_lora_{uuid.uuid4().hex[:6]}"
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), comfy_server.get("/object_info"))
    by_type(prompt, "LoadIP2PModel")["checkpoint"] = tiny_ip2p_ckpt
    by_type(prompt, "LoadEditDataset")["dataset"] = f"output/{dataset}"
    by_type(prompt, "LoadImage")["image"] = input_image
    by_type(prompt, "TrainIP2P").update(checkpoint_name=name, steps=3, batch_size=2, resolution=32,
                                        checkpoint_every=0, validation_every=0, validation_count=2,
                                        validation_steps=2)
    by_type(prompt, "InstructEdit").update(steps=2, resolution=64)

    entry = comfy_server.run(prompt, timeout=600)
    edits, losses = saved(comfy_base, entry, "ip2p_trained_edit"), saved(comfy_base, entry, "ip2p_train_loss")
    assert len(edits) == 1 and Image.open(edits[0]).size == Image.open(comfy_base / "input" / input_image).size
    assert len(losses) == 1 and Image.open(losses[0]).size == (640, 320)
    assert (comfy_base / "models" / "loras" / f"{name}.safetensors").is_file()
    run_dir = comfy_base / "output" / "ip2p_train" / name
    assert len(json.loads((run_dir / "loss.json").read_text())) == 3
    assert Image.open(run_dir / "validation.png").size[0] == 3 * 128  # input, target, one validation column
