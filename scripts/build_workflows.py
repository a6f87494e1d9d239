"""Regenerates the shipped UI-format workflows in example_workflows/ from the descriptions below.

    .runtime/venv/bin/python scripts/build_workflows.py

The JSON files are what ships and what the tests execute; this script only saves hand-placing nodes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

REAL_CHECKPOINT = "instruct-pix2pix-00-22000.safetensors"
COSXL_CHECKPOINT = "cosxl_edit.safetensors"  # the public file's name (stabilityai/cosxl on the Hugging Face hub)
HERE = Path(__file__).resolve().parent.parent / "example_workflows"

EDIT_NOTE = (
    "## InstructPix2Pix edit\n"
    f"Put an InstructPix2Pix checkpoint (e.g. `{REAL_CHECKPOINT}`) in `models/checkpoints`, load your photo, "
    "write what to change as an instruction, and queue.\n\n"
    "- **image_guidance** (s_I, 1.5): higher keeps more of the photo.\n"
    "- **text_guidance** (s_T, 7.5): higher follows the instruction more strongly.\n"
    "- Unsure? Try the Guidance Grid node."
)


def boot(base: Path) -> dict:
    from comfyui_ip2p.cli import runtime
    from comfyui_ip2p.cli.workflow import object_info_in_process
    from comfyui_ip2p.testing.comfy_server import link_pack

    (base / "models/checkpoints").mkdir(parents=True)
    for name in (REAL_CHECKPOINT, COSXL_CHECKPOINT):  # empty placeholders: the loader's list must offer them
        (base / "models/checkpoints" / name).write_bytes(b"")
    (base / "input").mkdir()
    (base / "input/example.png").write_bytes(b"")
    link_pack(base)
    runtime.boot(base, cpu=True)
    runtime.load_nodes()
    return object_info_in_process()


def one_node_edit(info: dict, checkpoint: str, prefix: str, note: str, **edit_values) -> dict:
    """Load model + Load Image -> InstructEdit -> Save Image, with a note: the shape of both one-node templates."""
    from comfyui_ip2p.testing.workflow_builder import UIWorkflow

    wf = UIWorkflow(info)
    model = wf.add("LoadIP2PModel", checkpoint=checkpoint)
    image = wf.add("LoadImage", image="example.png")
    edit = wf.add("InstructEdit", **edit_values)
    save = wf.add("SaveImage", filename_prefix=prefix)
    for slot, name in enumerate(("model", "clip", "vae")):
        wf.connect(model, slot, edit, name)
    wf.connect(image, 0, edit, "image")
    wf.connect(edit, 0, save, "images")
    wf.note("How to use", note)
    return wf.build()


def basic_edit(info: dict) -> dict:
    return one_node_edit(info, REAL_CHECKPOINT, "instruct_edit", EDIT_NOTE, instruction="make it winter",
                         image_guidance=1.5, text_guidance=7.5, steps=20, seed=0, sampler_name="euler_ancestral",
                         scheduler="normal", keep_input_size=True, negative="", variations=1)


def advanced_edit(info: dict) -> dict:
    """LoadIP2PModel chained with core nodes: a model patch, text encoders, decode, upscale, save."""
    from comfyui_ip2p.testing.workflow_builder import UIWorkflow

    wf = UIWorkflow(info)
    model = wf.add("LoadIP2PModel", checkpoint=REAL_CHECKPOINT)
    image = wf.add("LoadImage", image="example.png")
    resize = wf.add("IP2PReferenceResize", resolution=512)
    freeu = wf.add("FreeU_V2", b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    positive = wf.add("CLIPTextEncode", title="Instruction", text="turn the sky into a sunset")
    negative = wf.add("CLIPTextEncode", title="Empty prompt (unconditional)", text="")
    sampler = wf.add("DualCFGSampler", image_guidance=1.5, text_guidance=7.5, steps=20, seed=0,
                     sampler_name="euler_ancestral", scheduler="normal", denoise=1.0)
    decode = wf.add("VAEDecode")
    upscale = wf.add("ImageScaleBy", upscale_method="lanczos", scale_by=1.5)
    save = wf.add("SaveImage", filename_prefix="instruct_edit_advanced")
    wf.connect(model, 0, freeu, "model")
    wf.connect(freeu, 0, sampler, "model")
    wf.connect(model, 1, positive, "clip")
    wf.connect(model, 1, negative, "clip")
    wf.connect(positive, 0, sampler, "positive")
    wf.connect(negative, 0, sampler, "negative")
    wf.connect(image, 0, resize, "image")
    wf.connect(resize, 0, sampler, "image")
    wf.connect(model, 2, sampler, "vae")
    wf.connect(sampler, 0, decode, "samples")
    wf.connect(model, 2, decode, "vae")
    wf.connect(decode, 0, upscale, "image")
    wf.connect(upscale, 0, save, "images")
    wf.note("Advanced edit", "The edit as separate core-compatible pieces: patch the model (FreeU here, or a LoRA "
                             "loader, RescaleCFG, PAG...), encode the texts yourself, sample with the Dual CFG "
                             "Sampler (or the IP2P Guider into SamplerCustomAdvanced), then post-process.\n\n"
            + EDIT_NOTE)
    return wf.build()


MASKED_NOTE = (
    "## Edit only a region\n"
    "Load your photo, right-click Load Image -> **Open in MaskEditor** and paint the region to change. Only that "
    "region is edited; every pixel outside the mask stays exactly the photo's. `mask_feather` softens the edge "
    "inside the mask. Without a painted mask the photo comes back unchanged.\n\n" + EDIT_NOTE
)


def masked_edit(info: dict) -> dict:
    """Load Image with its painted mask -> InstructEdit with the mask."""
    from comfyui_ip2p.testing.workflow_builder import UIWorkflow

    wf = UIWorkflow(info)
    model = wf.add("LoadIP2PModel", checkpoint=REAL_CHECKPOINT)
    image = wf.add("LoadImage", image="example.png")
    edit = wf.add("InstructEdit", instruction="make the sky pink", image_guidance=1.5, text_guidance=7.5,
                  steps=20, seed=0, sampler_name="euler_ancestral", scheduler="normal",
                  keep_input_size=True, negative="", variations=1, mask_feather=8)
    save = wf.add("SaveImage", filename_prefix="instruct_edit_masked")
    for slot, name in enumerate(("model", "clip", "vae")):
        wf.connect(model, slot, edit, name)
    wf.connect(image, 0, edit, "image")
    wf.connect(image, 1, edit, "mask")
    wf.connect(edit, 0, save, "images")
    wf.note("How to use", MASKED_NOTE)
    return wf.build()


# CosXL Edit as its ComfyUI example runs it (DualCFGGuider cfg 5 on the text, 1.5 on the image, Euler, normal
# schedule, 20 steps); Stability's CosXL demo uses text guidance 7 with diffusers' image guidance 1.5.
COSXL_TEXT_GUIDANCE, COSXL_IMAGE_GUIDANCE, COSXL_SAMPLER = 5.0, 1.5, "euler"

SDXL_NOTE = (
    "## CosXL Edit (SDXL InstructPix2Pix) at 1024\n"
    f"Download `{COSXL_CHECKPOINT}` from the `stabilityai/cosxl` model page on the Hugging Face hub (gated: accept "
    "the terms there first; non-commercial CosXL licence) and put it in `models/checkpoints`. An SDXL "
    "InstructPix2Pix model saved by diffusers goes in `models/diffusers/<name>/` instead and is listed as "
    "`diffusers/<name>`. Load your photo, write the instruction, queue.\n\n"
    "- **resolution** -64 = the model's native size: 1024 for SDXL and CosXL Edit.\n"
    f"- **text_guidance** {COSXL_TEXT_GUIDANCE:g}, **image_guidance** {COSXL_IMAGE_GUIDANCE:g}: the values of "
    "ComfyUI's own CosXL Edit example (DualCFGGuider cfg 5, image cfg 1.5), lower than the paper's 7.5 for "
    "SD1.5. Stability's CosXL demo uses 7: raise text_guidance towards it if the edit is too weak.\n"
    f"- **sampler** {COSXL_SAMPLER}: the deterministic Euler of that example and of Stability's demo "
    "(diffusers' EDM Euler scheduler); ancestral samplers work too.\n"
    "- Unsure? Try the Guidance Grid node."
)


def sdxl_edit(info: dict) -> dict:
    """The one-node edit for CosXL Edit (SDXL InstructPix2Pix) with the values its users run it at."""
    return one_node_edit(info, COSXL_CHECKPOINT, "instruct_edit_sdxl", SDXL_NOTE, instruction="make it night",
                         image_guidance=COSXL_IMAGE_GUIDANCE, text_guidance=COSXL_TEXT_GUIDANCE, steps=20, seed=0,
                         sampler_name=COSXL_SAMPLER, scheduler="normal", resolution=-64, keep_input_size=True,
                         negative="", variations=1)


WORKFLOWS = {"instruct_edit.json": basic_edit, "instruct_edit_advanced.json": advanced_edit,
             "instruct_edit_masked.json": masked_edit, "instruct_edit_sdxl.json": sdxl_edit}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = boot(Path(tmp))
        HERE.mkdir(exist_ok=True)
        for name, build in WORKFLOWS.items():
            (HERE / name).write_text(json.dumps(build(info), indent=2) + "\n")
            print(f"wrote example_workflows/{name}")


if __name__ == "__main__":
    main()
