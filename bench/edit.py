"""Seconds per InstructPix2Pix edit: our InstructEdit node against the core nodes wired by hand, diffusers'
pipeline on the same weights, and the floor of the model calls alone.

    .runtime/venv/bin/python bench/edit.py --size tiny --res 128 --steps 4
    .runtime/venv/bin/python bench/edit.py --device cuda --size full --res 512 --steps 20,100 --repeats 3

Variants (each in its own interpreter, so peaks and caches do not leak between them; all on the same random
checkpoint, the same image, s_I 1.5, s_T 7.5, euler_ancestral, normal scheduler, one seed):
  a   InstructEdit.execute on already-loaded MODEL/CLIP/VAE (three branches per step)
  a1  the same with s_I = 1 (the image-unconditional branch is skipped: two branches per step)
  b   core nodes wired by hand (CLIPTextEncode x2 -> InstructPixToPixConditioning -> DualCFGGuider +
      KSamplerSelect + BasicScheduler + RandomNoise -> SamplerCustomAdvanced -> VAEDecode), each node's
      execute called directly with the same loaded objects
  c   diffusers StableDiffusionInstructPix2PixPipeline with the same UNet/CLIP/VAE weights and Euler ancestral;
      its timing covers the whole call: tokenise + 2 text encodes, VAE encode, the loop, VAE decode
  d   floor: 2 text encodes + 1 VAE encode + steps x one batch-3 UNet call + 1 VAE decode, each timed alone

The parent never imports ComfyUI: it spawns one child per variant (each measures every --steps value after
one load) and prints one table per step count, also written as JSON. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from common import (
    CpuClock,
    VariantResult,
    call_node,
    fmt,
    format_table,
    median,
    peaks_mb,
    ratio,
    reset_peaks,
    run_child,
    synchronize,
    timed,
)

if TYPE_CHECKING:  # imported for real only inside the children, after ComfyUI has booted
    from comfyui_ip2p.testing.tiny_models import UNetLayout

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "make it winter"
SAMPLER, SCHEDULER = "euler_ancestral", "normal"
TEXT_SCALE = 7.5
IMAGE_SCALE = 1.5
VARIANTS = {
    "a": "InstructEdit (ours)",
    "a1": "InstructEdit, s_I=1 (2 branches)",
    "a32": "InstructEdit in fp32 (the reference for --precision)",
    "b": "core nodes by hand (DualCFGGuider)",
    "c": "diffusers IP2P pipeline",
    "d": "floor: model calls alone",
}
Series = dict[int, VariantResult]  # steps -> result


# --- command line ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                        help="sdxl: SDXL-InstructPix2Pix, ours (a) against diffusers' SDXL pipeline (c); bench/sdxl.py")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random model layout")
    parser.add_argument("--res", type=int, default=128, help="square edit resolution (multiple of 64)")
    parser.add_argument("--steps", default="4", help="sampling steps; a comma list (20,100) measures each "
                        "after one model load per variant")
    parser.add_argument("--repeats", type=int, default=None, help="timed edits per variant and step count "
                        "(median reported); default 3, or 1 for --size full on cpu")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of the untimed warm-up edit; default min(steps, 10) on cuda, 1 on cpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in each child (0 = torch's default); 1 is steadier on a busy "
                             "machine, where 2-thread runs of small ops lose time spinning at barriers")
    parser.add_argument("--variants", default="a,a1,b,c,d", help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32",
                        help="compute precision of (a)/(a1) through the Compute Precision patch; with anything "
                             "but fp32 add variant a32 to get the error against the fp32 edit")
    parser.add_argument("--attention", choices=("default", "pytorch"), default="default",
                        help="ComfyUI's attention: its own choice, or PyTorch's fused SDPA (as "
                             "--use-pytorch-cross-attention); on CPU ComfyUI's own choice is sub-quadratic")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="ComfyUI base dir for the checkpoint and image: kept, and reused when present "
                             "(default: a temp dir, removed after a successful run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output; default bench/results/edit-<size>-<res>.json")
    parser.add_argument("--child-timeout", type=float, default=1800.0)
    parser.add_argument("--detail", action="store_true",
                        help="instead of the variants: InstructEdit's detail transfer on a 2048x1536 photo, its "
                             "added time as a fraction of the edit (--size, --res, first --steps)")
    parser.add_argument("--grid", action="store_true",
                        help="instead of the variants: a 3x3 guidance grid sampled in one batched run against "
                             "nine single edits, and their ratio (--size, --res, first --steps)")
    parser.add_argument("--only", choices=("prepare", "detail", "grid", *VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.res % 64:
        parser.error("--res must be a multiple of 64 (the reference resize rounds to 64)")
    try:
        args.steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    except ValueError:
        parser.error("--steps takes integers, e.g. 20 or 20,100")
    if not args.steps or min(args.steps) < 1:
        parser.error("--steps must be >= 1")
    if args.repeats is None:
        args.repeats = 1 if (args.size == "full" and args.device == "cpu") else 3
    if args.warmup_steps is None:
        # On a GPU the warm-up also moves the weights there and selects kernels; 10 steps are plenty.
        args.warmup_steps = min(max(args.steps), 10) if args.device == "cuda" else 1
    return args


def checkpoint_name(args: argparse.Namespace) -> str:
    # "sd15": written with `sd15_layout` (below); a reused workdir never picks up an older, mis-laid file.
    return f"bench-ip2p-sd15-{args.size}-{args.seed}.safetensors"


def image_name(args: argparse.Namespace) -> str:
    return f"bench-{args.res}-{args.seed}.png"


# --- child: ComfyUI set-up ------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    base: Path
    device: str
    image: torch.Tensor  # ComfyUI IMAGE: [1, H, W, 3] float in [0, 1]
    nodes: dict[str, type] = field(default_factory=dict)


def boot_comfy(args: argparse.Namespace, with_nodes: bool) -> dict[str, type]:
    from comfyui_ip2p.cli import runtime
    from comfyui_ip2p.testing.comfy_server import link_pack

    link_pack(args.workdir)
    runtime.boot(args.workdir, cpu=args.device == "cpu")
    if args.attention == "pytorch":
        # Read when comfy.model_management is first imported, which boot() has not done yet.
        from comfy.cli_args import args as comfy_args

        comfy_args.use_pytorch_cross_attention = True
    import comfy.utils

    # tqdm bars cost a little per step and clutter the child logs; off for every ComfyUI variant alike.
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return runtime.load_nodes() if with_nodes else {}


def sd15_layout(size: str) -> UNetLayout:
    """testing.tiny_models.LAYOUTS[size] with the up path's attention at SD1.5's levels.

    ComfyUI's UNetModel (and comfy.utils.unet_to_diffusers) pop `transformer_depth_output` from the END: the
    last entry is output block 0, the deepest level, as in ComfyUI's own SD1.5 config ([1] * 9 + [0] * 3).
    LAYOUTS' comfy_config lists it in output-block order, which for the 4-level layout puts the up path's
    attention on the three deepest levels instead of the three shallowest: no 64x64 attention at 512 px (so
    cheaper than SD1.5) and not loadable into diffusers' SD1.5 UNet. One-level layouts (tiny) are unchanged.
    """
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, UNetLayout

    @dataclass(frozen=True)
    class SD15Layout(UNetLayout):
        def comfy_config(self, in_channels: int) -> dict:
            config = super().comfy_config(in_channels)
            config["transformer_depth_output"] = [int(self.attention_levels[level])
                                                  for level in range(len(self.channel_mult))
                                                  for _ in range(self.num_res_blocks + 1)]
            return config

    base = LAYOUTS[size]
    return SD15Layout(base.channel_mult, base.num_res_blocks, base.attention_levels, base.middle_block)


def write_checkpoint(path: Path, size: str, seed: int) -> None:
    """tiny_models' seeded UNet/CLIP-L/VAE tensors, with the UNet built on `sd15_layout`."""
    from comfyui_ip2p.testing import tiny_models
    from comfyui_ip2p.training.files import save_safetensors

    layout = sd15_layout(size)
    state_dict = tiny_models.unet_state_dict(layout, 8, seed)
    check_up_path(state_dict, layout)
    state_dict.update(tiny_models.clip_l_state_dict(seed + 1))
    vae = tiny_models.taesd_state_dict if size == "tiny" else tiny_models.kl_vae_state_dict
    state_dict.update(vae(seed + 2))
    save_safetensors(state_dict, path)


