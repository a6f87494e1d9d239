"""The paper's dual classifier-free guidance (InstructPix2Pix, eq. 3), with no ComfyUI dependency.

    e = e(z, 0_img, 0_txt) + s_I * (e(z, img, 0_txt) - e(z, 0_img, 0_txt)) + s_T * (e(z, img, txt) - e(z, img, 0_txt))

Branch names used throughout the pack: `uncond` = e(z, 0_img, 0_txt), `image` = e(z, img, 0_txt),
`full` = e(z, img, txt).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BRANCHES = ("uncond", "image", "full")


class Needed(NamedTuple):
    uncond: bool
    image: bool
    full: bool


def branches_needed(image_scale: float, text_scale: float) -> Needed:
    """Which model branches the formula actually reads.

    s_I == 1 cancels the uncond term (two branches); s_I == s_T == 1 leaves only the full branch.
    """
    check_scales(image_scale, text_scale)
    image_is_one = math.isclose(image_scale, 1.0)
    if image_is_one and math.isclose(text_scale, 1.0):
        return Needed(False, False, True)
    return Needed(not image_is_one, True, True)


def combine(uncond: torch.Tensor | None, image: torch.Tensor | None, full: torch.Tensor,
            image_scale: float, text_scale: float) -> torch.Tensor:
    """Guided prediction from the branch predictions; branches that are not needed may be None."""
    needed = branches_needed(image_scale, text_scale)
    if not needed.image:
        return full
    if image is None:
        raise ValueError("the image branch is needed unless both scales are 1")
    text_term = image + text_scale * (full - image)
    if not needed.uncond:
        return text_term
    if uncond is None:
        raise ValueError("the unconditional branch is needed when image_scale != 1")
    return text_term + (image_scale - 1.0) * (image - uncond)


def check_scales(image_scale: float, text_scale: float) -> None:
    for name, value in (("image_guidance", image_scale), ("text_guidance", text_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (the paper uses s_I=1.5, s_T=7.5), got {value}")
