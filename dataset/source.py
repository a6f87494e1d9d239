"""Every readable dataset as one lazy sequence of rows: `open_rows(path, format, mapping) -> RowSource`.

Opening reads only what says how many rows there are and where each lives: the parquet footers (row counts per
row group, schemas; never a data page), the reference layout's seeds.json, the pairs folder's CSV/JSONL and one
listing of its folder. `source[i]` then reads its own row: for parquet the needed columns of its row group (a
small LRU keeps the last few), for the reference layout its pair folder's prompt and metadata. Images stay
lazily opened PIL images (header read and checked against the pixel budget, pixels not decoded) or paths held
to the dataset folder, as the readers always gave them. So opening a 100 GB dataset costs what its footers and
index cost, and a row costs its row group.

Formats (dataset/layouts.py has the parquet table and where each mapping came from):
- "reference": the paper's seeds.json + NNNNNNN/{prompt.json, <seed>_0.jpg, <seed>_1.jpg, metadata.jsonl};
- "diffusers", "public", "magicbrush", "hq-edit", "ultraedit": parquet files (a file, or a folder of hub
  shards; see format_parquet.parquet_files for which split is read), recognised by their columns;
- "mapped": any parquet read through an explicit column mapping (layouts.parse_mapping);
- "pairs": a folder of `<name>_input.<ext>` / `<name>_edited.<ext>` [/ `<name>_mask.<ext>`] (png, jpg, jpeg,
  webp) and exactly one `.csv` or `.jsonl` with `name`, `instruction` [, `input_caption`, `output_caption`].

Every file is read through paths.open_dataset_file (inside the dataset, a regular file, never blocking); image
cells or files that lead outside the dataset folder are refused when their row is read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from .format_parquet import parquet_files, read_parquet_schema
from .format_reference import FORMAT as REFERENCE
from .format_reference import SEEDS_NAME, is_reference_dataset
from .layouts import (
    DIFFUSERS,
    HQ_EDIT,
    LAYOUTS,
    MAGICBRUSH,
    MAPPED,
    PAIRS,
    PUBLIC,
    ULTRAEDIT,
    check_mapping,
    describe_layouts,
    layout_of_columns,
    mapped_layout,
)
from .paths import check_dataset_file
from .records import SCORE_FIELDS, EditRow
from .row_backend import MAPPING_HINT, Backend, root_of, shown_file
from .source_folders import INDEX_SUFFIXES, PairsBackend, ReferenceBackend, is_pairs_folder
from .source_parquet import ParquetBackend
from .writer import read_manifest

WRITE_FORMATS = (REFERENCE, DIFFUSERS, PUBLIC)
READ_FORMATS = (REFERENCE, DIFFUSERS, PUBLIC, MAGICBRUSH, HQ_EDIT, ULTRAEDIT, PAIRS, MAPPED)
_EXPECTED = (
    "expected a folder with seeds.json and NNNNNNN/ pair folders (reference layout), a folder of "
    "<name>_input.png / <name>_edited.png pairs with one .csv or .jsonl of instructions (pairs), or parquet "
    "files with columns input_image, edit_prompt, edited_image (diffusers), original_prompt, original_image, "
    "edit_prompt, edited_prompt, edited_image (public clip-filtered), or the columns of MagicBrush, HQ-Edit or "
    "UltraEdit; any other parquet reads with a column mapping"
)


# -------------------------------------------------------------------------------------------------------------
# Opening
# -------------------------------------------------------------------------------------------------------------


def open_rows(path: str | os.PathLike, format: str | None = None, mapping: object = None) -> RowSource:
    """The rows of the dataset at `path` as a lazy sequence. `format` (one of READ_FORMATS) skips detection;
    `mapping` ({field: column} or None) reads any parquet by those columns (format "mapped"). None, "" and
    "auto" detect the format."""
    path = dataset_root_path(path)
    checked = None if mapping is None else check_mapping(mapping)
    fmt = detect_format(path, checked) if format in (None, "", "auto") else format
    if checked is not None and fmt != MAPPED:
        raise ValueError(f"a column mapping reads parquet files as format {MAPPED!r}, not {fmt!r}; choose the "
                         f"format {MAPPED!r} (or auto), or leave the mapping empty")
    if fmt == REFERENCE:
        return RowSource(ReferenceBackend(path))
    if fmt == PAIRS:
        return RowSource(PairsBackend(path))
    if fmt == MAPPED:
        if checked is None:
            raise ValueError(f"the format {MAPPED!r} needs a column mapping; {MAPPING_HINT}")
        return RowSource(ParquetBackend(path, mapped_layout(checked)))
    if fmt in LAYOUTS:
        return RowSource(ParquetBackend(path, LAYOUTS[fmt]))
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(READ_FORMATS)}")


def detect_format(path: str | os.PathLike, mapping: object = None) -> str:
    """The format of a dataset folder or file (one of READ_FORMATS); "mapped" whenever a mapping is given."""
    path = dataset_root_path(path)
    if mapping is not None:
        return MAPPED
    if path.is_file():
        if path.suffix.lower() in INDEX_SUFFIXES:
            return PAIRS
        if path.suffix != ".parquet":
            raise ValueError(f"{path} is not a dataset file; {_EXPECTED}")
        return _parquet_layout(path, [path])
    return _folder_format(path)


def _folder_format(path: Path) -> str:
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("format") in WRITE_FORMATS:
        return manifest["format"]
    if is_reference_dataset(path):
        return REFERENCE
    if is_pairs_folder(path):
        return PAIRS
    files = parquet_files(path)
    if not files:
        raise ValueError(f"{path} holds no dataset this pack can read; {_EXPECTED}")
    return _parquet_layout(path, files)


def _parquet_layout(path: Path, files: list[Path]) -> str:
    names = read_parquet_schema(files[0], root_of(path)).names
    layout = layout_of_columns(set(names))
    if layout is None:
        raise ValueError(f"{shown_file(files[0], path)} has the columns {', '.join(names)}, which match no known "
                         f"layout ({describe_layouts()}); {MAPPING_HINT}")
    return layout


def dataset_root_path(path: str | os.PathLike) -> Path:
    """The dataset's path as readers take it: it must exist, a file must be a regular file (a FIFO given as the
    dataset is refused, never opened), and a seeds.json stands for its folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if not path.is_dir():
        check_dataset_file(path)
    if path.is_file() and path.name == SEEDS_NAME:
        return path.parent
    return path