def check_up_path(state_dict: dict, layout: UNetLayout) -> None:
    """The last output block (shallowest level) has attention iff level 0 has; output block 0 iff the deepest."""
    from comfyui_ip2p.testing.tiny_models import UNET_PREFIX

    last = len(layout.channel_mult) * (layout.num_res_blocks + 1) - 1
    for block, level in ((last, 0), (0, len(layout.channel_mult) - 1)):
        has = f"{UNET_PREFIX}output_blocks.{block}.1.norm.weight" in state_dict
        if has != layout.attention_levels[level]:
            raise RuntimeError(f"output block {block}: attention {has}, expected {layout.attention_levels[level]}")


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Writes the random checkpoint and the input image once; every variant reads the same files."""
    import numpy as np
    from PIL import Image

    checkpoint = args.workdir / "models" / "checkpoints" / checkpoint_name(args)
    start = time.perf_counter()
    if not checkpoint.is_file():
        write_checkpoint(checkpoint, args.size, args.seed)
    image_path = args.workdir / "input" / image_name(args)
    if not image_path.is_file():
        image_path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(args.seed)
        # A smooth gradient plus noise: some structure, so the VAE sees a photo-like range of values.
        ramp = np.linspace(0, 255, args.res, dtype=np.float32)
        pixels = (ramp[None, :, None] + ramp[:, None, None]) / 2 + rng.normal(0, 20, (args.res, args.res, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(image_path)
    return {"checkpoint": str(checkpoint), "image": str(image_path), "seconds": time.perf_counter() - start}


def load_image(args: argparse.Namespace) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(args.workdir / "input" / image_name(args)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array / 255.0)[None]


def load_comfy_models(ctx: Context) -> tuple:
    """MODEL, CLIP, VAE from the checkpoint, once, with ComfyUI's own loader (as CheckpointLoaderSimple)."""
    import comfy.sd
    import folder_paths

    path = ctx.base / "models" / "checkpoints" / checkpoint_name(ctx.args)
    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[0], out[1], out[2]


def comfy_dtypes(model, clip, vae) -> dict[str, str]:
    """Stored dtypes; `unet_compute` differs from `unet` when ComfyUI casts the weights on every call."""
    unet = model.model.get_dtype()
    text = next(clip.cond_stage_model.parameters()).dtype
    return {"unet": str(unet), "unet_compute": str(model.model.manual_cast_dtype or unet),
            "text_encoder": str(text), "vae": str(vae.vae_dtype)}


# --- child: timing whole edits --------------------------------------------------------------------------------

