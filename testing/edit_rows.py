"""Seeded random EditRows for tests of the dataset nodes: groups of samples that share a caption pair, with
edited images that stay near their inputs (as real edits do), and distinct seeds, p and cfg per sample; and
`write_rows`, which puts any rows on disk as a dataset in one call."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..dataset.formats import REFERENCE, open_writer
from ..dataset.records import EditRow


def write_rows(rows: Iterable[EditRow], root: str | os.PathLike, name: str, format: str = REFERENCE,
               **options: Any) -> int:
    """Write (or finish writing) `rows` as dataset `name` in `root` through the product's writer (formats.open_writer);
    returns how many rows were new."""
    with open_writer(root, name, format, **options) as writer:
        return writer.extend(rows)


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


BARN_PROMPT = {"caption": "a photo of a barn", "input": "a photo of a barn", "edit": "make it snow",
               "output": "a photo of a barn in snow"}


def jpeg_bytes(seed: int, size: int = 24, color: tuple[int, int, int] | None = None) -> bytes:
    """A seeded random (or one-colour) JPEG."""
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), color, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def foreign_reference_pair(folder: Path, seeds: tuple[int, ...], metadata: bytes) -> Path:
    """A reference dataset as the paper's generator writes it (no manifest, no group key in prompt.json): one
    caption pair with `seeds`, and `metadata` as its metadata.jsonl, byte for byte."""
    pair = folder / "0000000"
    pair.mkdir(parents=True)
    (folder / "seeds.json").write_text(json.dumps([["0000000", list(seeds)]]))
    (pair / "prompt.json").write_text(json.dumps(BARN_PROMPT))
    for seed in seeds:
        (pair / f"{seed}_0.jpg").write_bytes(jpeg_bytes(seed))
        (pair / f"{seed}_1.jpg").write_bytes(jpeg_bytes(seed + 50))
    (pair / "metadata.jsonl").write_bytes(metadata)
    return pair
