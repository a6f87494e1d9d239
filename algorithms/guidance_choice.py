"""Choosing the two guidance scales from CLIP scores of an s_I x s_T grid (pure: no ComfyUI, no CLIP).

The paper picks its scales by the trade-off between CLIP image similarity (how much of the input is kept) and
CLIP direction similarity (how well the change follows the text change). The rule here: among the cells whose
image similarity is at least `min_image_similarity`, the one with the highest direction similarity (ties: the
first in row-major order, i.e. the lower s_I, then the lower s_T). When no cell keeps enough of the input, the
most faithful cell (the highest image similarity) is returned, marked as not passing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GuidanceChoice:
    index: int  # the chosen cell, row-major
    passed: bool  # whether it meets the image-similarity minimum (False: no cell did)
    passing: tuple[bool, ...]  # per cell: meets the minimum


def choose_cell(sim_dir: Sequence[float], sim_image: Sequence[float], min_image_similarity: float) -> GuidanceChoice:
    """The best cell by the rule above. NaN scores never pass and never win."""
    if len(sim_dir) != len(sim_image) or not sim_dir:
        raise ValueError(f"one direction and one image similarity per cell, got {len(sim_dir)} and "
                         f"{len(sim_image)}")
    if not math.isfinite(min_image_similarity):
        raise ValueError(f"min_image_similarity must be a finite number, got {min_image_similarity}")
    passing = tuple(math.isfinite(d) and math.isfinite(s) and s >= min_image_similarity
                    for d, s in zip(sim_dir, sim_image, strict=True))
    candidates = [i for i, ok in enumerate(passing) if ok]
    if candidates:
        # max() keeps the first of equal values: the row-major tie rule.
        return GuidanceChoice(max(candidates, key=lambda i: sim_dir[i]), True, passing)
    finite = [i for i, s in enumerate(sim_image) if math.isfinite(s)] or [0]
    return GuidanceChoice(max(finite, key=lambda i: sim_image[i]), False, passing)
