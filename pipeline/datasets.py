"""Datasets on disk, ComfyUI side: written inside the output folder only, read from the input or the output
folder, listed for the nodes' combos, previews bounded in pixels (over dataset/formats.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from PIL import Image

from ..dataset.format_reference import SEEDS_NAME
from ..dataset.formats import FORMATS, open_writer
from ..dataset.layouts import parse_mapping
from ..dataset.paths import file_stamp, resolve_inside
from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow, open_image
from ..dataset.source import RowSource, open_rows
from ..dataset.source_folders import looks_like_pairs
from ..dataset.writer import MANIFEST_NAMES, WriterBusyError, write_failure
from .instructions import CACHE_DIR

NO_FILE = "none"
DATASET_ROOTS = ("output", "input")
_SCAN_LIMIT = 2000  # entries looked at per folder level when listing datasets or caption files
_PARQUET_SCAN_LIMIT = 200


def _inside(root: str | os.PathLike, name: str, what: str) -> Path:
    try:
        return resolve_inside(root, name)
    except ValueError as error:
        raise ValueError(f"{what} {name!r} must name a file inside {root}: {error}") from None





def output_root() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def save_rows(rows: Sequence[EditRow], name: str, fmt: str, image_format: str) -> tuple[str, int, int]:
    """Writes (or resumes) dataset `name` inside the output folder: (path relative to it, new rows, total)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    missing = sum(1 for r in rows if r.input_image is None or r.edited_image is None)
    if missing:
        raise ValueError(f"{missing} of {len(rows)} rows have no images: connect the rows through "
                         "P2PPairGenerator (and CLIPDirectionFilter) before saving")
    root = output_root()
    bar = comfy.utils.ProgressBar(max(len(rows), 1))
    written = 0
    try:
        writer = open_writer(root, name, fmt, image_format=image_format)
    except WriterBusyError as error:
        raise ValueError(str(error)) from None
    # The writer keeps every row added before an interrupt or a failed write; a rerun skips them.
    try:
        with writer:
            for index, row in enumerate(rows):
                mm.throw_exception_if_processing_interrupted()
                written += writer.add(row)
                bar.update_absolute(index + 1, len(rows))
    except OSError as error:
        where = writer.path.relative_to(root).as_posix()
        raise ValueError(
            f"could not write the dataset output/{where}: {write_failure(error)}. The {len(writer)} rows saved "
            "before are complete and kept; free space and run again: only the missing rows are added"
        ) from error
    return writer.path.relative_to(root).as_posix(), written, len(writer)


# Said when a save ends with no rows: `datasets` (5.x) cannot load an empty split, so diffusers' training
# script fails on such a folder with "doesn't contain any data files"; this is the pack's word on why.
EMPTY_DATASET_NOTE = (". The dataset has no rows yet: datasets.load_dataset and diffusers' train_instruct_pix2pix.py "
                      "refuse an empty dataset. Save rows into it first (fewer pairs dropped by CLIPDirectionFilter "
                      "with lower thresholds?)")


def _looks_like_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    if any((path / name).is_file() for name in (*MANIFEST_NAMES, SEEDS_NAME)):
        return True
    # A bounded look: this runs for every entry of the output folder whenever the node list is built.
    # A folder of pairs is judged by the entries seen; a bigger one missed here loads through dataset_override.
    names = [p.name for p in islice(path.iterdir(), _PARQUET_SCAN_LIMIT)]
    if any(name.lower().endswith(".parquet") for name in names) or looks_like_pairs(names):
        return True
    data = path / "data"
    return data.is_dir() and any(p.suffix == ".parquet" for p in islice(data.iterdir(), _PARQUET_SCAN_LIMIT))


def dataset_choices() -> list[str]:
    """Datasets in the output and input folders (two levels deep), as `output/<name>` or `input/<name>`."""
    found = []
    for root_name in DATASET_ROOTS:
        root = Path(folder_paths.get_directory_by_type(root_name))
        if root.is_dir():
            found += [f"{root_name}/{rel}" for rel in _datasets_under(root)]
    return found or [NO_FILE]


def _datasets_under(root: Path, depth: int = 2) -> list[str]:
    found = []
    for entry in sorted(islice(root.iterdir(), _SCAN_LIMIT)):
        if entry.name.startswith((".", "_")) or entry.name == CACHE_DIR:
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(root.resolve()):
            continue  # loading refuses it anyway; listing it would mean looking outside ComfyUI's folders
        if _looks_like_dataset(entry):
            found.append(entry.name)
        elif entry.is_dir() and depth > 1:
            found += [f"{entry.name}/{rel}" for rel in _datasets_under(entry, depth - 1)]
    return found