# -------------------------------------------------------------------------------------------------------------
# The sequence
# -------------------------------------------------------------------------------------------------------------


class RowSource(Sequence[EditRow]):
    """A dataset's rows, read on demand: len(), [i] (an EditRow), [a:b] (a list), iteration, head(n) (a lazy
    view), scores(name) (one score per row, no image read), fingerprint() (changes when the files do).

    Safe to share between threads and to pickle (DataLoader workers): the row-group cache is per process and
    is not pickled.
    """

    def __init__(self, backend: Backend, start: int = 0, stop: int | None = None) -> None:
        self._backend = backend
        self._start = start
        self._stop = len(backend) if stop is None else stop

    @property
    def format(self) -> str:
        return self._backend.format

    @property
    def path(self) -> Path:
        return self._backend.path

    @property
    def columns(self) -> tuple[str, ...]:
        """The column names found (parquet) or the fields the layout provides (folder layouts)."""
        return self._backend.columns

    @property
    def size_bytes(self) -> int:
        """Bytes the dataset's files take on disk (the whole dataset's, also for a head view)."""
        return self._backend.size_bytes()

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> EditRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[EditRow]: ...

    def __getitem__(self, index: int | slice) -> EditRow | list[EditRow]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        if not isinstance(index, int | np.integer):
            raise TypeError(f"row indices must be integers or slices, not {type(index).__name__}")
        position = int(index) + len(self) if index < 0 else int(index)
        if not 0 <= position < len(self):
            raise IndexError(f"row {index} of a dataset of {len(self)} rows")
        return self._row(position)

    def __iter__(self) -> Iterator[EditRow]:
        for i in range(len(self)):
            yield self._row(i)

    def _row(self, position: int) -> EditRow:
        return _confined(self._backend.row(self._start + position), self._backend.path)

    def head(self, n: int) -> RowSource:
        """The first `n` rows (all when n exceeds the count), as a lazy view."""
        return RowSource(self._backend, self._start, self._start + max(0, min(int(n), len(self))))

    def scores(self, name: str) -> list[float | None]:
        """One score ("clip_sim_dir", "p", ... : records.SCORE_FIELDS) per row, None where a row has none; reads
        no image (for parquet, only that column)."""
        if name not in SCORE_FIELDS:
            raise ValueError(f"unknown score {name!r}; the scores are {', '.join(SCORE_FIELDS)}")
        return self._backend.scores(name, self._start, self._stop)

    def mask_count(self) -> int | None:
        """How many rows of the whole dataset carry a mask, read from the index without decoding an image (parquet:
        the footers' null counts); None when the files do not say (a parquet file without null counts, the
        reference layout, whose masks are files found only by listing every pair folder)."""
        return self._backend.mask_count()

    def blocks(self) -> list[tuple[int, int]]:
        """[(start, stop), ...] ranges of rows stored together (a parquet row group, a reference pair folder):
        a shuffle that keeps to a few blocks at a time reads each block once."""
        spans = []
        for block_start, block_stop in self._backend.blocks():
            start, stop = max(block_start, self._start), min(block_stop, self._stop)
            if start < stop:
                spans.append((start - self._start, stop - self._start))
        return spans

    def fingerprint(self) -> str:
        """A digest of the path, the files' names, sizes and modification times, the format and the row count;
        reads no file content."""
        digest = hashlib.sha256()
        for part in (self.format, os.fspath(self.path.resolve()), f"{self._start}:{self._stop}",
                     *self._backend.stamps()):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"RowSource({self.format!r}, {os.fspath(self.path)!r}, rows={len(self)})"


def _confined(row: EditRow, path: Path) -> EditRow:
    """The row, refused when an image file it names lies outside the dataset's folder.

    Datasets are downloaded or uploaded files: a parquet image cell may hold a path instead of bytes
    ("/home/me/private.png", "../../x.png"), and a pair folder may hold a symlink. Following either would
    let a dataset make the nodes read, preview, copy or train on any image the process can open.
    """
    root = root_of(path).resolve()
    for field in ("input_image", "edited_image", "mask"):
        value = getattr(row, field)
        if isinstance(value, str | os.PathLike) and not Path(value).resolve().is_relative_to(root):
            raise ValueError(
                f"a row of the dataset {path} names the image file {os.fspath(value)!r}, which is outside the "
                f"dataset folder {root}; put the images inside that folder (or embed them in the parquet "
                "file) and refer to them by relative paths"
            )
    return row


