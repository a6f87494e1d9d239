"""One internal row, many doors: find a dataset's format, read its rows, open a writer for any format.

Formats:
- "reference": the paper's seeds.json + NNNNNNN/{prompt.json, <seed>_0.jpg, <seed>_1.jpg, metadata.jsonl};
- "diffusers": parquet with input_image, edit_prompt, edited_image (diffusers' training script defaults);
- "public":    parquet with original_prompt, original_image, edit_prompt, edited_prompt, edited_image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .format_parquet import DIFFUSERS, PUBLIC, ParquetWriter, detect_parquet_layout, iter_parquet_rows
from .format_reference import FORMAT as REFERENCE
from .format_reference import SEEDS_NAME, ReferenceWriter, is_reference_dataset, iter_reference_rows
from .paths import check_dataset_file
from .records import EditRow, row_key
from .writer import DatasetWriter, read_manifest

FORMATS = (REFERENCE, DIFFUSERS, PUBLIC)
_EXPECTED = (
    "expected a folder with seeds.json and NNNNNNN/ pair folders (reference layout), or parquet files with "
    "columns input_image, edit_prompt, edited_image (diffusers) or original_prompt, original_image, "
    "edit_prompt, edited_prompt, edited_image (public clip-filtered)"
)

__all__ = [
    "DIFFUSERS",
    "FORMATS",
    "PUBLIC",
    "REFERENCE",
    "DatasetWriter",
    "EditRow",
    "detect_format",
    "iter_rows",
    "load_rows",
    "open_writer",
    "row_key",
]


def detect_format(path: str | os.PathLike) -> str:
    """The format ("reference", "diffusers", "public") of a dataset folder, parquet or seeds.json file."""
    path = _dataset_path(path)
    if path.is_file():
        layout = detect_parquet_layout(path) if path.suffix == ".parquet" else None
        if layout is None:
            raise ValueError(f"{path} is not a dataset file; {_EXPECTED}")
        return layout
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("format") in FORMATS:
        return manifest["format"]
    if is_reference_dataset(path):
        return REFERENCE
    layout = detect_parquet_layout(path)
    if layout is None:
        raise ValueError(f"{path} holds no dataset this pack can read; {_EXPECTED}")
    return layout


def iter_rows(path: str | os.PathLike, format: str | None = None) -> Iterator[EditRow]:
    """Rows one at a time, for datasets too big to hold in memory. `format` skips detection."""
    path = _dataset_path(path)
    fmt = format or detect_format(path)
    if fmt == REFERENCE:
        return _confined(iter_reference_rows(path), path)
    if fmt in (DIFFUSERS, PUBLIC):
        return _confined(iter_parquet_rows(path, fmt), path)
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")


def _confined(rows: Iterator[EditRow], path: Path) -> Iterator[EditRow]:
    """The rows, refusing image files outside the dataset's folder.

    Datasets are downloaded or uploaded files: a parquet image cell may hold a path instead of bytes
    ("/home/me/private.png", "../../x.png"), and a pair folder may hold a symlink. Following either would
    let a dataset make the nodes read, preview, copy or train on any image the process can open.
    """
    root = (path if path.is_dir() else path.parent).resolve()
    for row in rows:
        for field in ("input_image", "edited_image", "mask"):
            value = getattr(row, field)
            if isinstance(value, str | os.PathLike) and not Path(value).resolve().is_relative_to(root):
                raise ValueError(
                    f"a row of the dataset {path} names the image file {os.fspath(value)!r}, which is outside the "
                    f"dataset folder {root}; put the images inside that folder (or embed them in the parquet "
                    "file) and refer to them by relative paths"
                )
        yield row


def load_rows(path: str | os.PathLike, format: str | None = None) -> list[EditRow]:
    return list(iter_rows(path, format))


def open_writer(root: str | os.PathLike, name: str, format: str = REFERENCE, **options: Any) -> DatasetWriter:
    """A writer for dataset `name` inside folder `root`; an existing dataset there is resumed.

    Options: reference: image_format ("jpg"/"png"), index_interval_s. diffusers/public: rows_per_shard,
    max_shard_bytes, flush_interval_s, image_format.
    """
    if format == REFERENCE:
        return ReferenceWriter(root, name, **options)
    if format in (DIFFUSERS, PUBLIC):
        return ParquetWriter(root, name, layout=format, **options)
    raise ValueError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")


def _dataset_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if not path.is_dir():
        check_dataset_file(path)  # a FIFO or device given as the dataset file is refused, never opened
    if path.is_file() and path.name == SEEDS_NAME:
        return path.parent
    return path
