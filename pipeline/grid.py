"""The guidance grid in one sampling run: every s_I x s_T cell is one row of a single latent batch.

Each step, the needed branches of all cells go through ComfyUI's `calc_cond_batch` together: one model call
for the whole grid when the memory allows. When it does not, ComfyUI splits the branches into separate calls
itself, and where even one branch of every cell would not fit, the cells are split here into the largest
groups that do (a cell never depends on another, so the split changes nothing but the time).

The per-cell scales enter the IP2PGuider's formula as [K, 1, 1, 1] tensors:
cfg_function(image, uncond, s_I) + s_T * (full - image), with cfg_function and every hook it runs
(sampler_pre_cfg_function, sampler_cfg_function, sampler_post_cfg_function: RescaleCFG, CFGZeroStar, ...)
computing with a tensor scale as with core's float, by broadcasting (P2PGuider does the same).

A cell equals the edit InstructEdit makes with the cell's scales and the same seed: each row starts from the
noise `prepare_noise` gives that seed for a single image, and a stochastic sampler's extra noise is the noise
the sampler would draw for a single image with that seed (ComfyUI's own noise samplers on a one-image
template), repeated over the cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from ..algorithms.dual_cfg import branches_needed_by_any, check_scales, combine
from .attention import with_fused_attention
from .edit import (
    SamplingSettings,
    decode,
    edit_resolution,
    encode_image,
    encode_text,
    prepare_pixels,
    sample,
    sigmas_for,
    with_size,
)
from .guider import CORE_KEYS, CfgHooks, IP2PGuider, matching_text
from .noise import accepts_noise_sampler, uses_brownian_noise

Cell = tuple[float, float]  # (s_I, s_T)


def grid_cells(image_scales: Sequence[float], text_scales: Sequence[float]) -> list[Cell]:
    """The cells row by row: rows are s_I, columns s_T (the order of the grid picture and the images batch)."""
    return [(float(s_i), float(s_t)) for s_i in image_scales for s_t in text_scales]


def per_row(values: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """One value per batch row, shaped [B, 1, 1, 1] to broadcast over the row's latent."""
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


