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
