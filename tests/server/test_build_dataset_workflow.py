"""Tier 3: the shipped build_dataset workflow runs for real on a ComfyUI server: captions -> a local
OpenAI-compatible server -> Prompt-to-Prompt pairs from a tiny text-to-image model -> CLIP filter -> dataset."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from comfyui_ip2p.cli.workflow import ui_to_api
from comfyui_ip2p.dataset.formats import load_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip

pytestmark = pytest.mark.server

PACK = Path(__file__).resolve().parents[2]
WORKFLOW = PACK / "example_workflows" / "build_dataset.json"
SAMPLES = 2


def by_type(prompt: dict, class_type: str) -> dict:
    matches = [node for node in prompt.values() if node["class_type"] == class_type]
    assert len(matches) == 1, f"expected one {class_type} in the workflow"
    return matches[0]["inputs"]


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders if folder.exists() for path in folder.rglob("*") if path.is_file()]


def test_build_dataset_workflow_matches_its_generator(comfy_server):
    sys.path.insert(0, str(PACK / "scripts"))
    try:
        from build_dataset_workflow import build_dataset
    finally:
        sys.path.remove(str(PACK / "scripts"))
    assert build_dataset(comfy_server.get("/object_info")) == json.loads(WORKFLOW.read_text()), (
        "example_workflows/build_dataset.json is stale: run scripts/build_dataset_workflow.py")


@pytest.mark.slow
def test_build_dataset_workflow_writes_a_filtered_dataset(comfy_server, comfy_base, tiny_t2i_ckpt, tmp_path):
    import datasets

    key = f"sk-ip2p-test-{uuid.uuid4().hex}"
    keys = comfy_base / "user" / "__ip2p_keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "server_test.key").write_text(key)
    clip_weights = write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip_server", seed=1)
    name = f"built/ds_{uuid.uuid4().hex[:8]}"

    with FakeOpenAIServer() as llm:
        prompt = ui_to_api(json.loads(WORKFLOW.read_text()), comfy_server.get("/object_info"))
        instructions = by_type(prompt, "GenerateEditInstructions")
        # Two of the shipped captions: every pair costs text encodings and UNet steps on 2 CPU cores.
        captions = [c for c in instructions["captions"].splitlines() if c.strip()][:2]
        instructions.update(base_url=llm.base_url, api_key_env="", api_key_file="server_test.key",
                            captions="\n".join(captions))
        by_type(prompt, "CheckpointLoaderSimple")["ckpt_name"] = tiny_t2i_ckpt
        by_type(prompt, "P2PPairGenerator").update(steps=2, width=64, height=64, samples_per_pair=SAMPLES,
                                                   batch_size=4)
        # A random CLIP scores randomly: thresholds at the floor keep every pair, up to top_k per caption pair.
        by_type(prompt, "CLIPDirectionFilter").update(clip_weights=clip_weights, min_sim_0=-1.0, min_sim_1=-1.0,
                                                      min_sim_dir=-1.0, min_sim_image=-1.0)
        by_type(prompt, "SaveEditDataset")["dataset_name"] = name
        entry = comfy_server.run(prompt, timeout=600)
        requests = llm.requests

    assert len(requests) == len(captions)
    assert {r.headers.get("authorization") for r in requests} == {f"Bearer {key}"}
    folder = comfy_base / "output" / name
    expected = len(captions) * SAMPLES
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
    assert len(loaded) == expected and set(loaded["edit_prompt"]) == {"add snow"}
    assert loaded[0]["input_image"].size == (64, 64)

    rows = load_rows(folder)
    assert sorted(r.input_caption for r in rows) == sorted(c for c in captions for _ in range(SAMPLES))
    assert all(r.output_caption == f"{r.input_caption}, covered in snow" for r in rows)
    assert all(0.1 <= r.p <= 0.9 and 7.5 <= r.cfg <= 15.0 and r.clip_sim_dir is not None for r in rows)
    assert len({(r.group, r.seed) for r in rows}) == expected
    save_text = next(out["text"][0] for out in entry["outputs"].values() if "in total" in "".join(out.get("text", [])))
    assert save_text == f"{expected} new rows, {expected} in total, in output/{name} (diffusers)"

    # The key went to the endpoint and nowhere else: not into the dataset, the LLM cache, previews or history.
    written = files_under(comfy_base / "output", comfy_base / "temp", comfy_base / "user" / "default")
    assert any("ip2p_cache" in p.parts for p in written)
    leaked = [p for p in [*written, comfy_server.log_path] if key.encode() in p.read_bytes()]
    assert leaked == []
    assert key not in json.dumps(entry)
