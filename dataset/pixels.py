"""PIL images <-> pixel tensors: the pack's one conversion between images and tensors.

A tensor image is [H, W, 3] float32 in [0, 1], RGB: one image of a ComfyUI IMAGE batch (`[None]` or
`torch.stack` makes the batch); the trainer permutes it to [3, H, W]. Back to 8 bits by rounding to nearest.
A row image (a path or bytes, maybe hostile) is opened and checked by records.open_image first.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as [H, W, 3] float32 in [0, 1] (alpha dropped, gray expanded)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """[H, W, C] in [0, 1] (C >= 3; channels after the third, such as alpha, are dropped) -> an 8-bit RGB image."""
    array = (pixels[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)
