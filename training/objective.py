"""The discrete DDPM noising and the regression target (noise or v) the UNet is trained to predict."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseSchedule:
    """`alphas_cumprod` [T] of the model's own schedule (ComfyUI: 1 / (1 + sigma^2))."""

    alphas_cumprod: torch.Tensor
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        self.alphas_cumprod = self.alphas_cumprod.detach().double().cpu()

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alphas_cumprod[t.cpu()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        signal = alpha.sqrt().view(shape).to(device=like.device, dtype=like.dtype)
        noise = (1.0 - alpha).sqrt().view(shape).to(device=like.device, dtype=like.dtype)
        return signal, noise

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, outside: float) -> torch.Tensor:
    """The per-latent-pixel MSE weighted by the mask (1 inside, `outside` elsewhere, in between at its edge),
    normalised per sample by its total weight: an all-ones mask gives the plain MSE, and each sample counts
    equally however small its mask (which also keeps any split of a batch over processes equal to the whole)."""
    weight = mask * (1.0 - outside) + outside  # [B, 1, h, w]
    error = (prediction - target).pow(2).mean(dim=1, keepdim=True)
    per_sample = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)
    return per_sample.mean()
