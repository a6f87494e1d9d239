"""Does an edit, a pair generation or a training run fit in memory? Checked with ComfyUI's own estimates before
any work starts.

Without this, an edit far too large for the device fails late and opaquely: on a GPU with an out-of-memory
error in the middle of sampling, on a CPU by the operating system killing ComfyUI (or hours of swapping).
ComfyUI's sampler already splits the conditioning batch to fit the free memory, down to one row at a time
(comfy.samplers.calc_cond_batch), so the edit is refused only when even one row cannot fit: when ComfyUI
itself would have no way left to run it. The VAE has a way out (tiles), taken before memory runs out.

On a GPU the estimate follows comfy.model_management.load_models_gpu, which the sampler calls before sampling:
it keeps `minimum_memory_required` free for computing (max(minimum_inference_memory(), the model's
memory_required for one row + extra_reserved_memory(), which --reserve-vram sets)) and, when partial loading is
possible (lowvram_available with vram_state NORMAL_VRAM, LOW_VRAM or NO_VRAM, i.e. not --highvram/--gpu-only),
loads only the weights that fit beside it and streams the rest from system memory (lowvram_model_memory). So the
weights count only where ComfyUI must load them all; a small card is refused only when even the computing
memory does not fit.

A real out-of-memory error while sampling (the estimate is an estimate) becomes the same clear message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import comfy.model_management as mm
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..training.config import TrainConfig
from ..training.trainer import autocast_dtype
from .lora import ATTENTION_PROJECTIONS, CONV_IN
from .trainee import ComfyUNet, float32_config

GIB = 1024**3
EDIT_ADVICE = ("lower `resolution` (512 suits SD1.5 models; 0 keeps the full input size), edit fewer images or "
               "variations at once, or free memory by closing other programs")
P2P_ADVICE = "lower width and height (512 suits SD1.5 models), or free memory by closing other programs"

T = TypeVar("T")

log = logging.getLogger("comfyui_ip2p.training")


class EditTooLargeError(ValueError):
    """The work needs more memory than the device has, by ComfyUI's own estimate (or by a real OOM)."""


def gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def available_memory(device: torch.device) -> int:
    """Free memory on `device` plus what ComfyUI could free there by unloading models.

    On a CPU (and Apple's unified memory) unloading moves nothing anywhere, so it frees nothing.
    """
    free = int(mm.get_free_memory(device))
    if device.type in ("cpu", "mps"):
        return free
    loaded = sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == device)
    return free + int(loaded)


def weights_to_load(patcher) -> int:
    """Bytes of the model's weights that are not on its device yet (none when device and offload are one)."""
    if patcher.load_device == patcher.offload_device:
        return 0
    return max(0, int(patcher.model_size() - patcher.loaded_size()))


def sampling_memory(patcher, latent_shape: Sequence[int], rows: int = 1) -> int:
    """ComfyUI's estimate for one model call on `rows` rows of `latent_shape` ([C, H, W])."""
    return int(patcher.model.memory_required([rows, *latent_shape]))


def partial_loading(device: torch.device) -> bool:
    """Whether ComfyUI may load part of a model's weights on `device` and stream the rest (load_models_gpu)."""
    if device.type in ("cpu", "mps"):
        return False
    return bool(mm.lowvram_available) and mm.vram_state in (mm.VRAMState.NORMAL_VRAM, mm.VRAMState.LOW_VRAM,
                                                               mm.VRAMState.NO_VRAM)


def computing_memory(device: torch.device, compute: int) -> int:
    """What ComfyUI keeps free for one model call needing `compute` bytes (load_models_gpu's
    minimum_memory_required); on a CPU (no model loading there) just `compute`."""
    if device.type in ("cpu", "mps"):
        return compute
    return int(max(mm.minimum_inference_memory(), compute + mm.extra_reserved_memory()))


def check_sampling(patcher, latent_shape: Sequence[int], what: str, advice: str = EDIT_ADVICE,
                   rows: int = 1) -> None:
    """Raises EditTooLargeError when not even the smallest batch ComfyUI can run (`rows` rows) fits."""
    device = patcher.load_device
    needed = computing_memory(device, sampling_memory(patcher, latent_shape, rows))
    streamed = partial_loading(device)
    if not streamed:
        needed += weights_to_load(patcher)
    available = available_memory(device)
    if needed > available:
        weights = " with the weights streamed from system memory (ComfyUI's low-VRAM loading)" if streamed else ""
        raise EditTooLargeError(
            f"{what} is too large for this {device.type.upper()}: sampling it needs about {gib(needed)}{weights} "
            f"(ComfyUI's estimate for one {latent_shape[-1] * 8}x{latent_shape[-2] * 8} image), but only "
            f"{gib(available)} is available. To fix: {advice}"
        )