class LoopProbe:
    """Times ComfyUI's sampling loop (SAMPLER_SAMPLE wrapper) and optionally records each UNet call's batch.

    The wrapper sits inside the guider, after models are loaded and conds prepared, so `loops` is the time
    spent stepping: UNet calls plus guidance and sampler arithmetic.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.loops: list[float] = []
        self.batches: list[int] = []

    def __deepcopy__(self, memo: dict) -> LoopProbe:
        # ModelPatcher.clone() deep-copies model_options, and with them the instance behind a bound-method
        # wrapper: the node's own clones (e.g. for an attention override) must still report here.
        return self

    def instrument(self, model, count_calls: bool):
        import comfy.patcher_extension

        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "bench", self._loop)
        if count_calls:
            # Only during warm-up: a model_function_wrapper adds a Python frame to every call.
            model.set_model_unet_function_wrapper(self._count)
        return model

    def _loop(self, executor, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        synchronize(self.device)
        self.loops.append(time.perf_counter() - start)
        return out

    def _count(self, apply_model, params: dict):
        self.batches.append(int(params["input"].shape[0]))
        return apply_model(params["input"], params["timestep"], **params["c"])


def time_edits(ctx: Context, edit: Callable[[int], torch.Tensor], steps: int) -> tuple[list[float], float, Any]:
    """`repeats` synchronised edits: (wall seconds per run, median CPU seconds, last output)."""
    runs, cpu, output = [], CpuClock(), None
    for _ in range(ctx.args.repeats):
        with cpu:
            seconds, output = timed(lambda: edit(steps), ctx.device)
        runs.append(seconds)
    return runs, median(cpu.samples), output


def edit_result(ctx: Context, name: str, steps: int, runs: list[float], cpu_seconds: float,
                loops: list[float], calls: dict[str, Any]) -> VariantResult:
    loop = median(loops)
    details = {"loop_seconds": loop, "outside_loop_seconds": median(runs) - loop,
               "cpu_seconds_per_edit": cpu_seconds, **calls}
    return VariantResult(name, VARIANTS[name], median(runs), loop / steps, runs, peaks_mb(ctx.device), details)


def save_output(ctx: Context, name: str, steps: int, images: torch.Tensor) -> None:
    torch.save(images.float().cpu(), ctx.args.workdir / f"out-{name}-{steps}.pt")


def measure_comfy(ctx: Context, run_edit: Callable[[Any, int], torch.Tensor], model, name: str) -> Series:
    """Warm-up edit (counts UNet calls), then for each step count `repeats` timed edits."""
    args = ctx.args
    warm = LoopProbe(ctx.device)
    series: Series = {}
    with torch.inference_mode():
        run_edit(warm.instrument(model, count_calls=True), args.warmup_steps)
        calls = {"unet_calls_per_step": len(warm.batches) / args.warmup_steps,
                 "unet_batch": sorted(set(warm.batches))}
        for steps in args.steps:
            reset_peaks(ctx.device)
            probe = LoopProbe(ctx.device)
            patched = probe.instrument(model, count_calls=False)
            runs, cpu_seconds, images = time_edits(ctx, lambda s, m=patched: run_edit(m, s), steps)
            save_output(ctx, name, steps, images)
            series[steps] = edit_result(ctx, name, steps, runs, cpu_seconds, probe.loops, calls)
    return series


def instruct_edit(ctx: Context, clip, vae, image_scale: float = IMAGE_SCALE) -> Callable[[Any, int], torch.Tensor]:
    """(MODEL, steps) -> images: the pack's InstructEdit node with this run's settings."""
    node = ctx.nodes["InstructEdit"]

    def edit(patched_model, steps: int) -> torch.Tensor:
        images, _ = call_node(
            node, model=patched_model, clip=clip, vae=vae, image=ctx.image, instruction=INSTRUCTION,
            image_guidance=image_scale, text_guidance=TEXT_SCALE, steps=steps, seed=ctx.args.seed,
            sampler_name=SAMPLER, scheduler=SCHEDULER, resolution=ctx.args.res, keep_input_size=False)
        return images

    return edit


def core_graph_edit(ctx: Context, clip, vae) -> Callable[[Any, int], torch.Tensor]:
    """(MODEL, steps) -> images: the baseline users wire today (RUNTIME_NOTES: 'Wiring ComfyUI core nodes for
    IP2P by hand')."""
    n = ctx.nodes

    def edit(patched_model, steps: int) -> torch.Tensor:
        (positive,) = call_node(n["CLIPTextEncode"], clip=clip, text=INSTRUCTION)
        (empty,) = call_node(n["CLIPTextEncode"], clip=clip, text="")
        ip_positive, ip_negative, latent = call_node(
            n["InstructPixToPixConditioning"], positive=positive, negative=empty, vae=vae, pixels=ctx.image)
        # negative = the plain empty conditioning, without the concat latent: the zero-image branch.
        (guider,) = call_node(n["DualCFGGuider"], model=patched_model, cond1=ip_positive, cond2=ip_negative,
                              negative=empty, cfg_conds=TEXT_SCALE, cfg_cond2_negative=IMAGE_SCALE,
                              style="regular")
        (sampler,) = call_node(n["KSamplerSelect"], sampler_name=SAMPLER)
        (sigmas,) = call_node(n["BasicScheduler"], model=patched_model, scheduler=SCHEDULER, steps=steps,
                              denoise=1.0)
        (noise,) = call_node(n["RandomNoise"], noise_seed=ctx.args.seed)
        samples, _ = call_node(n["SamplerCustomAdvanced"], noise=noise, guider=guider, sampler=sampler,
                               sigmas=sigmas, latent_image=latent)
        (images,) = call_node(n["VAEDecode"], vae=vae, samples=samples)
        return images

    return edit


def run_instruct_edit(ctx: Context, name: str, image_scale: float) -> Series:
    from comfyui_ip2p.pipeline.precision import with_precision

    model, clip, vae = load_comfy_models(ctx)
    if name != "a32":
        model = with_precision(model, ctx.args.precision)
    edit = instruct_edit(ctx, clip, vae, image_scale)
    return with_dtypes(measure_comfy(ctx, edit, model, name), comfy_dtypes(model, clip, vae))


def run_core_graph(ctx: Context) -> Series:
    model, clip, vae = load_comfy_models(ctx)
    edit = core_graph_edit(ctx, clip, vae)
    return with_dtypes(measure_comfy(ctx, edit, model, "b"), comfy_dtypes(model, clip, vae))


def with_dtypes(series: Series, dtypes: dict[str, str]) -> Series:
    for result in series.values():
        result.details["dtypes"] = dtypes
    return series


# --- child: the floor -----------------------------------------------------------------------------------------

def run_floor(ctx: Context) -> Series:
    """Each unavoidable model call alone, through the same ComfyUI modules the edit uses."""
    import comfy.model_management as mm
    import comfy.samplers

    args = ctx.args
    model, clip, vae = load_comfy_models(ctx)
    mm.load_models_gpu([model, clip.load_model(), vae.patcher])
    sampling = model.get_model_object("model_sampling")
    series: Series = {}
    with torch.inference_mode():
        calls = floor_calls(model, clip, vae, ctx.image, args.seed)
        for call in calls.values():  # warm-up: first-call allocations and kernel selection
            call(sampling.sigma_max)
        for steps in args.steps:
            sigmas = comfy.samplers.calculate_sigmas(sampling, SCHEDULER, steps)
            reset_peaks(ctx.device)
            parts: dict[str, list[float]] = {k: [] for k in calls}
            cpu = CpuClock()
            for _ in range(args.repeats):
                with cpu:
                    time_floor_once(calls, sigmas, parts, ctx.device)
            series[steps] = floor_result(ctx, steps, parts, median(cpu.samples), comfy_dtypes(model, clip, vae))
    return series


def floor_result(ctx: Context, steps: int, parts: dict[str, list[float]], cpu_seconds: float,
                 dtypes: dict[str, str]) -> VariantResult:
    med = {k: median(v) for k, v in parts.items()}
    runs = [sum(values) for values in zip(*parts.values(), strict=True)]
    details = {"seconds": med, "unet_calls_per_step": 1, "unet_batch": [3], "dtypes": dtypes,
               "cpu_seconds_per_edit": cpu_seconds}
    return VariantResult("d", VARIANTS["d"], sum(med.values()), med["unet"] / steps, runs, peaks_mb(ctx.device),
                         details)


def time_floor_once(calls: dict[str, Callable[[Any], Any]], sigmas: torch.Tensor,
                    parts: dict[str, list[float]], device: str) -> None:
    for key, call in calls.items():
        # The UNet runs once per step at that step's sigma; the rest once per edit.
        step_sigmas = sigmas[:-1] if key == "unet" else sigmas[:1]
        parts[key].append(sum(time_call(call, s, device) for s in step_sigmas))


def time_call(call: Callable[[Any], Any], sigma: torch.Tensor, device: str) -> float:
    return timed(lambda: call(sigma), device)[0]


def floor_calls(model, clip, vae, image: torch.Tensor, seed: int) -> dict[str, Callable[[Any], Any]]:
    """Closures for each model call with inputs prepared ahead; the argument is the sigma (UNet only)."""
    tokens_positive, tokens_empty = clip.tokenize(INSTRUCTION), clip.tokenize("")
    encoder = clip.cond_stage_model
    positive = encoder.encode_token_weights(tokens_positive)[0]
    empty = encoder.encode_token_weights(tokens_empty)[0]
    first_stage, vae_device = vae.first_stage_model, vae.device
    pixels = (image.movedim(-1, 1) * 2.0 - 1.0).to(vae_device, vae.vae_dtype)  # as VAE.encode's process_input
    concat = first_stage.encode(pixels).float()
    unet_device = model.load_device
    latent = torch.randn(concat.shape, generator=torch.Generator().manual_seed(seed)).to(unet_device)
    # One batch of three, as calc_cond_batch assembles it: (uncond, image, full); apply_model is the exact
    # call the sampler makes per step (it concatenates the image latent and casts to the UNet's dtype).
    x = latent.repeat(3, 1, 1, 1)
    c_concat = torch.cat([torch.zeros_like(concat), concat, concat]).to(unet_device)
    context = torch.cat([empty, empty, positive]).to(unet_device)
    z = concat.to(vae_device, vae.vae_dtype)

    def unet(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=unet_device).reshape(1).expand(3)
        return model.model.apply_model(x, sigma, c_concat=c_concat, c_crossattn=context, transformer_options={})

    return {
        "text_positive": lambda _s: encoder.encode_token_weights(tokens_positive),
        "text_empty": lambda _s: encoder.encode_token_weights(tokens_empty),
        "vae_encode": lambda _s: first_stage.encode(pixels),
        "unet": unet,
        "vae_decode": lambda _s: first_stage.decode(z),
    }


# --- child: diffusers -----------------------------------------------------------------------------------------

def diffusers_dtypes(ctx: Context) -> dict[str, torch.dtype]:
    """fp32 on CPU (as ComfyUI there); fp16 on CUDA for every part, since the pipeline feeds the UNet's fp16
    latents straight into the VAE (ComfyUI's own VAE runs in bf16 there: the same cost on Hopper)."""
    dtype = torch.float32 if ctx.device == "cpu" else torch.float16
    return {"unet": dtype, "text_encoder": dtype, "vae": dtype}


def diffusers_text_encoder(state_dict: dict, dtype: torch.dtype):
    """transformers' CLIPTextModel with the checkpoint's CLIP-L weights (ComfyUI keeps them in HF layout)."""
    import comfy.clip_model
    from comfyui_ip2p.testing.tiny_models import CLIP_PREFIX
    from transformers import CLIPTextConfig, CLIPTextModel

    config_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    model = CLIPTextModel(CLIPTextConfig(**json.loads(config_path.read_text())))
    weights = {k.removeprefix(CLIP_PREFIX): v for k, v in state_dict.items() if k.startswith(CLIP_PREFIX)}
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers 5 flattened CLIPTextModel (no `text_model.` level); 4.x keeps it.
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"CLIP twin mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.to(dtype).eval()


def diffusers_vae(state_dict: dict, size: str, dtype: torch.dtype):
    return (tiny_vae_twin if size == "tiny" else kl_vae_twin)(state_dict).to(dtype).eval()


def kl_vae_twin(state_dict: dict):
    """SD1.5's AutoencoderKL, weights converted from the LDM keys with diffusers' own converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
    }
    vae = AutoencoderKL(**config)
    weights = convert_ldm_vae_checkpoint({k: v.float() for k, v in state_dict.items()}, config)
    missing, unexpected = vae.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"VAE twin mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    return vae


def tiny_vae_twin(state_dict: dict):
    """TAESD as diffusers' AutoencoderTiny: both are plain Sequentials of the same layers, so the weights pair
    up in registration order (ComfyUI's module gives that order; the file's keys are sorted as strings)."""
    import comfy.taesd.taesd
    from comfyui_ip2p.testing.tiny_models import VAE_PREFIX
    from diffusers import AutoencoderTiny

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    taesd.load_state_dict({k.removeprefix(VAE_PREFIX): v.float() for k, v in state_dict.items()
                           if k.startswith(VAE_PREFIX)})
    ours = [v for k, v in taesd.state_dict().items() if k.startswith(("taesd_encoder.", "taesd_decoder."))]
    vae = AutoencoderTiny()
    theirs = list(vae.state_dict().items())
    if len(ours) != len(theirs) or any(a.shape != b.shape for a, (_, b) in zip(ours, theirs, strict=True)):
        raise RuntimeError("TAESD and AutoencoderTiny layouts differ; cannot pair their weights in order")
    vae.load_state_dict({name: value for (name, _), value in zip(theirs, ours, strict=True)})
    return vae


def diffusers_pipeline(ctx: Context):
    import safetensors.torch
    from comfyui_ip2p.cli.runtime import comfyui_dir
    from comfyui_ip2p.testing.tiny_models import diffusers_twin
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTokenizer

    args, dtypes = ctx.args, diffusers_dtypes(ctx)
    state_dict = safetensors.torch.load_file(ctx.base / "models" / "checkpoints" / checkpoint_name(args))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=diffusers_vae(state_dict, args.size, dtypes["vae"]),
        text_encoder=diffusers_text_encoder(state_dict, dtypes["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(comfyui_dir() / "comfy" / "sd1_tokenizer", model_max_length=77),
        unet=diffusers_twin(state_dict, sd15_layout(args.size), 8, dtype=dtypes["unet"]),
        # The reference's scheduler: SD1.5 betas, 1000 training steps; linspace spacing as ComfyUI's 'normal'.
        scheduler=EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(ctx.device)


class DiffusersProbe:
    """Loop time = first UNet call's start to the last step's end (synchronised only at those two points)."""

    def __init__(self, device: str, unet) -> None:
        self.device = device
        self.loops: list[float] = []
        self.batches: list[int] = []
        self._first: float | None = None
        self._steps = 0
        unet.register_forward_pre_hook(self._before_unet)

    def start(self, steps: int) -> None:
        self._first, self._steps = None, steps

    def _before_unet(self, _module, inputs) -> None:
        self.batches.append(int(inputs[0].shape[0]))
        if self._first is None:
            synchronize(self.device)
            self._first = time.perf_counter()

    def step_end(self, _pipe, index: int, _timestep, callback_kwargs: dict) -> dict:
        if index == self._steps - 1 and self._first is not None:
            synchronize(self.device)
            self.loops.append(time.perf_counter() - self._first)
        return callback_kwargs


def run_diffusers(ctx: Context) -> Series:
    args = ctx.args
    pipe = diffusers_pipeline(ctx)
    pixels = ctx.image.movedim(-1, 1).contiguous()  # [1, 3, H, W] in [0, 1]; the pipeline maps it to [-1, 1]
    probe = DiffusersProbe(ctx.device, pipe.unet)

    def edit(steps: int) -> torch.Tensor:
        probe.start(steps)
        generator = torch.Generator(ctx.device).manual_seed(args.seed)
        return pipe(prompt=INSTRUCTION, image=pixels, num_inference_steps=steps, guidance_scale=TEXT_SCALE,
                    image_guidance_scale=IMAGE_SCALE, generator=generator, output_type="pt",
                    callback_on_step_end=probe.step_end).images

    edit(args.warmup_steps)
    calls = {"unet_calls_per_step": len(probe.batches) / args.warmup_steps,
             "unet_batch": sorted(set(probe.batches)),
             "dtypes": {k: str(v) for k, v in diffusers_dtypes(ctx).items()},
             "includes": "tokenise + 2 text encodes, image preprocess + VAE encode, loop, VAE decode"}
    series: Series = {}
    for steps in args.steps:
        reset_peaks(ctx.device)
        probe.loops.clear()
        runs, cpu_seconds, images = time_edits(ctx, edit, steps)
        save_output(ctx, "c", steps, images.movedim(1, -1))
        series[steps] = edit_result(ctx, "c", steps, runs, cpu_seconds, probe.loops, calls)
    return series


# --- child: detail transfer (--detail) ------------------------------------------------------------------------

DETAIL_SIZE = (2048, 1536)  # width, height: a 3-megapixel photo, edited at --res


def photo_like(width: int, height: int, seed: int) -> torch.Tensor:
    """[1, H, W, 3]: smooth shapes plus pixel-level grain, the fine detail the transfer keeps."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    scene = torch.stack([0.5 + 0.25 * torch.sin(6 * xx + c) * torch.cos(5 * yy - c) for c in range(3)], dim=-1)
    grain = 0.05 * torch.randn(height, width, 3, generator=torch.Generator().manual_seed(seed))
    return (scene + grain).clamp(0, 1)[None]


def run_detail(ctx: Context) -> dict[str, Any]:
    """Whole edits of a 2048x1536 photo with detail off and on, and the restore step alone each way.

    The restore step is what `detail` swaps: a Lanczos resize of the edit (off) or transfer_detail (on), so its
    difference is the added time; the whole-edit pair checks it (noisier: one run each on a busy CPU).
    """
    from comfyui_ip2p.algorithms.detail import transfer_detail
    from comfyui_ip2p.pipeline.edit import prepare_pixels
    from comfyui_ip2p.pipeline.images import resize_lanczos

    model, clip, vae = load_comfy_models(ctx)
    node, steps = ctx.nodes["InstructEdit"], ctx.args.steps[0]
    image = photo_like(*DETAIL_SIZE, ctx.args.seed)

    def edit(detail: bool) -> torch.Tensor:
        return call_node(node, model=model, clip=clip, vae=vae, image=image, instruction=INSTRUCTION,
                         image_guidance=IMAGE_SCALE, text_guidance=TEXT_SCALE, steps=steps, seed=ctx.args.seed,
                         sampler_name=SAMPLER, scheduler=SCHEDULER, resolution=ctx.args.res,
                         keep_input_size=True, detail=detail)[0]

    with torch.inference_mode():
        edit(False)  # warm-up: loads the models
        off, _ = timed(lambda: edit(False), ctx.device)
        on, _ = timed(lambda: edit(True), ctx.device)
        low = prepare_pixels(image, ctx.args.res)
        edited = (low + 0.1).clamp(0, 1)
        resize = median([timed(lambda: resize_lanczos(edited, *DETAIL_SIZE), "cpu")[0] for _ in range(3)])
        transfer = median([timed(lambda: transfer_detail(image, edited, low), "cpu")[0] for _ in range(3)])
    return {"steps": steps, "edit_detail_off_seconds": off, "edit_detail_on_seconds": on,
            "resize_seconds": resize, "transfer_seconds": transfer, "edit_size": list(low.shape[1:3])}


def detail_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    added = result["transfer_seconds"] - result["resize_seconds"]
    edit = result["edit_detail_off_seconds"]
    h, w = result["edit_size"]
    return "\n".join([
        f"detail transfer, {DETAIL_SIZE[0]}x{DETAIL_SIZE[1]} photo edited at {w}x{h} ({args.size} model, "
        f"{result['steps']} steps, {args.device}):",
        f"  whole edit: detail off {fmt(edit)} s, on {fmt(result['edit_detail_on_seconds'])} s",
        f"  restore step: Lanczos upscale (off) {fmt(result['resize_seconds'])} s, transfer (on) "
        f"{fmt(result['transfer_seconds'])} s",
        f"  added time {fmt(added)} s = {fmt(100 * added / edit, '.2f')}% of the edit "
        f"(the transfer alone: {fmt(100 * result['transfer_seconds'] / edit, '.2f')}%)",
    ])


def one_child_parent(args: argparse.Namespace, name: str, report: Callable[[argparse.Namespace, dict], str]) -> int:
    """Runs the one child `name` (--detail, --grid) in a work folder and prints its report."""
    temporary = args.workdir is None
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ip2p-bench-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run_all(args, [name])
    print(report(args, results[name]))
    if temporary:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


# --- child: guidance grid (--grid) ---------------------------------------------------------------------------

GRID_IMAGE_SCALES = (1.0, 1.5, 2.0)
GRID_TEXT_SCALES = (5.0, 7.5, 10.0)


def run_grid(ctx: Context) -> dict[str, Any]:
    """A 3x3 guidance grid two ways on the same encoded image and texts: all cells in one batched sampling run
    (pipeline/grid.py, what IP2PGuidanceGrid does) and one single edit per cell (what it did before), each with
    its decode. Also the largest relative difference of the two sets of latents."""
    from comfyui_ip2p.pipeline.edit import (
        SamplingSettings,
        decode,
        edit_latents,
        encode_image,
        encode_text,
        prepare_pixels,
    )
    from comfyui_ip2p.pipeline.grid import grid_cells, grid_latents

    model, clip, vae = load_comfy_models(ctx)
    steps = ctx.args.steps[0]
    cells = grid_cells(GRID_IMAGE_SCALES, GRID_TEXT_SCALES)
    settings = SamplingSettings(steps=steps, seed=ctx.args.seed, sampler_name=SAMPLER, scheduler=SCHEDULER)
    with torch.inference_mode():
        image_latent = encode_image(vae, prepare_pixels(ctx.image, ctx.args.res), model)
        positive, negative = encode_text(clip, INSTRUCTION), encode_text(clip, "")

        def batched() -> torch.Tensor:
            latents = grid_latents(model, positive, negative, image_latent, cells, settings)
            decode(vae, latents)
            return latents

        def per_cell() -> torch.Tensor:
            latents = []
            for s_i, s_t in cells:
                cell = SamplingSettings(steps=steps, seed=ctx.args.seed, sampler_name=SAMPLER, scheduler=SCHEDULER,
                                        image_scale=s_i, text_scale=s_t)
                latents.append(edit_latents(model, positive, negative, image_latent, cell))
                decode(vae, latents[-1])
            return torch.cat(latents)

        grid_latents(model, positive, negative, image_latent, cells[:1], settings)  # warm-up: loads the models
        batched_seconds, grid = timed(batched, ctx.device)
        per_cell_seconds, singles = timed(per_cell, ctx.device)
    error = float((grid - singles).abs().max() / singles.abs().max())
    return {"steps": steps, "cells": len(cells), "batched_seconds": batched_seconds,
            "per_cell_seconds": per_cell_seconds, "max_relative_error": error,
            "edit_size": list(image_latent.shape[2:])}


def grid_report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    h, w = (8 * side for side in result["edit_size"])
    batched, per_cell = result["batched_seconds"], result["per_cell_seconds"]
    return "\n".join([
        f"guidance grid, {result['cells']} cells at {w}x{h} ({args.size} model, {result['steps']} steps, "
        f"{args.device}):",
        f"  one batched run {fmt(batched)} s, {result['cells']} single edits {fmt(per_cell)} s: "
        f"per-cell / batched = {fmt(per_cell / batched, '.2f')}x",
        f"  max relative difference of the latents: {result['max_relative_error']:.2e}",
    ])


# --- child entry ----------------------------------------------------------------------------------------------

def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    name = args.only
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    nodes = boot_comfy(args, with_nodes=name in ("a", "a1", "a32", "b", "detail", "grid"))
    if name == "prepare":
        return prepare(args)
    if name == "detail":
        return run_detail(Context(args, args.workdir, args.device, load_image(args), nodes))
    if name == "grid":
        return run_grid(Context(args, args.workdir, args.device, load_image(args), nodes))
    if name in ("a", "a1", "a32") and "InstructEdit" not in nodes:
        raise RuntimeError("the pack registered no InstructEdit node: see the import error in ComfyUI's log above")
    ctx = Context(args, args.workdir, args.device, load_image(args), nodes)
    runners: dict[str, Callable[[], Series]] = {
        "a": lambda: run_instruct_edit(ctx, "a", IMAGE_SCALE),
        "a1": lambda: run_instruct_edit(ctx, "a1", 1.0),
        "a32": lambda: run_instruct_edit(ctx, "a32", IMAGE_SCALE),
        "b": lambda: run_core_graph(ctx),
        "c": lambda: run_diffusers(ctx),
        "d": lambda: run_floor(ctx),
    }
    return {str(steps): result.to_json() for steps, result in runners[name]().items()}


# --- parent ---------------------------------------------------------------------------------------------------

def child_argv(args: argparse.Namespace, name: str, result: Path) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--only", name, "--result", str(result), "--workdir", str(args.workdir),
        "--size", args.size, "--res", str(args.res), "--steps", ",".join(map(str, args.steps)),
        "--repeats", str(args.repeats), "--warmup-steps", str(args.warmup_steps), "--device", args.device,
        "--seed", str(args.seed), "--attention", args.attention, "--threads", str(args.threads),
        "--precision", args.precision,
    ]


