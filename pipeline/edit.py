"""The edit itself on ComfyUI's machinery: encode, sample with dual guidance, decode, restore the size."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_base
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_extras.nodes_custom_sampler import BasicScheduler

from ..algorithms.detail import transfer_detail
from . import memory
from .guider import IP2PGuider, make_guider
from .images import box_pixels, fit_box, reference_size, resize_lanczos, to_rgb
from .masks import composite, feather_inward, fit_masks, latent_noise_mask


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


def prepare_pixels(images: torch.Tensor, resolution: int, framing: str = "stretch") -> torch.Tensor:
    """RGB, resized like the reference (longest side ~ resolution, multiples of 64); 0 keeps the size (/8).

    `framing` "crop" takes the centred box of the edit's aspect first (the reference's ImageOps.fit), "stretch"
    resizes the whole image to the edit's size.
    """
    check_images(images)
    images = to_rgb(images)
    height, width = images.shape[1], images.shape[2]
    if resolution > 0:
        edit_width, edit_height = reference_size(width, height, resolution)
    else:
        edit_width, edit_height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    box = fit_box(width, height, edit_width, edit_height) if framing == "crop" else None
    return resize_lanczos(images, edit_width, edit_height, box)


def edited_region(images: torch.Tensor, pixels: torch.Tensor, framing: str) -> tuple[int, int, int, int]:
    """The part of the input (x0, y0, x1, y1) that the edit at `pixels`' size shows: all of it, or the crop."""
    height, width = images.shape[1], images.shape[2]
    if framing != "crop":
        return 0, 0, width, height
    return box_pixels(fit_box(width, height, pixels.shape[2], pixels.shape[1]), width, height)


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
    """Sigmas for `steps` steps, from core's BasicScheduler itself: denoise < 1 keeps the last steps of a longer
    schedule, denoise 0 gives none."""
    return BasicScheduler.execute(model, settings.scheduler, settings.steps, settings.denoise).result[0]


def sample(guider: IP2PGuider, latent: torch.Tensor, settings: SamplingSettings, callback=None,
           noise_mask: torch.Tensor | None = None, batch_index: list[int] | None = None,
           noise: torch.Tensor | None = None, sampler=None) -> torch.Tensor:
    """Runs ComfyUI's sampler with our guider, as SamplerCustomAdvanced does.

    Noise is seeded exactly like KSampler/RandomNoise (`batch_index` picks a batch's share, as for a latent
    split off a larger batch); `noise_mask` ([B, 1, H, W] or [B, H, W], any size: ComfyUI resizes it to the
    latent) keeps every unmasked latent value at `latent`'s, as Set Latent Noise Mask does for core's samplers.
    A caller with its own noise plan (the guidance grid) passes the starting `noise` and the `sampler` object.
    """
    model = guider.model_patcher
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    sigmas = sigmas_for(model, settings)
    if sigmas.numel() == 0:
        return latent
    memory.check_sampling(model, latent.shape[1:], "the edit")
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, settings.seed, batch_index)
    if sampler is None:
        sampler = comfy.samplers.sampler_object(settings.sampler_name)
    if callback is None:
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = memory.run_out_of_memory_safe(lambda: guider.sample(
        noise, latent, sampler, sigmas, denoise_mask=noise_mask, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=settings.seed), "the edit")
    return samples.to(comfy.model_management.intermediate_device())


def edit_latents(model, positive, negative, image_latent: torch.Tensor, settings: SamplingSettings,
                 start_latent: torch.Tensor | None = None, variations: int = 1,
                 noise_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Samples `variations` edits per image latent (batch order: image-major).

    With `noise_mask` (one per image) only the masked region is sampled; the rest keeps `start_latent`, which
    then defaults to the image's own latent (what VAE Encode + Set Latent Noise Mask give core's samplers).
    """
    if start_latent is None:
        start_latent = image_latent if noise_mask is not None else torch.zeros_like(image_latent)
    if variations > 1:
        image_latent = image_latent.repeat_interleave(variations, dim=0)
        start_latent = start_latent.repeat_interleave(variations, dim=0)
        if noise_mask is not None:
            noise_mask = noise_mask.repeat_interleave(variations, dim=0)
    guider = make_guider(model, positive, negative, image_latent, settings.image_scale, settings.text_scale)
    return sample(guider, start_latent, settings, noise_mask=noise_mask)


def decode(vae, samples: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decodes to an IMAGE batch; with `size` (width, height) resizes back to it."""
    images = vae.decode_tiled(samples) if memory.decode_needs_tiles(vae, samples) else vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    images = images.clamp(0.0, 1.0)
    if size is not None:
        images = resize_lanczos(images, size[0], size[1])
    return images


# InstructEdit's `resolution` widget value for "the model's native size". 0 already means "the input's own size",
# so native is a negative value; -64 because ComfyUI's number widget snaps to multiples of its step (64)
# counted from its minimum, and only a minimum that is itself a multiple of 64 keeps 512, 1024, ... reachable.
NATIVE_RESOLUTION = -64


