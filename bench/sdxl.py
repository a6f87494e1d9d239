"""Seconds per SDXL-InstructPix2Pix edit: our InstructEdit against diffusers' StableDiffusionXLInstructPix2PixPipeline
on the same random weights. Run through `bench/edit.py --family sdxl`:

    .runtime/venv/bin/python bench/edit.py --family sdxl --size tiny --res 128 --steps 4
    .runtime/venv/bin/python bench/edit.py --family sdxl --device cuda --size full --res 1024 --steps 30

--size tiny: testing/tiny_models.tiny_sdxl_ip2p (ComfyUI's SDXL_instructpix2pix class on the small SDXL layout).
--size full: SDXL's real UNet layout (SDXL_FULL_UNET, 8 input channels, 2.57B parameters), random, written once
  as a file and loaded by ComfyUI's own detection, as a user's SDXL-IP2P file is.
Both sides get SDXL-shaped text embeddings from testing/tiny_models.StubSDXLClip (SDXL's two real text encoders
are not part of the comparison: the pipeline takes the same embeddings as prompt_embeds) and a random TAESD VAE
(diffusers: AutoencoderTiny with the same weights); diffusers runs the twin UNet (testing/sdxl_twin).
Variants, each in its own interpreter: (a) InstructEdit, (c) the diffusers pipeline; euler_ancestral, normal
(linspace) schedule, s_I 1.5, s_T 7.5, one seed. The two do not start from the same noise: times only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# `edit`: the SD1.5 bench's helpers (loop probes, timed edits, ComfyUI boot, TAESD twin). When edit.py runs as
# the script, this imports a second, inert copy of it as module `edit`: definitions only, no run.
import edit as sd15
import torch
from common import call_node, fmt, format_table, ratio, reset_peaks, run_child

LABELS = {"a": "InstructEdit (ours), SDXL-IP2P", "c": "diffusers SDXL IP2P pipeline"}
SEED_VAE = 2  # added to --seed for the TAESD weights, as tiny_models does for a checkpoint's VAE


# --- the model, both ways ------------------------------------------------------------------------------------

def unet_dtype(device: str) -> torch.dtype:
    """fp32 on CPU, fp16 on CUDA, for ComfyUI's UNet and diffusers' alike (the SD1.5 bench's choice)."""
    return torch.float32 if device == "cpu" else torch.float16


def full_config() -> dict:
    from comfyui_ip2p.testing.tiny_models import SDXL_FULL_UNET

    return {**SDXL_FULL_UNET, "in_channels": 8}


def full_unet_path(args: argparse.Namespace) -> Path:
    return args.workdir / "models" / "diffusion_models" / f"bench-sdxl-ip2p-full-{args.seed}.safetensors"


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """--size full: writes the random full-size UNet once (fp16, ~5 GB; reused with --workdir)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfyui_ip2p.testing.tiny_models import _fill_random, _meta_shapes
    from comfyui_ip2p.training.files import save_safetensors

    path, start = full_unet_path(args), time.perf_counter()
    if not path.is_file():
        shapes = _meta_shapes(lambda: UNetModel(**full_config(), operations=comfy.ops.disable_weight_init))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(_fill_random(shapes, args.seed, torch.float16), path)
    return {"unet": str(path), "seconds": time.perf_counter() - start}


def comfy_model(args: argparse.Namespace):
    """Our MODEL: the small class-built model, or the full file through ComfyUI's detection and loader."""
    import comfy.model_base
    import comfy.sd
    from comfyui_ip2p.testing.tiny_models import tiny_sdxl_ip2p

    dtype = unet_dtype(args.device)
    if args.size == "tiny":
        return tiny_sdxl_ip2p(seed=args.seed, dtype=dtype)
    model = comfy.sd.load_diffusion_model(str(full_unet_path(args)), model_options={"dtype": dtype})
    if not isinstance(model.model, comfy.model_base.SDXL_instructpix2pix):
        raise RuntimeError(f"ComfyUI detected {type(model.model).__name__}, not SDXL_instructpix2pix")
    return model


def twin_unet(args: argparse.Namespace):
    """The same UNet weights in diffusers (for the full size straight from the file: no ComfyUI copy)."""
    import safetensors.torch
    from comfyui_ip2p.testing.sdxl_twin import sdxl_twin, twin_of

    dtype = unet_dtype(args.device)
    if args.size == "tiny":
        return twin_of(comfy_model(args), dtype)
    return sdxl_twin(safetensors.torch.load_file(full_unet_path(args)), full_config(), dtype)


def taesd_weights(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    from comfyui_ip2p.testing.tiny_models import taesd_state_dict

    return taesd_state_dict(args.seed + SEED_VAE)


def comfy_vae(args: argparse.Namespace):
    import comfy.sd
    from comfyui_ip2p.testing.tiny_models import VAE_PREFIX

    return comfy.sd.VAE(sd={k.removeprefix(VAE_PREFIX): v.float() for k, v in taesd_weights(args).items()})


# --- children ------------------------------------------------------------------------------------------------

def run_ours(ctx: sd15.Context) -> sd15.Series:
    from comfyui_ip2p.testing.tiny_models import StubSDXLClip

    model, vae, clip = comfy_model(ctx.args), comfy_vae(ctx.args), StubSDXLClip()
    node = ctx.nodes["InstructEdit"]

    def edit(patched_model, steps: int) -> torch.Tensor:
        images, _ = call_node(
            node, model=patched_model, clip=clip, vae=vae, image=ctx.image, instruction=sd15.INSTRUCTION,
            image_guidance=sd15.IMAGE_SCALE, text_guidance=sd15.TEXT_SCALE, steps=steps, seed=ctx.args.seed,
            sampler_name=sd15.SAMPLER, scheduler=sd15.SCHEDULER, resolution=ctx.args.res, keep_input_size=False)
        return images

    series = sd15.measure_comfy(ctx, edit, model, "a")
    dtypes = {"unet": str(model.model.get_dtype()), "vae": str(vae.vae_dtype), "text": "stub"}
    return labelled(sd15.with_dtypes(series, dtypes), "a")


def diffusers_pipeline(args: argparse.Namespace):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline

    dtype = unet_dtype(args.device)
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=sd15.tiny_vae_twin(taesd_weights(args)).to(dtype).eval(), text_encoder=None, text_encoder_2=None,
        tokenizer=None, tokenizer_2=None, unet=twin_unet(args),
        # SDXL's betas; linspace spacing, as ComfyUI's 'normal' schedule
        scheduler=EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear"),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def prompt_embeds(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stub CLIP's embeddings of the instruction and the empty negative, as the pipeline's keywords."""
    from comfyui_ip2p.testing.tiny_models import StubSDXLClip

    clip, out = StubSDXLClip(), {}
    for prefix, text in (("", sd15.INSTRUCTION), ("negative_", "")):
        context, options = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
        out[f"{prefix}prompt_embeds"] = context.to(device, dtype)
        out[f"{prefix}pooled_prompt_embeds"] = options["pooled_output"].to(device, dtype)
    return out


def run_diffusers(ctx: sd15.Context) -> sd15.Series:
    args = ctx.args
    pipe = diffusers_pipeline(args)
    embeds = prompt_embeds(args.device, unet_dtype(args.device))
    pixels = ctx.image.movedim(-1, 1).contiguous()  # [1, 3, H, W] in [0, 1]; the pipeline maps it to [-1, 1]
    probe = sd15.DiffusersProbe(ctx.device, pipe.unet)

    def edit(steps: int) -> torch.Tensor:
        probe.start(steps)
        generator = torch.Generator(ctx.device).manual_seed(args.seed)
        # This pipeline has only the older per-step callback; the probe's end-of-loop check is the same.
        return pipe(**embeds, image=pixels, height=args.res, width=args.res, num_inference_steps=steps,
                    guidance_scale=sd15.TEXT_SCALE, image_guidance_scale=sd15.IMAGE_SCALE, generator=generator,
                    output_type="pt", callback=lambda i, t, _latents: probe.step_end(pipe, i, t, {}),
                    callback_steps=1).images

    edit(args.warmup_steps)
    calls = {"unet_calls_per_step": len(probe.batches) / args.warmup_steps, "unet_batch": sorted(set(probe.batches)),
             "dtypes": {"unet": str(pipe.unet.dtype), "vae": str(pipe.vae.dtype), "text": "stub"},
             "includes": "image preprocess + VAE encode, loop, VAE decode (embeddings given)"}
    series: sd15.Series = {}
    for steps in args.steps:
        reset_peaks(ctx.device)
        probe.loops.clear()
        runs, cpu_seconds, images = sd15.time_edits(ctx, edit, steps)
        sd15.save_output(ctx, "c", steps, images.movedim(1, -1))
        series[steps] = sd15.edit_result(ctx, "c", steps, runs, cpu_seconds, probe.loops, calls)
    return labelled(series, "c")


def labelled(series: sd15.Series, name: str) -> sd15.Series:
    for result in series.values():
        result.label = LABELS[name]
    return series


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    name = args.only
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    nodes = sd15.boot_comfy(args, with_nodes=name == "a")
    if name == "prepare":
        return prepare(args)
    if name == "a" and "InstructEdit" not in nodes:
        raise RuntimeError("the pack registered no InstructEdit node: see the import error in ComfyUI's log above")
    image = sd15.photo_like(args.res, args.res, args.seed)  # the same picture in both children
    ctx = sd15.Context(args, args.workdir, args.device, image, nodes)
    runner: Callable[[sd15.Context], sd15.Series] = run_ours if name == "a" else run_diffusers
    return {str(steps): result.to_json() for steps, result in runner(ctx).items()}


# --- parent --------------------------------------------------------------------------------------------------

def variant_names(args: argparse.Namespace) -> list[str]:
    """(a) and (c) where --variants asks for them (its default lists both); the other variants are SD1.5's."""
    asked = {v.strip() for v in args.variants.split(",")}
    names = [name for name in LABELS if name in asked]
    if not names:
        raise SystemExit("--family sdxl measures variants a (ours) and c (diffusers): list at least one")
    return names


def run_children(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in (["prepare"] if args.size == "full" else []) + names:
        started = time.perf_counter()
        print(f"[bench sdxl] {name}: {LABELS.get(name, 'random full-size UNet file')} ...", file=sys.stderr,
              flush=True)
        result_path = args.workdir / f"result-sdxl-{name}.json"
        result_path.unlink(missing_ok=True)
        argv = [*sd15.child_argv(args, name, result_path), "--family", "sdxl"]
        results[name] = run_child(argv, args.workdir / f"log-sdxl-{name}.txt", result_path, args.child_timeout)
        print(f"[bench sdxl] {name}: done in {time.perf_counter() - started:.1f} s"
              f"{sd15.progress_note(results[name])}", file=sys.stderr, flush=True)
    return results


def versus(row: dict[str, Any], theirs: dict[str, Any] | None) -> str:
    """'edit / step' ratios of a row against diffusers' row."""
    if theirs is None:
        return "-"
    edit = ratio(row["seconds_per_edit"], theirs["seconds_per_edit"])
    step = ratio(row["seconds_per_step"], theirs["seconds_per_step"])
    return f"{fmt(edit, '.2f')} / {fmt(step, '.2f')}"


def report(args: argparse.Namespace, results: dict[str, Any], steps: int) -> str:
    rows_in = {name: r[str(steps)] for name, r in results.items() if name in LABELS}
    theirs = rows_in.get("c")
    rows = []
    for name, r in rows_in.items():
        mem = r["memory"]
        rows.append([f"({name}) {r['label']}", fmt(r["seconds_per_edit"]), fmt(r["seconds_per_step"], ".4f"),
                     fmt(r["details"].get("cpu_seconds_per_edit")), versus(r, theirs),
                     fmt(mem.get("rss_peak_mb"), ".0f"), fmt(mem.get("cuda_peak_mb"), ".0f"),
                     sd15.calls_cell(r["details"])])
    headers = ["variant", "s/edit", "s/step", "CPU s/edit", "vs (c) edit/step", "peak RSS MB", "peak CUDA MB",
               "UNet calls/step x batch"]
    lines = [
        f"SDXL-InstructPix2Pix edit: {args.size} SDXL-IP2P UNet (random), {args.res}x{args.res}, {steps} steps, "
        f"{sd15.SAMPLER}/{sd15.SCHEDULER}, s_I {sd15.IMAGE_SCALE}, s_T {sd15.TEXT_SCALE}, {args.device}, attention "
        f"{args.attention}, threads {args.threads or torch.get_num_threads()}, median of {args.repeats} (warm-up "
        f"{args.warmup_steps} steps); stub text embeddings, TAESD VAE",
        format_table(headers, rows),
        "s/step = the sampling loop only (UNet + guidance + sampler); peaks = during the timed edits.",
    ]
    for name, r in rows_in.items():
        d = r["details"]
        lines.append(f"  ({name}) loop {fmt(d['loop_seconds'])} s + outside the loop {fmt(d['outside_loop_seconds'])}"
                     f" s; dtypes {d.get('dtypes')}")
    if theirs is not None and "a" in rows_in:
        edit, step = versus(rows_in["a"], theirs).split(" / ")
        lines.append(f"  ours / diffusers: {step}x per step, {edit}x per edit")
    return "\n".join(lines)


def save_json(args: argparse.Namespace, results: dict[str, Any], tables: dict[int, str]) -> Path:
    out = args.out or sd15.REPO / "bench" / "results" / f"edit-sdxl-{args.size}-{args.res}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("only", "result")}
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "settings": settings, "torch": torch.__version__,
        "prepare": results.get("prepare"),
        "results": {str(s): {n: r[str(s)] for n, r in results.items() if n in LABELS} for s in args.steps},
        "tables": {str(s): text for s, text in tables.items()},
    }
    out.write_text(json.dumps(payload, indent=2))
    return out


def parent(args: argparse.Namespace) -> int:
    if args.grid or args.detail:
        raise SystemExit("--grid and --detail measure the SD1.5 model; leave them off with --family sdxl")
    how = sd15.Reporting(run_children, report, save_json, "bench sdxl", "ip2p-bench-sdxl-")
    return sd15.measure_and_report(args, variant_names(args), how)


def main(args: argparse.Namespace) -> int:
    """edit.py's entry for --family sdxl: the parent, or (with --only) one child."""
    if not args.only:
        return parent(args)
    args.workdir = args.workdir.resolve()
    args.result.write_text(json.dumps(run_variant(args), indent=2))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as edit.py's children: skip ComfyUI's noisy teardown; the result is on disk