def run_all(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ["prepare", *names]:
        started = time.perf_counter()
        print(f"[bench] {name}: {VARIANTS.get(name, 'checkpoint + image')} ...", file=sys.stderr, flush=True)
        result_path = args.workdir / f"result-{name}.json"
        result_path.unlink(missing_ok=True)
        results[name] = run_child(child_argv(args, name, result_path), args.workdir / f"log-{name}.txt",
                                  result_path, args.child_timeout)
        print(f"[bench] {name}: done in {time.perf_counter() - started:.1f} s{progress_note(results[name])}",
              file=sys.stderr, flush=True)
    return results


def progress_note(result: dict[str, Any]) -> str:
    """Each child's figures as soon as it ends, so a run cut short still reports what it measured."""
    parts = [f"{steps} steps {fmt(r['seconds_per_edit'])} s/edit {fmt(r['seconds_per_step'], '.4f')} s/step"
             for steps, r in result.items() if isinstance(r, dict) and "seconds_per_edit" in r]
    return (": " + "; ".join(parts)) if parts else ""


def by_steps(results: dict[str, Any], steps: int) -> dict[str, dict[str, Any]]:
    return {name: r[str(steps)] for name, r in results.items() if name != "prepare"}


def max_diff(args: argparse.Namespace, steps: int, left: str, right: str) -> float | None:
    """Max |difference| between two variants' last images (a and b: same seed and math, so ~0)."""
    paths = [args.workdir / f"out-{v}-{steps}.pt" for v in (left, right)]
    if not all(p.is_file() for p in paths):
        return None
    a, b = (torch.load(p) for p in paths)
    return float((a - b).abs().max()) if a.shape == b.shape else float("nan")


def table_rows(rows_in: dict[str, dict[str, Any]], cpu_column: bool) -> list[list[str]]:
    rows = []
    for name, r in rows_in.items():
        cells = [f"({name}) {r['label']}", fmt(r["seconds_per_edit"]), fmt(r["seconds_per_step"], ".4f")]
        if cpu_column:
            cells.append(fmt(r["details"].get("cpu_seconds_per_edit")))
        for key in ("b", "c", "d"):
            other = rows_in.get(key)
            if other is None:
                cells.append("-")
                continue
            edit = ratio(r["seconds_per_edit"], other["seconds_per_edit"])
            step = ratio(r["seconds_per_step"], other["seconds_per_step"])
            cells.append(f"{fmt(edit, '.2f')} / {fmt(step, '.2f')}")
        mem = r["memory"]
        cells += [fmt(mem.get("rss_peak_mb"), ".0f"), fmt(mem.get("cuda_peak_mb"), ".0f"), calls_cell(r["details"])]
        rows.append(cells)
    return rows


def calls_cell(details: dict[str, Any]) -> str:
    batch = "/".join(str(b) for b in details.get("unet_batch", []))
    return f"{details.get('unet_calls_per_step', 1):g} x {batch}"


def report(args: argparse.Namespace, results: dict[str, Any], steps: int) -> str:
    rows_in = by_steps(results, steps)
    cpu_column = args.device == "cpu"
    headers = ["variant", "s/edit", "s/step", *(["CPU s/edit"] if cpu_column else []), "vs (b) edit/step",
               "vs (c) edit/step", "vs floor edit/step", "peak RSS MB", "peak CUDA MB", "UNet calls/step x batch"]
    lines = [
        f"InstructPix2Pix edit: {args.size} model, {args.res}x{args.res}, {steps} steps, {SAMPLER}/{SCHEDULER}, "
        f"s_I {IMAGE_SCALE}, s_T {TEXT_SCALE}, {args.device}, attention {args.attention}, threads "
        f"{args.threads or torch.get_num_threads()}, median of {args.repeats} (warm-up {args.warmup_steps} steps)",
        format_table(headers, table_rows(rows_in, cpu_column)),
        "s/step = the sampling loop only (UNet + guidance + sampler); CPU s = process CPU time, all threads; "
        "peaks = during the timed edits (weights resident + activations).",
    ]
    for name, r in rows_in.items():
        d = r["details"]
        if "loop_seconds" in d:
            lines.append(f"  ({name}) loop {fmt(d['loop_seconds'])} s + outside the loop "
                         f"{fmt(d['outside_loop_seconds'])} s (text, VAE, set-up); dtypes {d.get('dtypes')}")
        elif "seconds" in d:
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in d["seconds"].items())
            lines.append(f"  ({name}) {parts} s; dtypes {d.get('dtypes')}")
    diff = max_diff(args, steps, "a", "b")
    if diff is not None:
        lines.append(f"  max |image (a) - image (b)| = {diff:.2e} (same seed, same formula: should be ~0)"
                     + (f"; (a) runs in precision {args.precision}" if args.precision != "fp32" else ""))
    lines += precision_lines(args, steps)
    return "\n".join(lines)