class GridGuider(IP2PGuider):
    """IP2PGuider with one (s_I, s_T) pair per batch row: the cells of a guidance grid in one sampling run."""

    image_scales: tuple[float, ...] = (IP2PGuider.image_scale,)
    text_scales: tuple[float, ...] = (IP2PGuider.text_scale,)

    def set_cfg(self, image_scales: Sequence[float], text_scales: Sequence[float]):  # type: ignore[override]
        if not image_scales or len(image_scales) != len(text_scales):
            raise ValueError(f"one image and one text scale per cell, got {len(image_scales)} and "
                             f"{len(text_scales)}")
        for s_i, s_t in zip(image_scales, text_scales, strict=True):
            check_scales(s_i, s_t)
        self.image_scales = tuple(float(s) for s in image_scales)
        self.text_scales = tuple(float(s) for s in text_scales)

    def predict_noise(self, x, timestep, model_options=None, seed=None):  # noqa: ARG002 (ComfyUI's callback signature)
        # Checked once per model call so a cancel lands within one step, whatever the sampler.
        comfy.model_management.throw_exception_if_processing_interrupted()
        model_options = model_options if model_options is not None else {}
        if x.shape[0] != len(self.image_scales):
            raise ValueError(f"{len(self.image_scales)} guidance cells for a batch of {x.shape[0]} latents")
        keep_all = bool(model_options.get("disable_cfg1_optimization", False))
        needed = branches_needed_by_any(self.image_scales, self.text_scales, keep_all)
        conds = [self.conds.get(key) if use else None for key, use in zip(CORE_KEYS, needed, strict=True)]
        uncond, image, full = self.branches(conds, x, timestep, model_options)
        hooks = CfgHooks(self.inner_model, x, timestep, model_options, conds)
        return combine(uncond, image, full, per_row(self.image_scales, x), per_row(self.text_scales, x), cfg=hooks)

    def branches(self, conds: list, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> list:
        """The three branch predictions for every row, in as few model calls as the memory allows."""
        rows = cells_per_call(self.inner_model, x)
        if rows >= x.shape[0]:
            return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        parts = [comfy.samplers.calc_cond_batch(self.inner_model, conds, x[start:start + rows],
                                                timestep[start:start + rows], model_options)
                 for start in range(0, x.shape[0], rows)]
        return [torch.cat([part[branch] for part in parts]) for branch in range(len(conds))]


def cells_per_call(model, x: torch.Tensor) -> int:
    """Rows of one branch that fit in one model call, by ComfyUI's estimate and margin (as calc_cond_batch)."""
    free = comfy.model_management.get_free_memory(x.device)
    rows = x.shape[0]
    while rows > 1 and model.memory_required([rows, *x.shape[1:]]) * 1.5 >= free:
        rows = -(-rows // 2)
    return rows


class RepeatedNoise:
    """A k-diffusion `noise_sampler(sigma, sigma_next)` giving every cell the noise that `sampler_name` draws
    for a single image with `seed`: ComfyUI's own noise sampler on a one-image template, repeated."""

    def __init__(self, sampler_name: str, seed: int, shape: Sequence[int], copies: int,
                 sigmas: torch.Tensor) -> None:
        self.sampler_name, self.seed, self.shape, self.copies = sampler_name, seed, tuple(shape), copies
        self.sigmas = sigmas
        self.single: Callable | None = None

    def __call__(self, sigma, sigma_next):
        if self.single is None:
            self.single = self.single_image_sampler(sigma.device)
        noise = self.single(sigma, sigma_next)
        return noise.expand(self.copies, *noise.shape[1:]).contiguous()

    def single_image_sampler(self, device: torch.device) -> Callable:
        template = torch.zeros((1, *self.shape), device=device)
        if uses_brownian_noise(self.sampler_name):
            # The SDE samplers' own default: a Brownian tree over the schedule, on the CPU unless "_gpu".
            sigmas = self.sigmas.to(device)
            positive = sigmas[sigmas > 0]
            return comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(
                template, positive.min(), sigmas.max(), seed=self.seed, cpu=not self.sampler_name.endswith("_gpu"))
        return comfy.k_diffusion.sampling.default_noise_sampler(template, seed=self.seed)


def grid_sampler(sampler_name: str, noise: RepeatedNoise):
    """ComfyUI's sampler object for `sampler_name`, drawing its extra noise from `noise` (deterministic
    samplers take no noise sampler and are returned as they are)."""
    sampler = comfy.samplers.sampler_object(sampler_name)
    if isinstance(sampler, comfy.samplers.KSAMPLER) and accepts_noise_sampler(sampler.sampler_function):
        # A new dict: ksampler() hands out a shared default extra_options.
        sampler.extra_options = {**sampler.extra_options, "noise_sampler": noise}
    return sampler


def grid_latents(model, positive, negative, image_latent: torch.Tensor, cells: Sequence[Cell],
                 settings: SamplingSettings, callback=None) -> torch.Tensor:
    """Latents [K, C, H, W] of the K cells of one image latent ([1, C, H, W]), in one sampling run with one
    progress bar. Cell k equals `edit_latents` with settings at (s_I, s_T) = cells[k]."""
    if image_latent.shape[0] != 1:
        raise ValueError(f"the guidance grid edits one image, got a batch of {image_latent.shape[0]}")
    matching_text(model, positive)
    matching_text(model, negative)
    guider = GridGuider(with_fused_attention(model))
    guider.set_conds(positive, negative, image_latent)
    guider.set_cfg([s_i for s_i, _ in cells], [s_t for _, s_t in cells])
    count = len(cells)
    single = comfy.sample.fix_empty_latent_channels(model, torch.zeros_like(image_latent))
    noise = comfy.sample.prepare_noise(single, settings.seed).repeat(count, *([1] * (single.ndim - 1)))
    extra_noise = RepeatedNoise(settings.sampler_name, settings.seed, single.shape[1:], count,
                                sigmas_for(model, settings))
    sampler = grid_sampler(settings.sampler_name, extra_noise)
    start = single.repeat(count, *([1] * (single.ndim - 1)))
    return sample(guider, start, settings, callback=callback, noise=noise, sampler=sampler)


def edit_grid(model, clip, vae, image: torch.Tensor, instruction: str, cells: Sequence[Cell], resolution: int,
              settings: SamplingSettings, negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(the input as edited: resized RGB pixels [1, H, W, 3], the cells' edits [K, H, W, 3]) for the first image.

    `resolution` as InstructEdit's: negative = the model's native size; SDXL gets the same size conditioning."""
    pixels = prepare_pixels(image[:1], edit_resolution(model, resolution))
    image_latent = encode_image(vae, pixels, model)
    width, height = pixels.shape[2], pixels.shape[1]
    positive, uncond = (with_size(model, encode_text(clip, text), width, height) for text in (instruction, negative))
    samples = grid_latents(model, positive, uncond, image_latent, cells, settings)
    return pixels, decode(vae, samples)