def native_resolution(model) -> int:
    """The side the model family was trained at: 1024 for SDXL (SDXL-IP2P, CosXL Edit), 512 for SD1.x/2.x
    (SD2.x's 768-v models also edit at 512, the InstructPix2Pix training size)."""
    return 1024 if isinstance(model.model, comfy.model_base.SDXL) else 512


def edit_resolution(model, resolution: int) -> int:
    """The longest side to edit at: any negative value is the model's native size; 0 and positive ones stay."""
    return native_resolution(model) if resolution < 0 else resolution


@dataclass(frozen=True)
class EditRequest:
    """What InstructEdit was asked: the images, the texts, and how to size and mask the edit.

    `resolution`: the edit's longest side; 0 keeps the input's size, a negative value (NATIVE_RESOLUTION) means
    the model's native size.
    """

    instruction: str
    negative: str = ""
    resolution: int = NATIVE_RESOLUTION
    keep_input_size: bool = True
    variations: int = 1
    mask: torch.Tensor | None = None
    feather: int = 0
    detail: bool = False
    framing: str = "stretch"


def edit_images(model, clip, vae, images: torch.Tensor, request: EditRequest,
                settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole edit: (edited IMAGE batch, edit latents). With a mask, only the masked region changes."""
    pixels = prepare_pixels(images, edit_resolution(model, request.resolution), request.framing)
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    masks = fit_masks(request.mask, count, height, width) if request.mask is not None else None
    if masks is not None and not bool(masks.any()):
        return unchanged(vae, images, pixels, request)
    image_latent = encode_image(vae, pixels, model)
    positive, uncond = encode_text(clip, request.instruction), encode_text(clip, request.negative)
    positive, uncond = (with_size(model, c, pixels.shape[2], pixels.shape[1]) for c in (positive, uncond))
    edit_masks = None
    if masks is not None:
        x0, y0, x1, y1 = edited_region(images, pixels, request.framing)
        edit_masks = fit_masks(masks[:, y0:y1, x0:x1], count, pixels.shape[1], pixels.shape[2])
    noise_mask = latent_noise_mask(edit_masks) if edit_masks is not None else None
    samples = edit_latents(model, positive, uncond, image_latent, settings, variations=request.variations,
                           noise_mask=noise_mask)
    edited = decode(vae, samples)
    if request.keep_input_size:
        edited = restore_size(edited, images, pixels, request)
    if masks is not None:
        base, region = (to_rgb(images), masks) if request.keep_input_size else (pixels, edit_masks)
        edited = composite(base.repeat_interleave(request.variations, dim=0).to(edited), edited,
                           feather_inward(region, request.feather).repeat_interleave(request.variations, dim=0))
    return edited, samples


def with_size(model, conditioning: list, width: int, height: int) -> list:
    """SDXL's size conditioning set to the edit's own size, where the conditioning does not set it already.

    SDXL models take the image size as a condition; without it ComfyUI assumes 768x768, whatever the image.
    Diffusers' SDXL InstructPix2Pix pipeline passes the generated size as original and target size, and so
    does this. Other families ignore these keys, so they are left off.
    """
    if not isinstance(model.model, comfy.model_base.SDXL):
        return conditioning
    size = {"width": width, "height": height, "target_width": width, "target_height": height}
    return [[embedding, {**size, **options}] for embedding, options in conditioning]


def restore_size(edited: torch.Tensor, images: torch.Tensor, pixels: torch.Tensor,
                 request: EditRequest) -> torch.Tensor:
    """The decoded edit at the input's size: the edited region (all of it, or the crop) brought back to its
    place in the input, by a Lanczos resize or, with `detail`, by adding the edit's change to the input's own
    pixels (algorithms/detail.py); outside a crop, the input's pixels."""
    variations = request.variations
    x0, y0, x1, y1 = edited_region(images, pixels, request.framing)
    same_size = (y1 - y0, x1 - x0) == tuple(edited.shape[1:3])
    if request.detail and not same_size:
        original = to_rgb(images)[:, y0:y1, x0:x1].repeat_interleave(variations, dim=0)
        low = pixels.repeat_interleave(variations, dim=0)
        piece = transfer_detail(original.to(edited), edited, low.to(edited))
    else:
        piece = resize_lanczos(edited, x1 - x0, y1 - y0)
    if (x0, y0, x1, y1) == (0, 0, images.shape[2], images.shape[1]):
        return piece
    restored = to_rgb(images).repeat_interleave(variations, dim=0).to(piece, copy=True)
    restored[:, y0:y1, x0:x1] = piece
    return restored


def unchanged(vae, images: torch.Tensor, pixels: torch.Tensor, request: EditRequest):
    """An all-zero mask edits nothing: the input comes back as it is (RGB), and its latent, with no sampling."""
    # Load Image gives an all-black mask for a photo without a painted one: say why nothing changed.
    logging.warning("InstructEdit: the mask is empty (all black), so the input is returned unchanged. Paint the "
                    "region to edit (right-click Load Image -> Open in MaskEditor) or disconnect the mask.")
    base = to_rgb(images) if request.keep_input_size else pixels
    latent = encode_image(vae, pixels)
    repeat = request.variations
    return base.repeat_interleave(repeat, dim=0), latent.repeat_interleave(repeat, dim=0)