def precision_lines(args: argparse.Namespace, steps: int) -> list[str]:
    """How far the --precision edit (a) is from the fp32 edit (a32) of the same seed: relative error of the
    images and their PSNR."""
    paths = [args.workdir / f"out-{v}-{steps}.pt" for v in ("a", "a32")]
    if not all(p.is_file() for p in paths):
        return []
    ours, exact = (torch.load(p).float() for p in paths)
    relative_error = float((ours - exact).norm() / exact.norm().clamp_min(1e-12))
    mse = float((ours - exact).pow(2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    return [f"  (a) in {args.precision} vs (a32) fp32, same seed: image relative error {relative_error:.2e}, "
            f"PSNR {psnr:.1f} dB"]


def save_json(args: argparse.Namespace, results: dict[str, Any], tables: dict[int, str]) -> Path:
    out = args.out or REPO / "bench" / "results" / f"edit-{args.size}-{args.res}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("only", "result")}
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "settings": settings, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None,
        "prepare": results.get("prepare"),
        "results": {str(s): by_steps(results, s) for s in args.steps},
        "tables": {str(s): text for s, text in tables.items()},
    }
    out.write_text(json.dumps(payload, indent=2))
    return out


def parent(args: argparse.Namespace) -> int:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return measure_and_report(args, names, Reporting(run_all, report, save_json, "bench", "ip2p-bench-"))


@dataclass(frozen=True)
class Reporting:
    """How one family's parent runs its children, tabulates and saves (bench/sdxl.py has its own)."""

    run: Callable[[argparse.Namespace, list[str]], dict[str, Any]]
    report: Callable[[argparse.Namespace, dict[str, Any], int], str]
    save: Callable[[argparse.Namespace, dict[str, Any], dict[int, str]], Path]
    tag: str
    workdir_prefix: str


def measure_and_report(args: argparse.Namespace, names: list[str], how: Reporting) -> int:
    """Runs the variants in a work folder (a temporary one unless --workdir), prints a table per step count and
    saves the JSON."""
    temporary = args.workdir is None
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix=how.workdir_prefix))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = how.run(args, names)
    tables = {steps: how.report(args, results, steps) for steps in args.steps}
    print("\n\n".join(tables.values()))
    print(f"[{how.tag}] JSON: {how.save(args, results, tables)}", file=sys.stderr)
    if temporary:  # a failed run keeps its workdir (and the children's logs) for a look
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.family == "sdxl":
        import sdxl  # its own module: imported only for this family

        return sdxl.main(args)
    if not args.only:
        if args.grid:
            return one_child_parent(args, "grid", grid_report)
        return one_child_parent(args, "detail", detail_report) if args.detail else parent(args)
    args.workdir = args.workdir.resolve()
    args.result.write_text(json.dumps(run_variant(args), indent=2))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: ComfyUI's ModelPatcher.__del__ raises at shutdown (module globals already
    # gone) and freeing a 2 GB model takes seconds; the result is already on disk.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
