"""The edit itself on ComfyUI's machinery: encode, sample with dual guidance, decode, restore the size."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from . import memory
from .guider import IP2PGuider, make_guider
from .images import reference_size, resize_lanczos, to_rgb


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 20
    seed: int = 0
    sampler_name: str = "euler_ancestral"
    scheduler: str = "normal"
    image_scale: float = 1.5
    text_scale: float = 7.5
    denoise: float = 1.0


# CLIP reads text in windows of 75 tokens and ComfyUI encodes every window of a long prompt. Past this many
# windows (~1200 tokens, far beyond any instruction) the text is almost certainly pasted by mistake or hostile:
# each window costs a text-encoder pass and widens every cross-attention of every sampling step.
MAX_TEXT_WINDOWS = 16
MAX_TEXT_CHARS = 20_000  # refused before tokenizing, which itself takes seconds for ~100k characters


def encode_text(clip, text: str) -> list:
    if clip is None:
        raise ValueError("no CLIP (text encoder): connect the CLIP output of LoadIP2PModel or a checkpoint loader")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the text is {len(text)} characters long (at most {MAX_TEXT_CHARS}); write a short "
                         "instruction or caption, like 'make it winter'")
    tokens = clip.tokenize(text)
    windows = max((len(v) for v in tokens.values() if isinstance(v, list)), default=0)
    if windows > MAX_TEXT_WINDOWS:
        raise ValueError(f"the text fills {windows} CLIP windows of 75 tokens (at most {MAX_TEXT_WINDOWS}); "
                         "shorten it to a short instruction or caption, like 'make it winter'")
    return clip.encode_from_tokens_scheduled(tokens)


def prepare_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """RGB, resized like the reference (longest side ~ resolution, multiples of 64); 0 keeps the size (/8)."""
    check_images(images)
    images = to_rgb(images)
    height, width = images.shape[1], images.shape[2]
    if resolution > 0:
        width, height = reference_size(width, height, resolution)
    else:
        width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    return resize_lanczos(images, width, height)


def check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a batch of images [B, H, W, C] with B >= 1, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("the image contains NaN or infinite values: check the node that made it")


def encode_image(vae, pixels: torch.Tensor, model=None) -> torch.Tensor:
    """The raw VAE latent (posterior mode, no scaling factor): what IP2P concatenates to the noisy latent.

    With `model`, an edit too large to sample is refused first, before the encoder spends any time on it.
    """
    if vae is None:
        raise ValueError("no VAE: connect the VAE output of LoadIP2PModel or a VAE loader")
    pixels = pixels[..., :3]
    if model is not None:
        memory.check_edit_fits(model, pixels, "the edit")
    if memory.encode_needs_tiles(vae, pixels):
        return vae.encode_tiled(pixels)
    return vae.encode(pixels)


def sigmas_for(model, settings: SamplingSettings) -> torch.Tensor:
    """Sigmas for `steps` steps; denoise < 1 keeps the last steps of a longer schedule (as KSampler does)."""
    total = settings.steps
    if settings.denoise < 1.0:
        if settings.denoise <= 0.0:
            return torch.zeros(0)
        total = int(settings.steps / settings.denoise)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, settings.scheduler, total).cpu()
    return sigmas[-(settings.steps + 1):]


def sample(guider: IP2PGuider, latent: torch.Tensor, settings: SamplingSettings, callback=None) -> torch.Tensor:
    """Runs ComfyUI's sampler with our guider; noise is seeded exactly like KSampler/RandomNoise."""
    model = guider.model_patcher
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    sigmas = sigmas_for(model, settings)
    if sigmas.numel() == 0:
        return latent
    memory.check_sampling(model, latent.shape[1:], "the edit")
    noise = comfy.sample.prepare_noise(latent, settings.seed)
    sampler = comfy.samplers.sampler_object(settings.sampler_name)
    if callback is None:
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = memory.run_out_of_memory_safe(lambda: guider.sample(
        noise, latent, sampler, sigmas, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=settings.seed), "the edit")
    return samples.to(comfy.model_management.intermediate_device())


def edit_latents(model, positive, negative, image_latent: torch.Tensor, settings: SamplingSettings,
                 start_latent: torch.Tensor | None = None, variations: int = 1) -> torch.Tensor:
    """Samples `variations` edits per image latent (batch order: image-major)."""
    if variations > 1:
        image_latent = image_latent.repeat_interleave(variations, dim=0)
        if start_latent is not None:
            start_latent = start_latent.repeat_interleave(variations, dim=0)
    if start_latent is None:
        start_latent = torch.zeros_like(image_latent)
    guider = make_guider(model, positive, negative, image_latent, settings.image_scale, settings.text_scale)
    return sample(guider, start_latent, settings)


def decode(vae, samples: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decodes to an IMAGE batch; with `size` (width, height) resizes back to it."""
    images = vae.decode_tiled(samples) if memory.decode_needs_tiles(vae, samples) else vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    images = images.clamp(0.0, 1.0)
    if size is not None:
        images = resize_lanczos(images, size[0], size[1])
    return images
