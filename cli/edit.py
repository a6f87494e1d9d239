"""Headless edit: runs the shipped InstructEdit workflow through ComfyUI and writes the edited image.

    python -m comfyui_ip2p.cli.edit --image photo.jpg --instruction "make it winter" --output out.png

With no InstructPix2Pix checkpoint in ComfyUI's models/checkpoints it builds a small random one (the
embedded default) so the whole path runs anywhere; its output is noise, and it says so loudly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

from . import runtime
from .workflow import WorkflowError

PACK = Path(__file__).resolve().parent.parent
WORKFLOW = PACK / "example_workflows" / "instruct_edit.json"
DEFAULT_MODEL = "comfyui_ip2p_random_tiny.safetensors"
BANNER = "!" * 78


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="comfyui-ip2p-edit",
        description="Edit an image by a written instruction with InstructPix2Pix, headless through ComfyUI.")
    parser.add_argument("--image", type=Path, help="input image (default: ComfyUI's input/example.png)")
    parser.add_argument("--instruction", default="make it winter", help="what to change (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("edited.png"), help="where to write the edit")
    parser.add_argument("--checkpoint", help="checkpoint name in models/checkpoints (default: the first "
                                             "InstructPix2Pix checkpoint there, else the embedded random model)")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="s_I (default: %(default)s)")
    parser.add_argument("--text-guidance", type=float, default=7.5, help="s_T (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: 20, 4 on the embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None,
                        help="longest side of the edit (default: the model's native size, 512 for SD1.x and "
                             "1024 for SDXL; 128 on the embedded model); 0 keeps the input's size")
    parser.add_argument("--workflow", type=Path, default=WORKFLOW, help="UI-format workflow to run")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="ComfyUI base directory (models/, input/, output/); default: the ComfyUI folder")
    runtime.add_verbose_option(parser)
    return parser.parse_args(argv)


def find_ip2p_checkpoint() -> str | None:
    import folder_paths

    from ..pipeline.loading import safetensors_in_channels

    for name in folder_paths.get_filename_list("checkpoints"):
        if name == DEFAULT_MODEL:
            continue
        path = folder_paths.get_full_path("checkpoints", name)
        try:
            if safetensors_in_channels(path) == 8:
                return name
        except ValueError:
            continue
    return None


def embedded_default() -> str:
    import folder_paths

    from ..pipeline.random_model import write_checkpoint

    target = Path(folder_paths.get_folder_paths("checkpoints")[0]) / DEFAULT_MODEL
    if not target.exists():
        write_checkpoint(target, "ip2p", "tiny", seed=0)
    print(f"{BANNER}\nNo InstructPix2Pix checkpoint found in {target.parent}.\n"
          f"Using the EMBEDDED RANDOM model ({DEFAULT_MODEL}): the output is noise, not an edit.\n"
          "For real edits put e.g. instruct-pix2pix-00-22000.safetensors (from timbrooks/instruct-pix2pix on the\n"
          "Hugging Face hub: https://huggingface.co/timbrooks/instruct-pix2pix)\n"
          f"into {target.parent} and run again.\n{BANNER}", flush=True)
    return DEFAULT_MODEL


def stage_image(image: Path | None) -> str:
    """Copies the input into ComfyUI's input folder under a unique name (LoadImage reads only from there)."""
    import folder_paths

    if image is None:
        return "example.png"
    if not image.is_file():
        raise SystemExit(f"error: input image {image} does not exist")
    name = f"headless_{uuid.uuid4().hex[:8]}{image.suffix.lower() or '.png'}"
    shutil.copyfile(image, Path(folder_paths.get_input_directory()) / name)
    return name


def build_prompt(args: argparse.Namespace, checkpoint: str, image_name: str, tiny: bool) -> dict:
    from ..pipeline.edit import NATIVE_RESOLUTION
    from .workflow import object_info_in_process, ui_to_api

    prompt = ui_to_api(json.loads(args.workflow.read_text()), object_info_in_process())
    overrides = {
        "checkpoint": checkpoint, "image": image_name, "instruction": args.instruction,
        "image_guidance": args.image_guidance, "text_guidance": args.text_guidance, "seed": args.seed,
        "steps": args.steps or (4 if tiny else 20),
        "resolution": args.resolution if args.resolution is not None else (128 if tiny else NATIVE_RESOLUTION),
        "filename_prefix": "headless/instruct_edit",
    }
    for node in prompt.values():
        for key in node["inputs"]:
            if key in overrides and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = overrides[key]
    return prompt


def run(args: argparse.Namespace) -> Path:
    output_dir = runtime.start(args.base_dir, verbose=args.verbose)

    checkpoint = args.checkpoint or find_ip2p_checkpoint()
    tiny = checkpoint is None or checkpoint == DEFAULT_MODEL
    checkpoint = checkpoint or embedded_default()
    image_name = stage_image(args.image)
    prompt = build_prompt(args, checkpoint, image_name, tiny)
    print(f"editing {args.image or image_name} with {checkpoint}: {args.instruction!r}", flush=True)
    result = runtime.run_prompt(prompt, on_event=runtime.progress_printer(prompt))
    if not result.ok:
        raise SystemExit(f"error: {runtime.format_error(result)}")
    saved = next(image for out in result.outputs.values() for image in out.get("images", []))
    source = output_dir / saved["subfolder"] / saved["filename"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, args.output)
    return args.output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        output = run(args)
    except (WorkflowError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
