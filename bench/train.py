"""Training samples/s and peak memory: our trainer against the recipe of diffusers'
examples/instruct_pix2pix/train_instruct_pix2pix.py, on the same model, batch and resolution.

    .runtime/venv/bin/python bench/train.py --size tiny --res 128 --batch 4 --steps 6
    .runtime/venv/bin/python bench/train.py --size full --res 256 --batch 1 --steps 2 --warmup 1
    .runtime/venv/bin/python bench/train.py --device cuda --size full --res 256 --batch 8 --steps 20
    .runtime/venv/bin/python bench/train.py --rows 2000 --size tiny --res 64 --batch 4 --steps 20

Variants (each in its own interpreter; all hold the same loaded ComfyUI checkpoint, the same frozen CLIP and
VAE, and train on the same synthetic pairs with AdamW lr 1e-4, clipping 1.0, EMA, the paper's dropout):
  recipe           diffusers' training-step logic, re-implemented here on the same components: the UNet as a
                   diffusers UNet2DConditionModel with the same weights, every step VAE-encodes target and
                   input, text-encodes the instructions and the empty prompt, DDPMScheduler.add_noise,
                   clip_grad_norm_, torch AdamW (its default), diffusers' EMAModel.step
  recipe_gc        the same with unet.enable_gradient_checkpointing()
  ours_uncached    training.Trainer encoding every sample every step (pixel augmentation, as the recipe)
  ours_cached      training.Trainer from latents and text embeddings encoded once (cache time reported apart)
  ours_*_gc        the same with gradient checkpointing

With --rows N the bench compares training that streams with the in-memory path instead (variants memory_cache,
disk_cache) on a hub-style parquet dataset of N rows (eight instructions), written once per workdir:
  memory_cache     today's in-memory path: every row read into a list, the latent cache in memory
  disk_cache       streaming: the rows read lazily (dataset.source), the latent cache in memory-mapped chunk
                   files on disk (training.latent_cache), encoded afresh in the run
Memory is then the peak RSS of the whole child (the cache build included); ratios are disk_cache / memory_cache.

Memory is the peak RSS (and CUDA peak) during the timed steps, after a reset that follows the set-up and
warm-up, so it covers what a training step keeps resident. Ratios compare with the recipe at the same
gradient-checkpointing setting. The parent never imports ComfyUI. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from common import fmt, format_table, peaks_mb, reset_peaks, run_child, synchronize

REPO = Path(__file__).resolve().parent.parent
LR, CLIP_NORM, EMA_DECAY, DROPOUT = 1e-4, 1.0, 0.9999, 0.05


@dataclass(frozen=True)
class Variant:
    label: str
    recipe: bool
    cached: bool
    checkpointing: bool
    store: str = ""  # --rows comparisons: where the latent cache lives ("memory" or "disk")


VARIANTS = {
    "recipe": Variant("diffusers recipe step", True, False, False),
    "recipe_gc": Variant("diffusers recipe step + grad ckpt", True, False, True),
    "ours_uncached": Variant("ours, encode every step", False, False, False),
    "ours_cached": Variant("ours, latent cache", False, True, False),
    "ours_uncached_gc": Variant("ours, encode every step + grad ckpt", False, False, True),
    "ours_cached_gc": Variant("ours, latent cache + grad ckpt", False, True, True),
    "memory_cache": Variant("rows in a list, latent cache in memory", False, True, False, "memory"),
    "disk_cache": Variant("lazy rows, latent cache on disk", False, True, False, "disk"),
}
STREAMING = ("memory_cache", "disk_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random model layout")
    parser.add_argument("--res", type=int, default=128, help="training resolution (multiple of 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per child (0 = default)")
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32",
                        help="TrainIP2P's precision for our variants (the recipe variants stay fp32)")
    parser.add_argument("--rows", type=int, default=0,
                        help="compare streaming from disk with the in-memory path on a dataset of this many rows")
    parser.add_argument("--variants", default=None,
                        help="comma-separated (default: all but the streaming ones; with --rows: the streaming ones)")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the random checkpoint between runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    parser.add_argument("--child-timeout", type=float, default=3600.0)
    parser.add_argument("--only", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(STREAMING if args.rows else [v for v in VARIANTS if v not in STREAMING])
    return args


# --- child ----------------------------------------------------------------------------------------------------

def boot(args: argparse.Namespace):
    """ComfyUI in this process, the random checkpoint (written once per workdir) and its MODEL, CLIP, VAE."""
    from comfyui_ip2p.cli import runtime

    runtime.boot(args.workdir, cpu=args.device == "cpu")
    import comfy.sd
    import comfy.utils
    from edit import write_checkpoint  # bench/edit.py: SD1.5's true up-path layout, loadable by diffusers

    comfy.utils.PROGRESS_BAR_ENABLED = False
    path = args.workdir / "models" / "checkpoints" / f"bench_train_{args.size}.safetensors"
    if not path.is_file():
        write_checkpoint(path, args.size, 0)
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]


def rows_for(args: argparse.Namespace):
    from comfyui_ip2p.testing.synthetic import invert_rows

    return invert_rows(max(16, 2 * args.batch), size=args.res, seed=0)


def streaming_dataset(args: argparse.Namespace) -> Path:
    """A diffusers-layout parquet dataset of args.rows rows (4 shards) over 32 distinct pairs at the bench
    resolution and eight instructions; written once per workdir."""
    import io

    from comfyui_ip2p.dataset.records import EditRow
    from comfyui_ip2p.testing.public_layouts import write_layout
    from comfyui_ip2p.testing.synthetic import invert_rows

    folder = args.workdir / f"rows-{args.rows}-{args.res}"
    if (folder / "data").is_dir():
        return folder

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    pairs = [(png(r.input_image), png(r.edited_image)) for r in invert_rows(32, size=args.res, seed=0)]
    # Eight instructions: the text encoder (a full-size CLIP even in the tiny model) takes ~0.25 s per distinct
    # text on a CPU, and a chunk encodes each of its distinct instructions once.
    rows = [EditRow("shapes", f"invert the colours, take {i % 8}", "inverted shapes", *pairs[i % 32], seed=i)
            for i in range(args.rows)]
    return write_layout("diffusers", folder, rows, shards=4)


def streaming_batches(args: argparse.Namespace, variant: Variant, clip, vae):
    from comfyui_ip2p.dataset.source import open_rows
    from comfyui_ip2p.pipeline.trainee import encoders
    from comfyui_ip2p.training.data import make_batches
    from comfyui_ip2p.training.latent_cache import DiskChunks, MemoryChunks

    source = open_rows(streaming_dataset(args))
    if variant.store == "memory":
        return make_batches(list(source), encoders(clip, vae), args.res, True, store=MemoryChunks())
    folder = args.workdir / "latent_cache" / f"run-{os.getpid()}"  # encoded afresh: the build is measured
    return make_batches(source, encoders(clip, vae), args.res, True, store=DiskChunks(folder))


def ours(args: argparse.Namespace, variant: Variant, model, clip, vae) -> tuple[Callable[[], float], dict]:
    from comfyui_ip2p.pipeline.train import Session
    from comfyui_ip2p.pipeline.trainee import encoders
    from comfyui_ip2p.training.config import TrainConfig
    from comfyui_ip2p.training.data import make_batches
    from comfyui_ip2p.training.trainer import Trainer

    config = TrainConfig(steps=10**9, batch_size=args.batch, resolution=args.res, learning_rate=LR,
                         max_grad_norm=CLIP_NORM, ema_decay=EMA_DECAY, cache_latents=variant.cached,
                         gradient_checkpointing=variant.checkpointing, precision=args.precision)
    with torch.inference_mode(False):
        session = Session(model, clip, vae, config)
        started = time.perf_counter()
        if variant.store:
            batches = streaming_batches(args, variant, clip, vae)
        else:
            batches = make_batches(rows_for(args), encoders(clip, vae), args.res, variant.cached)
        cache_seconds = time.perf_counter() - started
        trainer = Trainer(session.config, session.trainable, batches, session.device,
                          latent_channels=session.latent_channels)
    return trainer.train_step, {"cache_seconds": cache_seconds}


def recipe(args: argparse.Namespace, variant: Variant, model, clip, vae) -> tuple[Callable[[], float], dict]:
    """One training step as diffusers' train_instruct_pix2pix.py does it, on our loaded components."""
    import comfy.model_management
    from comfyui_ip2p.pipeline.trainee import encode_images, encode_texts
    from comfyui_ip2p.testing.tiny_models import UNET_PREFIX, diffusers_twin
    from comfyui_ip2p.training.data import crop_flip, load_pair, place
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from edit import sd15_layout

    device = comfy.model_management.get_torch_device()
    state = {UNET_PREFIX + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    unet = diffusers_twin(state, sd15_layout(args.size), 8, torch.float32).to(device).train()
    if variant.checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=EMA_DECAY, model_cls=UNet2DConditionModel, model_config=unet.config)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    rows, scale = rows_for(args), float(model.model.latent_format.scale_factor)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def pixels(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        sources, edits = [], []
        for i in indices:  # decode, resize, joint random crop and flip: the script's dataloader transforms
            source, edited = load_pair(rows[i], args.res)
            where = place(torch.rand(3, generator=generator), source.shape[1], source.shape[2], args.res, True, True)
            sources.append(crop_flip(source, where, args.res))
            edits.append(crop_flip(edited, where, args.res))
        return torch.stack(sources), torch.stack(edits)

    def step() -> float:
        indices = torch.randint(0, len(rows), (args.batch,), generator=generator).tolist()
        original, edited = pixels(indices)
        latents = encode_images(vae, edited).to(device) * scale
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = encode_texts(clip, [rows[i].instruction for i in indices]).to(device)
        image_embeds = encode_images(vae, original).to(device)
        random_p = torch.rand(args.batch, generator=generator).to(device)
        null = encode_texts(clip, [""]).to(device)  # the script encodes it inside the step
        hidden = torch.where((random_p < 2 * DROPOUT).reshape(-1, 1, 1), null, hidden)
        image_mask = 1 - ((random_p >= DROPOUT) & (random_p < 3 * DROPOUT)).float()
        image_embeds = image_embeds * image_mask.reshape(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            prediction = unet(torch.cat([noisy, image_embeds], dim=1), timesteps, hidden, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        return float(loss)

    return step, {"cache_seconds": 0.0}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = VARIANTS[args.only]
    model, clip, vae = boot(args)
    with torch.inference_mode(False), torch.enable_grad():
        step, extra = (recipe if variant.recipe else ours)(args, variant, model, clip, vae)
        for _ in range(args.warmup):
            step()
        device = "cuda" if args.device == "cuda" else "cpu"
        # Streaming comparisons keep the whole run's peak (the cache build is where memory would grow).
        resettable = reset_peaks(device) if not variant.store else False
        times, cpu_times, losses = [], [], []
        for _ in range(args.steps):
            synchronize(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            losses.append(step())
            synchronize(device)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    samples = args.batch * args.steps
    result = {"variant": args.only, "label": variant.label, "samples_per_second": samples / sum(times),
              "samples_per_cpu_second": samples / sum(cpu_times), "seconds_per_step": times,
              "cpu_seconds_per_step": cpu_times, "losses": losses, "memory": peaks_mb(device),
              "peak_reset": resettable, **extra}
    args.result.write_text(json.dumps(result))


# --- parent ---------------------------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name in args.variants.split(","):
        argv = [str(Path(__file__).resolve()), "--only", name, "--result", str(args.workdir / f"{name}.json"),
                "--workdir", str(args.workdir), "--size", args.size, "--res", str(args.res), "--batch",
                str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                "--threads", str(args.threads), "--precision", args.precision, "--rows", str(args.rows)]
        started = time.perf_counter()
        results[name] = run_child(argv, args.workdir / f"{name}.log", args.workdir / f"{name}.json",
                                  args.child_timeout)
        print(f"{name}: {results[name]['samples_per_second']:.3f} samples/s "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def table(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """Speed by wall clock and by process CPU time (steadier on a shared CPU machine: other people's load
    stretches wall time, not the work done)."""
    memory_key, memory_name = ("cuda_peak_mb", "CUDA") if args.device == "cuda" else ("rss_peak_mb", "RSS")
    rows = []
    for name, result in results.items():
        variant = VARIANTS[name]
        anchor = results.get("recipe_gc" if variant.checkpointing else "recipe")

        def versus(key: str, value: float | None, _anchor=anchor) -> str:
            if _anchor is None or not value:
                return "-"
            reference = _anchor["memory"][key] if key.endswith("_mb") else _anchor[key]
            return fmt(value / reference if reference else None, ".2f")

        memory = result["memory"][memory_key]
        rows.append([name, variant.label, fmt(result["samples_per_second"]),
                     versus("samples_per_second", result["samples_per_second"]),
                     fmt(result["samples_per_cpu_second"]),
                     versus("samples_per_cpu_second", result["samples_per_cpu_second"]),
                     fmt(memory, ".0f"), versus(memory_key, memory), fmt(result.get("cache_seconds"), ".2f")])
    headers = ["variant", "what", "samples/s", "x recipe", "samples/cpu-s", "x recipe", f"peak {memory_name} MB",
               "x recipe", "cache s"]
    return format_table(headers, rows)


def streaming_table(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """Streaming from disk against the in-memory path: samples/s and the whole run's peak RSS, as ratios."""
    anchor = results.get("memory_cache")

    def versus(value: float, reference: float | None) -> str:
        return fmt(value / reference, ".2f") if reference else "-"

    rows = []
    for name, result in results.items():
        speed, rss = result["samples_per_second"], result["memory"]["rss_peak_mb"]
        row = [name, VARIANTS[name].label, fmt(speed), versus(speed, anchor and anchor["samples_per_second"]),
               fmt(rss, ".0f"), versus(rss, anchor and anchor["memory"]["rss_peak_mb"]),
               fmt(result.get("cache_seconds"), ".2f")]
        if args.device == "cuda":
            row.insert(6, fmt(result["memory"]["cuda_peak_mb"], ".0f"))
        rows.append(row)
    headers = ["variant", "what", "samples/s", "x memory", "peak RSS MB", "x memory", "cache s"]
    if args.device == "cuda":
        headers.insert(6, "peak CUDA MB")
    return format_table(headers, rows)


def main() -> None:
    args = parse_args()
    if args.only:
        child(args)
        return
    scratch = None
    if args.workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="ip2p-bench-train-")
        args.workdir = Path(scratch.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.rows:
        streaming_dataset(args)  # once, before the children time anything
    results = run_all(args)
    text = streaming_table(args, results) if args.rows else table(args, results)
    print(f"\nInstructPix2Pix training, {args.size} model, {args.res} px, batch {args.batch}, {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up" + (f", {args.rows} rows" if args.rows else "")
          + "\n")
    print(text)
    suffix = f"-rows{args.rows}" if args.rows else ""
    out = args.out or REPO / "bench" / "results" / f"train-{args.device}-{args.size}-{args.res}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"when": datetime.now(UTC).isoformat(), "args": {k: str(v) for k, v in vars(args).items()},
              "results": results, "table": text}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