def latent_shape_for(patcher, pixels: torch.Tensor) -> tuple[int, int, int]:
    """[C, H, W] of the latent the model samples for one of these [B, H, W, C] images."""
    channels = patcher.get_model_object("latent_format").latent_channels
    return channels, -(-pixels.shape[1] // 8), -(-pixels.shape[2] // 8)


def check_edit_fits(patcher, pixels: torch.Tensor, what: str, advice: str = EDIT_ADVICE) -> None:
    """The sampling check, done before the VAE encodes anything: a refusal should cost no work."""
    check_sampling(patcher, latent_shape_for(patcher, pixels), what, advice)


def vae_needs_tiles(vae, needed: int) -> bool:
    """Whether the VAE should work in tiles: on a CPU (or Apple) whose free memory is below ComfyUI's estimate.

    There, running out of memory cannot be caught (the process is killed or swaps for hours), so ComfyUI's
    own fallback (tiles after an out-of-memory error, as on a GPU) never gets a chance. Tiles cost a little
    time and nothing else: every image size stays possible, only sampling has a hard limit.
    """
    device = vae.device
    return device.type in ("cpu", "mps") and needed > available_memory(device)


def encode_needs_tiles(vae, pixels: torch.Tensor) -> bool:
    height, width, channels = pixels.shape[1], pixels.shape[2], pixels.shape[3]
    return vae_needs_tiles(vae, int(vae.memory_used_encode([1, channels, height, width], vae.vae_dtype)))


def decode_needs_tiles(vae, samples: torch.Tensor) -> bool:
    return vae_needs_tiles(vae, int(vae.memory_used_decode([1, *samples.shape[1:]], vae.vae_dtype)))


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU out-of-memory error, or the CPU allocator's "can't allocate memory"."""
    if isinstance(error, mm.OOM_EXCEPTION) and mm.OOM_EXCEPTION is not Exception:
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def run_out_of_memory_safe(work: Callable[[], T], what: str, advice: str = EDIT_ADVICE) -> T:
    """Runs `work`; an out-of-memory error comes back as EditTooLargeError saying what to do.

    As ComfyUI does after an out-of-memory error, loaded models are unloaded so the next run starts clean.
    """
    failed = None
    try:
        return work()
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        failed = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    # Outside the except block, so the exception's frames (and the tensors they hold) are already released.
    mm.unload_all_models()
    mm.soft_empty_cache()
    raise EditTooLargeError(f"{what} ran out of memory while sampling ({failed}). To fix: {advice}")


# --- training ---------------------------------------------------------------------------------------------

TRAIN_ADVICE = ("lower batch_size (raise grad_accumulation to keep the effective batch), lower resolution, turn on "
                "gradient_checkpointing, use mode lora, or free memory by closing other programs")
# Bytes per trainable weight besides the weight itself: its gradient (4), AdamW's two moments (8), and the
# float32 copy the resumable state takes when it is written (4). The EMA adds 4 more.
TRAINABLE_BYTES = 16
EMA_BYTES = 4
# What autograd saves is not all a step holds: the backward pass's gradient buffers and the allocator's slack come
# on top. Measured for the tiny test UNet at 256 px on CPU (one step, batch 6 -> 12: peak 2.76 -> 4.22 GiB):
# 249 MiB of process memory per sample, where the probe (pipeline.train) counts 238 MiB; issue 12 saw
# ~0.27 GB. The factor keeps a small margin over that.
ACTIVATION_OVERHEAD = 1.1
# Gradient checkpointing keeps each block's input and recomputes one block at a time in the backward pass; the
# largest blocks (level-0 transformers) hold roughly a third of a step's activations. An estimate, not measured.
CHECKPOINTED_SHARE = 0.4
# Mixed precision (bf16/fp16 autocast) keeps most activations in 16 bits. An estimate, not measured.
AUTOCAST_SHARE = 0.6


class TrainingTooLargeError(ValueError):
    """A training run needs more memory than the device has free, by the pre-flight estimate."""


def saved_activation_bytes(forward: Callable[[int], object]) -> int:
    """Bytes autograd keeps for the backward pass per sample of `forward(batch_size)`.

    Counted with saved-tensor hooks (each tensor once, weights excluded) as the difference between batch 2 and
    batch 1, so whatever a step holds regardless of the batch cancels out. Run it on the meta device: no memory,
    no arithmetic, the exact shapes of the real model.
    """

    def saved(batch: int) -> int:
        total, seen, keep = 0, set(), []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            owner = tensor._base if tensor._base is not None else tensor
            if isinstance(owner, torch.nn.Parameter) or id(owner) in seen:
                return tensor
            seen.add(id(owner))
            keep.append(owner)  # ids stay unique while the tensor is alive
            total += owner.numel() * owner.element_size()
            return tensor

        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward(batch)
        return total

    return max(0, saved(2) - saved(1))


def check_training(device: torch.device, fixed: int, per_sample: int, batch_size: int, resolution: int,
                   encode: int = 0) -> None:
    """Raises TrainingTooLargeError when weights, optimizer and one micro-batch's activations (or the VAE's encode
    of a batch, whichever is larger: they never run at once) exceed the memory available on `device`."""
    activations = per_sample * batch_size
    needed = fixed + max(activations, encode)
    available = available_memory(device)
    if needed > available:
        raise TrainingTooLargeError(
            f"training is too large for this {device.type.upper()}: it needs about {gib(needed)} (weights and "
            f"optimizer {gib(fixed)}, activations {gib(activations)} for batch_size {batch_size} at "
            f"{resolution}x{resolution}), but only {gib(available)} is available. To fix: {TRAIN_ADVICE}"
        )


# --- memory pre-flight ------------------------------------------------------------------------------------

# The activation probe runs the model at this size on the meta device and scales by area. Small on purpose: the
# meta device's attention is PyTorch's math kernel, which saves the attention matrix (quadratic in the area),
# while training runs the fused kernels (linear) on CPU and GPU. At 64 px the probe counted 14.9 MiB per sample
# for the tiny test UNet (13.8 measured for real) and 37.1 MiB for the SD1.5-sized one (35.4 real).
PROBE_RESOLUTION = 64
# Used only when the probe cannot run (a model whose code the meta device cannot trace): the SD1.5-sized UNet's
# probe figure at 256 px, rounded up.
FALLBACK_PER_SAMPLE_256 = 640 * 1024**2
# LatentBatches encodes its cache in calls of this many images (training.data: images_per_call).
CACHE_IMAGES_PER_CALL = 16


def meta_unet(model) -> UNetModel:
    """The MODEL's UNet as training builds it (float32, 8 input channels), on the meta device: shapes only."""
    base = model.model
    config = float32_config(base)
    config.unet_config["in_channels"] = 2 * int(base.latent_format.latent_channels)  # text-to-image gets widened
    return type(base)(config, model_type=base.model_type, device=torch.device("meta")).diffusion_model


def meta_size_y(unet: UNetModel):
    """For a UNet that takes a `y` vector (SDXL), one of the right width on the meta device; else None."""
    if unet.num_classes is None:
        return None
    width = unet.label_emb[0][0].in_features
    return lambda pooled, _height, _width: torch.zeros(pooled.shape[0], width, device="meta")


def activation_bytes(unet: UNetModel, channels: int, context_dim: int, resolution: int) -> int:
    """Bytes one training sample's forward pass keeps for the backward pass, at `resolution`."""
    side = PROBE_RESOLUTION // 8
    trainee = ComfyUNet(unet, meta_size_y(unet))
    tokens = 77 if trainee.size_y is None else 78  # SDXL: the pooled text as a last token

    def forward(batch: int) -> None:
        x = torch.zeros(batch, 2 * channels, side, side, device="meta")
        context = torch.zeros(batch, tokens, context_dim, device="meta")
        trainee(x, torch.zeros(batch, device="meta"), context)

    try:
        probed = saved_activation_bytes(forward)
    except Exception as error:  # an estimate must never be what stops a run that would have worked
        log.warning("TrainIP2P: could not measure the model's activations (%s); assuming SD1.5's", error)
        return int(FALLBACK_PER_SAMPLE_256 * (resolution / 256) ** 2)
    return int(probed * (resolution / PROBE_RESOLUTION) ** 2)


def trainable_count(unet: UNetModel, config: TrainConfig) -> int:
    """How many weights the optimizer updates: all of the UNet's, or what make_lora adds."""
    if config.mode != "lora":
        return sum(p.numel() for p in unet.parameters())
    count = dict(unet.named_modules())[CONV_IN].weight.numel()
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS) and ".attn" in name:
            count += config.lora_rank * (module.in_features + module.out_features)
    return count