def resolve_dataset(choice: str, override: str) -> Path:
    """`override` if given, else `choice`: `output/<name>`, `input/<name>`, or a bare name (output, then input)."""
    name = (override or "").strip() or choice
    if not name or name == NO_FILE:
        raise ValueError("no dataset chosen: pick one from the list or type its name into dataset_override")
    head, _, rest = name.replace("\\", "/").partition("/")
    roots = [head] if head in DATASET_ROOTS and rest else list(DATASET_ROOTS)
    relative = rest if head in DATASET_ROOTS and rest else name
    for root_name in roots:
        path = resolve_inside(folder_paths.get_directory_by_type(root_name), relative)
        if path.exists():
            return path
    raise FileNotFoundError(f"no dataset {name!r} in ComfyUI's {' or '.join(roots)} folder")


def dataset_stamp(path: Path) -> tuple:
    """Changes whenever a writer adds rows (shards, pair folders, manifest), so ComfyUI reloads then."""
    candidates = [path, *(path / name for name in MANIFEST_NAMES), path / SEEDS_NAME, path / "data"]
    if path.is_dir():  # a folder of pairs: its instructions file may be edited in place
        candidates += sorted(p for p in islice(path.iterdir(), _PARQUET_SCAN_LIMIT)
                             if p.suffix.lower() in (".csv", ".jsonl"))
    return tuple(file_stamp(p) for p in candidates)


def open_dataset(path: Path, fmt: str, column_mapping: str) -> tuple[RowSource, dict[str, str] | None]:
    """The dataset as a lazy row source (nothing is decoded, parquet is opened from its footers) and the parsed
    column mapping (None when the text is empty)."""
    mapping = parse_mapping(column_mapping) if (column_mapping or "").strip() else None
    return open_rows(path, None if fmt == "auto" else fmt, mapping), mapping


def load_dataset_rows(path: Path, fmt: str, max_rows: int,
                      column_mapping: str = "") -> tuple[dict, Sequence[EditRow]]:
    """The dataset handle ({path, format, mapping}) and its rows, lazily: the first `max_rows` (all when 0) as a
    view that reads a row (its parquet row group, its pair folder) only when a node asks for it."""
    source, mapping = open_dataset(path, fmt, column_mapping)
    handle = {"path": str(path), "format": source.format, "mapping": mapping}
    return handle, (source.head(max_rows) if max_rows else source)


# LoadEditDataset's previews: at most this many pixels per output batch (16 MP = 192 MB as float32), and per
# image; a dataset of huge photos gets smaller previews instead of an out-of-memory kill.
PREVIEW_BATCH_PIXELS = 16_000_000
PREVIEW_IMAGE_PIXELS = 4_000_000


def load_preview(sources: Sequence, count: int) -> torch.Tensor:
    """The first `count` images as one IMAGE batch, each shrunk to the preview budget right after decoding.

    Every image's size is checked before it is decoded (records.open_image refuses one over the dataset pixel
    budget), and images are decoded one at a time, so memory stays near one image plus the bounded batch.
    """
    chosen = [s for s in list(sources)[:count] if s is not None]
    if not chosen:
        return torch.zeros(0, 64, 64, 3)
    budget = min(PREVIEW_IMAGE_PIXELS, PREVIEW_BATCH_PIXELS // len(chosen))
    images = []
    for source in chosen:
        mm.throw_exception_if_processing_interrupted()
        images.append(_preview_image(source, budget))
    return preview_batch(images, len(images))


def _preview_image(source, budget: int) -> Image.Image:
    image = open_image(source)
    width, height = image.size
    scale = math.sqrt(budget / (width * height))
    if scale < 1.0:
        image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.LANCZOS)
    return image.convert("RGB")


def preview_batch(sources: Sequence, limit: int) -> torch.Tensor:
    """The first `limit` images as one IMAGE batch, at the first image's size; empty when none."""
    images = [open_image(s).convert("RGB") for s in list(sources)[:limit] if s is not None]
    if not images:
        return torch.zeros(0, 64, 64, 3)
    size = images[0].size
    same = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
    return torch.stack([image_to_tensor(im) for im in same])

