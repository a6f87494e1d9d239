"""Regenerates example_workflows/train.json: LoadIP2PModel + LoadEditDataset -> TrainIP2P -> InstructEdit
with the result.

    .runtime/venv/bin/python scripts/build_train_workflow.py

The JSON file is what ships and what tests/server/test_train_workflow.py executes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The sibling script is importable once its folder is on the path.
from build_workflows import HERE, REAL_CHECKPOINT, boot

NAME = "train.json"
DATASET = "output/ip2p_dataset"  # where example_workflows/build_dataset.json saves its dataset

NOTE = (
    "## Fine-tune InstructPix2Pix on your own edits\n"
    f"1. Put an InstructPix2Pix checkpoint (e.g. `{REAL_CHECKPOINT}`) in `models/checkpoints`. To train from a "
    "text-to-image SD1.5 model instead (the paper's init), replace the loader with Load Checkpoint: TrainIP2P "
    "widens its first convolution itself.\n"
    f"2. Pick a dataset in Load Edit Dataset: `{DATASET}` is what the build_dataset workflow writes; any "
    "folder or parquet in the formats this pack reads works (the paper's released data, MagicBrush, HQ-Edit, "
    "UltraEdit, a folder of image pairs; other parquet through column_mapping).\n"
    "3. Queue. The LoRA goes to `models/loras/<checkpoint_name>.safetensors` (mode full writes a whole checkpoint "
    "to `models/checkpoints`), the loss curve and validation grid to `output/ip2p_train/<checkpoint_name>/`, "
    "and the trained model edits your image right away.\n\n"
    "Cancel any time: the run saves a resumable state, and queueing again with the same name and resume on "
    "continues it. LoRA (the default here) fits in a few GB of VRAM; a full fine-tune needs about 16 GB."
)


def train(info: dict) -> dict:
    from comfyui_ip2p.testing.workflow_builder import UIWorkflow

    wf = UIWorkflow(info)
    model = wf.add("LoadIP2PModel", checkpoint=REAL_CHECKPOINT)
    dataset = wf.add("LoadEditDataset", dataset=DATASET, format="auto", max_rows=0, preview_count=4,
                     dataset_override="", column_mapping="")
    trainer = wf.add("TrainIP2P", checkpoint_name="ip2p_finetune", mode="lora", steps=500, batch_size=4,
                     grad_accumulation=1, learning_rate=1e-4, resolution=256, seed=0, ema_decay=0.999,
                     cache_latents=True, gradient_checkpointing=False, lora_rank=16, checkpoint_every=100,
                     validation_every=100, resume=True, validation_count=4, validation_steps=20,
                     max_grad_norm=1.0, random_flip=True, precision="auto")
    image = wf.add("LoadImage", image="example.png")
    edit = wf.add("InstructEdit", title="Edit with the trained model", instruction="make it winter",
                  image_guidance=1.5, text_guidance=7.5, steps=20, seed=0, sampler_name="euler_ancestral",
                  scheduler="normal", keep_input_size=True, negative="", variations=1)
    save_edit = wf.add("SaveImage", filename_prefix="ip2p_trained_edit")
    save_loss = wf.add("SaveImage", title="Loss curve", filename_prefix="ip2p_train_loss")
    validation = wf.add("PreviewImage", title="Validation edits")
    for slot, name in enumerate(("model", "clip", "vae")):
        wf.connect(model, slot, trainer, name)
    wf.connect(dataset, 0, trainer, "dataset")
    wf.connect(trainer, 0, edit, "model")
    wf.connect(model, 1, edit, "clip")
    wf.connect(model, 2, edit, "vae")
    wf.connect(image, 0, edit, "image")
    wf.connect(edit, 0, save_edit, "images")
    wf.connect(trainer, 1, save_loss, "images")
    wf.connect(trainer, 2, validation, "images")
    wf.note("How to train", NOTE)
    return wf.build()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = boot(Path(tmp))
        HERE.mkdir(exist_ok=True)
        (HERE / NAME).write_text(json.dumps(train(info), indent=2) + "\n")
        print(f"wrote example_workflows/{NAME}")


if __name__ == "__main__":
    main()
