"""Synthetic material for tests and benchmarks: a small edit task a tiny model can learn in seconds ("invert
the colours" of random coloured shapes), and pure-torch stand-ins for the UNet and the frozen encoders."""

from __future__ import annotations

import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ..dataset.records import EditRow

INSTRUCTION = "invert the colours"


def random_shapes(rng: np.random.Generator, size: int) -> Image.Image:
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        extent = int(rng.integers(size // 4, size // 2 + 1))
        box = [x0, y0, min(size - 1, x0 + extent), min(size - 1, y0 + extent)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def invert_rows(count: int, size: int = 64, seed: int = 0, instruction: str = INSTRUCTION) -> list[EditRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        source = random_shapes(rng, size)
        rows.append(EditRow(input_caption="shapes", instruction=instruction, output_caption="inverted shapes",
                            input_image=source, edited_image=ImageOps.invert(source), seed=seed * 100_000 + index))
    return rows


# --- tiny pure-torch stand-ins for the UNet and the frozen encoders -------------------------------------------

class ToyBlock(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(torch.nn.functional.silu(self.conv1(h)))


class ToyUNet(torch.nn.Module):
    """The trainer's `unet(x, t, context)` contract in a few thousand weights: x = [noisy target, image]."""

    def __init__(self, latent_channels: int = 4, context_dim: int = 16, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Conv2d(2 * latent_channels, width, 3, padding=1)
        self.time = torch.nn.Linear(1, width)
        self.text = torch.nn.Linear(context_dim, width)
        self.blocks = torch.nn.ModuleList([ToyBlock(width), ToyBlock(width)])
        self.out = torch.nn.Conv2d(width, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        condition = self.time((t.float() / 1000.0)[:, None]) + self.text(context.mean(dim=1))
        h = self.inp(x) + condition[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion 1.x's noise schedule ("scaled_linear" betas), for the toy UNet's trainer."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def toy_encode_images(pixels: torch.Tensor) -> torch.Tensor:
    """A 'VAE' that is exactly equivariant to flips and 8-pixel-aligned crops: 8x8 average pooling."""
    pooled = torch.nn.functional.avg_pool2d(pixels * 2.0 - 1.0, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def toy_encode_texts(texts: list[str], tokens: int = 77, dim: int = 16) -> torch.Tensor:
    """A deterministic 'text encoder': each distinct text gets its own seeded random embedding."""
    out = []
    for text in texts:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        out.append(torch.randn(tokens, dim, generator=generator))
    return torch.stack(out)