def check_memory(model, vae, config: TrainConfig, device: torch.device) -> None:
    """Refuses a run that cannot fit before anything is copied, encoded or trained.

    Held at once while training: the float32 training copy of every UNet weight, per trainable weight its
    gradient, AdamW state, EMA and the copy the resumable state takes, and one micro-batch's activations. On a
    CPU, running out is not an error ComfyUI can catch: the process is killed, the server and its queue with it.
    """
    unet = meta_unet(model)
    channels = int(model.model.latent_format.latent_channels)
    context_dim = int(model.model.model_config.unet_config.get("context_dim") or 768)
    weights = sum(p.numel() for p in unet.parameters()) * 4
    per_weight = TRAINABLE_BYTES + (EMA_BYTES if config.uses_ema else 0)
    fixed = weights + trainable_count(unet, config) * per_weight
    share = CHECKPOINTED_SHARE if config.gradient_checkpointing else 1.0
    if autocast_dtype(config.precision, device) is not None:
        share *= AUTOCAST_SHARE
    per_sample = int(activation_bytes(unet, channels, context_dim, config.resolution) * ACTIVATION_OVERHEAD * share)
    images = CACHE_IMAGES_PER_CALL if config.cache_latents else 2 * config.batch_size
    encode = 0 if vae is None else int(vae.memory_used_encode([images, 3, config.resolution, config.resolution],
                                                              vae.vae_dtype))
    check_training(device, fixed, per_sample, config.batch_size, config.resolution, encode)
