"""The paper's dual classifier-free guidance (InstructPix2Pix, eq. 3), with no ComfyUI dependency.

    e = e(z, 0_img, 0_txt) + s_I * (e(z, img, 0_txt) - e(z, 0_img, 0_txt)) + s_T * (e(z, img, txt) - e(z, img, 0_txt))

Branch names used throughout the pack: `uncond` = e(z, 0_img, 0_txt), `image` = e(z, img, 0_txt),
`full` = e(z, img, txt).

The formula is grouped as ComfyUI core's Guider_DualCFG ("regular" style) groups it:

    e = cfg(image, uncond, s_I) + s_T * (full - image),   cfg(c, u, s) = u + s * (c - u)

so that the image-guidance pair can go through ComfyUI's `cfg_function`, where model patches (RescaleCFG,
PAG, CFGZeroStar, ...) hook in. `combine` takes that `cfg` as a parameter; the plain one is the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

BRANCHES = ("uncond", "image", "full")

# cfg(cond_prediction, uncond_prediction, scale) -> guided prediction
CfgFunction = Callable[[torch.Tensor, torch.Tensor, float | torch.Tensor], torch.Tensor]


class Needed(NamedTuple):
    uncond: bool
    image: bool
    full: bool


def branches_needed(image_scale: float, text_scale: float, keep_all: bool = False) -> Needed:
    """Which model branches the formula actually reads.

    s_I == 1 cancels the uncond term (two branches); s_I == s_T == 1 leaves only the full branch. `keep_all`
    (ComfyUI's `disable_cfg1_optimization`, set by patches such as SAG that read every branch) runs all three.
    """
    check_scales(image_scale, text_scale)
    image_is_one = math.isclose(image_scale, 1.0)
    if keep_all or not image_is_one:
        return Needed(True, True, True)
    if math.isclose(text_scale, 1.0):
        return Needed(False, False, True)
    return Needed(False, True, True)


def branches_needed_by_any(image_scales: Sequence[float], text_scales: Sequence[float],
                           keep_all: bool = False) -> Needed:
    """The branches a batch of samples with per-sample scales needs: every branch any one sample reads."""
    needs = [branches_needed(s_i, s_t, keep_all) for s_i, s_t in zip(image_scales, text_scales, strict=True)]
    return Needed(*(any(need[branch] for need in needs) for branch in range(len(BRANCHES))))


def plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return uncond + (cond - uncond) * scale


def combine(uncond: torch.Tensor, image: torch.Tensor, full: torch.Tensor, image_scale: float | torch.Tensor,
            text_scale: float | torch.Tensor, cfg: CfgFunction = plain_cfg) -> torch.Tensor:
    """Guided prediction from the three branch predictions.

    The scales are numbers, or tensors shaped to broadcast over the batch ([B, 1, 1, 1]) for a scale per sample.

    A branch that `branches_needed` skips is passed as zeros (as ComfyUI's batch evaluation returns it): the
    skipped terms then vanish exactly, e.g. at s_I == 1 cfg(image, 0, 1) == image.
    """
    return cfg(image, uncond, image_scale) + (full - image) * text_scale


def check_scales(image_scale: float, text_scale: float) -> None:
    for name, value in (("image_guidance", image_scale), ("text_guidance", text_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (the paper uses s_I=1.5, s_T=7.5), got {value}")
