"""The paper's conditioning dropout, which is what makes classifier-free guidance on both inputs possible.

One uniform draw r per sample decides three equal bands (5% each in the paper):
r < p: text dropped; p <= r < 2p: text and image dropped; 2p <= r < 3p: image dropped.
A dropped text becomes the empty prompt's embedding, a dropped image an all-zero latent, exactly what the
unconditional branches of the dual guidance see at inference.
"""

from __future__ import annotations

import torch


def dropout_masks(r: torch.Tensor, prob: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image) boolean masks for uniform draws `r` of shape [B]."""
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob)
    return drop_text, drop_image


def apply_dropout(
    context: torch.Tensor,
    image_latent: torch.Tensor,
    empty_context: torch.Tensor,
    drop_text: torch.Tensor,
    drop_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces dropped texts by `empty_context` ([1, T, D]) and zeroes dropped image latents."""
    drop_text = drop_text.to(context.device).view(-1, 1, 1)
    empty = empty_context.to(device=context.device, dtype=context.dtype).expand_as(context)
    context = torch.where(drop_text, empty, context)
    keep_image = (~drop_image).to(device=image_latent.device, dtype=image_latent.dtype).view(-1, 1, 1, 1)
    return context, image_latent * keep_image
