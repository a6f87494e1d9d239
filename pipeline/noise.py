"""Noise for a batch of samples that must each match a single run with its own seed: the starting noise and the
stochastic samplers' noise (Gaussian or Brownian tree) drawn per sample and repeated over the sample's rows.
Used by the Prompt-to-Prompt pairs (both images of a pair share it) and the guidance grid (every cell of it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import comfy.k_diffusion.sampling
import comfy.samplers
import torch


def uses_brownian_noise(sampler_name: str) -> bool:
    """The DPM++ SDE samplers draw Brownian-tree noise by default; the others draw plain Gaussian noise."""
    return sampler_name.startswith("dpmpp_") and "_sde" in sampler_name


class SharedNoise:
    """Per-sample noise for a `[sources; edits]` batch: each sample's noise is repeated for its two rows.

    Each sample has its own CPU generator seeded by its seed: the starting noise equals ComfyUI's
    prepare_noise for that seed, and a sample's images do not depend on the batch it ran in.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]) -> None:
        self.seeds = list(seeds)
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]

    def draw(self) -> torch.Tensor:
        sample = torch.cat([torch.randn((1, *self.shape), generator=g) for g in self.generators])
        return torch.cat([sample, sample])

    def sampler(self, sampler_name: str, sigmas: torch.Tensor) -> Callable:
        """noise_sampler(sigma, sigma_next) for the k-diffusion samplers, in the sampler's own style."""
        if uses_brownian_noise(sampler_name):
            return self._brownian(sigmas)

        def gaussian(sigma, sigma_next):  # noqa: ARG001 (ComfyUI's callback signature)
            return self.draw().to(device=sigma.device)

        return gaussian

    def _brownian(self, sigmas: torch.Tensor) -> Callable:
        positive = sigmas[sigmas > 0]
        sigma_min, sigma_max = positive.min().cpu(), sigmas.max().cpu()
        template = torch.zeros((len(self.seeds), *self.shape))
        tree = comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(template, sigma_min, sigma_max, seed=self.seeds,
                                                                   cpu=True)

        def brownian(sigma, sigma_next):
            sample = tree(sigma.cpu(), sigma_next.cpu())
            return torch.cat([sample, sample]).to(device=sigma.device)

        return brownian


def accepts_noise_sampler(function: Callable) -> bool:
    try:
        return "noise_sampler" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def shared_noise_sampler_object(sampler_name: str, noise: SharedNoise, sigmas: torch.Tensor):
    """ComfyUI's sampler object for `sampler_name`, drawing its stochastic noise from `noise`."""
    sampler = comfy.samplers.sampler_object(sampler_name)
    if isinstance(sampler, comfy.samplers.KSAMPLER) and accepts_noise_sampler(sampler.sampler_function):
        # A new dict: ksampler() hands out a shared default extra_options.
        sampler.extra_options = {**sampler.extra_options, "noise_sampler": noise.sampler(sampler_name, sigmas)}
    return sampler
