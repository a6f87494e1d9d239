"""Masks for region edits: fit a MASK to the images, feather it inward, composite the edit into the input.

Plain torch, no ComfyUI: a MASK is [B, H, W] (or [H, W]) in [0, 1], an IMAGE [B, H, W, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_masks(mask: torch.Tensor, count: int, height: int, width: int) -> torch.Tensor:
    """One [height, width] mask per image: a single mask serves the whole batch, otherwise one each.

    A mask of another size is resized (bilinear) to the images, as core's inpainting nodes do.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(f"expected a MASK [B, H, W], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, count):
        raise ValueError(f"got {mask.shape[0]} masks for {count} images: connect one mask for all images, "
                         "or one mask per image")
    if not torch.isfinite(mask).all():
        raise ValueError("the mask contains NaN or infinite values: check the node that made it")
    mask = mask.float().clamp(0.0, 1.0)
    if mask.shape[1:] != (height, width):
        mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        mask = mask.squeeze(1).clamp(0.0, 1.0)
    return mask.expand(count, height, width).contiguous()


def feather_inward(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Softens the mask's edge over about `pixels` pixels *inside* the mask, so nothing outside it changes.

    Erodes by half the width, box-blurs over the other half (a ramp from 0 at the edge to 1 about `pixels`
    in), and never exceeds the original mask. Both filters are separable: the cost grows with the width, not
    its square. The image border does not count as an edge.
    """
    radius = (pixels + 1) // 2
    if radius <= 0:
        return mask
    outside = 1.0 - mask.unsqueeze(1)
    eroded = 1.0 - _separable(outside, radius, F.max_pool2d)
    ramp = _separable(eroded, radius, F.avg_pool2d)
    return torch.minimum(mask, ramp.squeeze(1))


def _separable(x: torch.Tensor, radius: int, pool) -> torch.Tensor:
    """A square (2r+1)^2 max or mean filter as a row pass and a column pass, edges replicated."""
    size = 2 * radius + 1
    x = pool(F.pad(x, (radius, radius, 0, 0), mode="replicate"), (1, size), stride=1)
    return pool(F.pad(x, (0, 0, radius, radius), mode="replicate"), (size, 1), stride=1)


def composite(original: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The edit inside the mask, the original outside: where the mask is 0 the original's own values."""
    weight = mask.unsqueeze(-1).to(edited.dtype)
    blended = original * (1.0 - weight) + edited * weight
    return torch.where(weight > 0, blended, original)


def latent_noise_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, 1, H, W], the shape Set Latent Noise Mask stores; ComfyUI resizes it to the latent."""
    return mask.unsqueeze(1)
