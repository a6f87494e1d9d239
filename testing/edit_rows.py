"""Seeded random EditRows for tests of the dataset nodes: groups of samples that share a caption pair, with
edited images that stay near their inputs (as real edits do), and distinct seeds, p and cfg per sample."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..dataset.records import EditRow


def random_rows(groups: int = 2, per_group: int = 5, size: int = 48, seed: int = 0) -> list[EditRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        for s in range(per_group):
            base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            edit = np.clip(base.astype(int) + rng.integers(-80, 80, base.shape), 0, 255).astype(np.uint8)
            rows.append(EditRow(f"a photo of house {g}", "make it winter", f"a photo of house {g} in winter",
                                Image.fromarray(base), Image.fromarray(edit), seed=100 * g + s, p=0.1 * s,
                                cfg=7.5 + s))
    return rows
