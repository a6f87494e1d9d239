"""Train InstructPix2Pix from the command line, on one machine or many: the same trainer as the TrainIP2P node.

    comfyui-ip2p-train --model sd15.safetensors --dataset my_edits --output-dir runs \\
        --name my_ip2p --steps 2000 --batch-size 8       (or: python -m comfyui_ip2p.cli.train ...)
    torchrun --nproc_per_node 4 -m comfyui_ip2p.cli.train ...          # data-parallel over 4 GPUs
    accelerate launch -m comfyui_ip2p.cli.train ...                     # the same, through accelerate
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m comfyui_ip2p.cli.train ...
    torchrun --nproc_per_node 8 -m comfyui_ip2p.cli.train --parallel fsdp ...  # weights sharded (FSDP2)

`--model` is a single-file SD1.x checkpoint: InstructPix2Pix to fine-tune, or text-to-image to start from the
paper's init. Writes <output-dir>/<name>.safetensors (loads in ComfyUI) and <output-dir>/<name>/ (resumable
state, loss curve, validation grid); run the same command again to continue a stopped run. The per-process
batch is --batch-size; the effective batch is batch-size x grad-accumulation x processes. `--parallel fsdp` shards
a full fine-tune's weights, gradients and optimizer state over the processes (docs/distributed.md). Progress is
printed as JSON lines. ComfyUI is booted in this process (its loaders and model code); this module itself imports no
ComfyUI code until `main` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from ..dataset.formats import READ_FORMATS
from ..dataset.layouts import parse_mapping
from ..training.config import CACHE_LOCATIONS, PARALLELS, TrainConfig
from ..training.distributed import World, close_world, init_world, launched_world, pick_device
from . import runtime

# Set from the model, or meaningless on the command line.
_NOT_OPTIONS = {"prediction"}
_CHOICES = {"cache_location": CACHE_LOCATIONS, "parallel": PARALLELS}


def config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with its default."""
    group = parser.add_argument_group("training settings")
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_OPTIONS:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            group.add_argument(flag, type=kind, default=field.default, metavar=field.name.upper(),
                               choices=_CHOICES.get(field.name))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="comfyui-ip2p-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="single-file SD1.x checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--dataset", required=True,
                        help="dataset folder, parquet file or folder of hub parquet shards (any readable format); "
                             "rows and images are read as training needs them")
    parser.add_argument("--dataset-format", default="auto", choices=["auto", *READ_FORMATS],
                        help="skip detection (default: recognised by its files and columns)")
    parser.add_argument("--column-mapping", default="", metavar="TEXT",
                        help="read any parquet through these columns, e.g. 'input_image=source_img, "
                             "edited_image=target_img, instruction=instruction, mask=mask_img'")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--name", default="ip2p_finetune", help="file name of the result (no extension)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue <output-dir>/<name>/state.pt if present (default)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0 = torch's default)")
    parser.add_argument("--comfyui-base", type=Path, default=None,
                        help="ComfyUI base folder to boot with (default: a temporary one)")
    runtime.add_verbose_option(parser)
    config_options(parser)
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_OPTIONS}
    return TrainConfig(**values)


def emit(world: World, event: str, everywhere: bool = False, **fields: object) -> None:
    """A JSON line on stdout, from rank 0 (or from every process, tagged with its rank)."""
    if world.is_main or everywhere:
        # One write per line: lines from several processes sharing a pipe then never interleave.
        sys.stdout.write(json.dumps({"event": event, "rank": world.rank, **fields}) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from(args)
    world = launched_world()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = pick_device(world)
    init_world(world, use_cuda)
    with tempfile.TemporaryDirectory(prefix="ip2p-train-comfy-") as scratch:
        runtime.start(args.comfyui_base or scratch, cpu=not use_cuda, with_nodes=False, verbose=args.verbose)
        return train(args, config, world)


def train(args: argparse.Namespace, config: TrainConfig, world: World) -> int:
    import comfy.sd

    from ..pipeline.train import RunFiles, run_training

    if not Path(args.model).is_file():
        raise SystemExit(f"--model {args.model}: no such file")
    try:
        mapping = parse_mapping(args.column_mapping) if args.column_mapping.strip() else None
    except ValueError as error:
        raise SystemExit(f"--column-mapping: {error}") from None
    loaded = comfy.sd.load_checkpoint_guess_config(str(args.model), output_vae=True, output_clip=True)
    model, clip, vae = loaded[:3]
    files = RunFiles(model=args.output_dir / f"{args.name}.safetensors", run_dir=args.output_dir / args.name)
    dataset = {"path": str(args.dataset), "format": None if args.dataset_format == "auto" else args.dataset_format,
               "mapping": mapping}
    emit(world, "start", processes=world.size, samples_per_step=config.batch_size * config.grad_accumulation
         * world.size, steps=config.steps)
    try:
        outcome = run_training(
            model, clip, vae, dataset, config, files, resume=args.resume, world=world,
            # "rows": the dataset rows this process trained on in the step (each row once per epoch over all ranks)
            on_step=lambda trainer, loss: emit(world, "step", True, step=trainer.step, loss=loss,
                                               rows=trainer.step_rows),
            on_saved=lambda trainer: emit(world, "checkpoint", step=trainer.step, path=str(files.model)))
    finally:
        close_world(world)
    emit(world, "done", True, step=outcome.step, model=str(outcome.model_path), **outcome.stats)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
