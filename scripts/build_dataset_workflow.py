"""Regenerates example_workflows/build_dataset.json, the paper's data engine as one graph:

    captions -> GenerateEditInstructions -> P2PPairGenerator (+ a text-to-image checkpoint)
             -> CLIPDirectionFilter -> SaveEditDataset

    .runtime/venv/bin/python scripts/build_dataset_workflow.py

The JSON file is what ships and what tests/server/test_build_dataset_workflow.py executes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The sibling script is importable once its folder is on the path.
from build_workflows import HERE, boot

T2I_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
NAME = "build_dataset.json"

NOTE = (
    "## Build an instruction-editing dataset (the paper's data engine)\n"
    "1. **Language model**: start any OpenAI-compatible server (vLLM, llama.cpp, Ollama, or OpenAI) and set "
    "`base_url` and `model`. A key, if needed, comes from the environment variable named in `api_key_env` "
    "or from a file in `ComfyUI/user/__ip2p_keys/` named in `api_key_file`: never type it into a widget.\n"
    f"2. **Images**: put a text-to-image SD1.5 checkpoint (e.g. `{T2I_CHECKPOINT}`) in `models/checkpoints`.\n"
    "3. **Filter**: put OpenAI's CLIP `ViT-L-14.pt` in `models/clip_filter` (nothing is downloaded).\n"
    "4. Queue. The dataset lands in `output/ip2p_dataset` (diffusers parquet: loads with "
    "`datasets.load_dataset` and trains with diffusers' train_instruct_pix2pix.py).\n\n"
    "LLM answers are cached (`output/ip2p_cache`) and the dataset writer skips rows already written, so "
    "re-queueing after a cancel or crash continues where it stopped. The paper drew 100 samples per caption "
    "pair with 100 steps and kept the best 4."
)


def build_dataset(info: dict) -> dict:
    from comfyui_ip2p.testing.workflow_builder import UIWorkflow

    wf = UIWorkflow(info)
    checkpoint = wf.add("CheckpointLoaderSimple", title="Text-to-image model (SD1.5)", ckpt_name=T2I_CHECKPOINT)
    instructions = wf.add(
        "GenerateEditInstructions",
        captions="a photograph of a girl riding a horse\nan oil painting of a lighthouse at dusk\n"
                 "a cozy living room with a fireplace\na red sports car parked on a city street",
        captions_file="none", base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct", mode="chat",
        api_key_env="OPENAI_API_KEY", api_key_file="", temperature=0.7, frequency_penalty=0.1, max_tokens=256,
        concurrency=4, cache=True, request_seed=0)
    pairs = wf.add("P2PPairGenerator", samples_per_pair=8, steps=50, width=512, height=512, seed=0, p_min=0.1,
                   p_max=0.9, cfg_min=7.5, cfg_max=15.0, sampler_name="euler_ancestral", scheduler="normal",
                   batch_size=2, caption_pairs="", negative="")
    clip_filter = wf.add("CLIPDirectionFilter", clip_weights="ViT-L-14.pt", min_sim_0=0.2, min_sim_1=0.2,
                         min_sim_dir=0.2, min_sim_image=0.7, top_k=4, batch_size=32)
    save = wf.add("SaveEditDataset", dataset_name="ip2p_dataset", format="diffusers", image_format="png")
    preview_inputs = wf.add("PreviewImage", title="Kept inputs")
    preview_edits = wf.add("PreviewImage", title="Kept edits")
    for slot, name in enumerate(("model", "clip", "vae")):
        wf.connect(checkpoint, slot, pairs, name)
    wf.connect(instructions, 0, pairs, "rows")
    wf.connect(pairs, 0, clip_filter, "rows")
    wf.connect(clip_filter, 0, save, "rows")
    wf.connect(clip_filter, 1, preview_inputs, "images")
    wf.connect(clip_filter, 2, preview_edits, "images")
    wf.note("How to use", NOTE)
    return wf.build()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = boot(Path(tmp))
        HERE.mkdir(exist_ok=True)
        (HERE / NAME).write_text(json.dumps(build_dataset(info), indent=2) + "\n")
        print(f"wrote example_workflows/{NAME}")


if __name__ == "__main__":
    main()
