"""One internal row, many doors: find a dataset's format, read its rows, open a writer for any format.

Readable formats (READ_FORMATS; dataset/source.py reads them all, lazily, dataset/layouts.py has the table of
parquet layouts and where each came from):
- "reference": the paper's seeds.json + NNNNNNN/{prompt.json, <seed>_0.jpg, <seed>_1.jpg, metadata.jsonl};
- "diffusers": parquet with input_image, edit_prompt, edited_image (diffusers' training script defaults);
- "public":    parquet with original_prompt, original_image, edit_prompt, edited_prompt, edited_image;
- "magicbrush", "hq-edit", "ultraedit": the parquet columns of those datasets on the hub;
- "pairs":     a folder of <name>_input.png / <name>_edited.png [/ <name>_mask.png] plus one .csv or .jsonl;
- "mapped":    any parquet read through an explicit column mapping.
Writable formats (FORMATS): reference, diffusers, public.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .format_parquet import ParquetWriter
from .format_reference import ReferenceWriter
from .layouts import DIFFUSERS, HQ_EDIT, MAGICBRUSH, MAPPED, PAIRS, PUBLIC, ULTRAEDIT
from .records import EditRow, row_key
from .source import READ_FORMATS, REFERENCE, RowSource, detect_format, open_rows
from .writer import DatasetWriter

FORMATS = (REFERENCE, DIFFUSERS, PUBLIC)

__all__ = [
    "DIFFUSERS",
    "FORMATS",
    "HQ_EDIT",
    "MAGICBRUSH",
    "MAPPED",
    "PAIRS",
    "PUBLIC",
    "READ_FORMATS",
    "REFERENCE",
    "ULTRAEDIT",
    "DatasetWriter",
    "EditRow",
    "RowSource",
    "detect_format",
    "iter_rows",
    "load_rows",
    "open_rows",
    "open_writer",
    "row_key",
]


def iter_rows(path: str | os.PathLike, format: str | None = None, mapping: object = None) -> Iterator[EditRow]:
    """Rows one at a time (open_rows, iterated). `format` skips detection; `mapping` reads any parquet."""
    return iter(open_rows(path, format, mapping))


def load_rows(path: str | os.PathLike, format: str | None = None, mapping: object = None) -> list[EditRow]:
    return list(open_rows(path, format, mapping))


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
