"""Parquet datasets in the two writable column layouts, written; and the shard listing every parquet reader uses.

- "diffusers": `input_image, edit_prompt, edited_image`, what diffusers' train_instruct_pix2pix.py reads by
  default (its column defaults are exactly these names);
- "public": `original_prompt, original_image, edit_prompt, edited_prompt, edited_image`, the columns of the
  paper's published clip-filtered dataset.

Images are the `datasets` Image feature struct {bytes, path}; the schema carries the `huggingface` features
metadata so `datasets.load_dataset` decodes them to PIL images. Our metadata rides along in extra columns.

A written dataset is `data/train-00000.parquet, ...` plus the hidden manifest `.ip2p_dataset.json` (hidden so
that `datasets.load_dataset(folder)` reads only the shards). Each shard appears whole or not at all (written
under a hidden temporary name, then renamed); the shards on disk are the truth about which rows exist, the
manifest only records progress and the format. A dataset with no rows has no shard: `datasets` (5.x) cannot
load a 0-row split in any form (an empty shard fails with 'Instruction "train" corresponds to no data!'), and
"doesn't contain any data files" says what is wrong; the pack's readers load it as 0 rows.

Reading, of these and of every other parquet layout (dataset/layouts.py), is dataset/source.py's: every shard
is opened through paths.open_dataset_file (inside the dataset, a regular file, never blocking), and every image
cell's header is checked against the pixel budget before anything decodes it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .layouts import DIFFUSERS, DIFFUSERS_COLUMNS, PUBLIC, PUBLIC_COLUMNS, Column, layout_of_columns
from .paths import open_dataset_file, remove_temps, write_atomically
from .records import IMAGE_FORMATS, EditRow, ImageSource, encode_image, encoded_format, open_header, raw_bytes
from .writer import DatasetWriter, Key

DATA_DIR = "data"
_SHARD = re.compile(r"^train-(\d{5,})\.parquet$")
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_ARROW_TYPES = {"image": _IMAGE_TYPE, "string": pa.string(), "int": pa.int64(), "float": pa.float64()}
_HF_FEATURES = {
    "image": {"_type": "Image"},
    "string": {"dtype": "string", "_type": "Value"},
    "int": {"dtype": "int64", "_type": "Value"},
    "float": {"dtype": "float64", "_type": "Value"},
}

# The writable layouts (main columns first and in the published order, then ours: see dataset/layouts.py).
LAYOUTS: dict[str, tuple[Column, ...]] = {DIFFUSERS: DIFFUSERS_COLUMNS, PUBLIC: PUBLIC_COLUMNS}


def arrow_schema(layout: str) -> pa.Schema:
    columns = LAYOUTS[layout]
    features = {column.name: _HF_FEATURES[column.kind] for column in columns}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.kind]) for c in columns], metadata=metadata)


# Hub shard names: `<split>-00000-of-00004[-<hash>].parquet` (datasets' push_to_hub) or `<split>-00000.parquet`
# (ours). Splits held out for evaluation are never read as training rows when the folder has another split.
_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}(?:-of-\d{5})?(?:-[0-9a-fA-F]+)?\.parquet$")
HELD_OUT_SPLITS = frozenset({"test", "validation", "valid", "val", "dev", "eval", "evaluation"})
TRAIN_SPLIT = "train"


def parquet_files(path: Path) -> list[Path]:
    """The parquet files of a dataset, in name order: the file itself, or the visible *.parquet below the folder
    that belong to the split to read.

    Which split: a folder with `train-*` files (or a `train/` folder) reads those only; otherwise every split
    but the held-out ones (test, validation, dev, ...: UltraEdit's FreeForm_* or RegionBase files, say); a
    folder with one held-out split only reads it; several held-out splits and nothing else is refused (point
    at the split's files instead). Files whose names carry no split are read with the chosen split.
    """
    if path.is_file():
        return [path]
    files = []
    for file in sorted(path.rglob("*.parquet")):
        parts = file.relative_to(path).parts
        if not any(part.startswith((".", "_")) for part in parts):
            files.append(file)
    by_split: dict[str | None, list[Path]] = {}
    for file in files:
        by_split.setdefault(split_of(file.relative_to(path)), []).append(file)
    named = {split for split in by_split if split is not None}
    if TRAIN_SPLIT in named:
        chosen = {TRAIN_SPLIT}
    elif named - HELD_OUT_SPLITS:
        chosen = named - HELD_OUT_SPLITS
    elif len(named) > 1:
        raise ValueError(f"{path} holds only the held-out splits {', '.join(sorted(named))}; give the path of "
                         "the one split to read (its file, or the folder holding only it)")
    else:
        chosen = named
    return [file for file in files if split_of(file.relative_to(path)) in chosen | {None}]


def split_of(relative: Path) -> str | None:
    """The split a parquet file belongs to, by its name (`train-00000-of-00002.parquet`) or, failing that, by
    a folder named like a split (`train/0000.parquet`); None when neither tells."""
    match = _SPLIT_FILE.match(relative.name)
    if match:
        return match.group("split")
    for part in relative.parts[:-1]:
        if part == TRAIN_SPLIT or part in HELD_OUT_SPLITS:
            return part
    return None


def _root_of(path: Path) -> Path:
    """The folder a dataset's files must stay inside: the dataset folder, or a lone file's own folder."""
    return path if path.is_dir() else path.parent


def read_parquet_schema(file: Path, root: Path) -> pa.Schema:
    with open_dataset_file(file, root) as handle:
        return pq.read_schema(handle)


def detect_parquet_layout(path: Path) -> str | None:
    """The known layout of the first parquet file of `path` (None: no parquet file, or no known columns)."""
    files = parquet_files(path)
    if not files:
        return None
    return layout_of_columns(set(read_parquet_schema(files[0], _root_of(path)).names))


class ParquetWriter(DatasetWriter):
    """Writes shards of `rows_per_shard` rows; a shard is also cut when the buffered images pass
    `max_shard_bytes` or the oldest buffered row waited `flush_interval_s`, so a crash loses little work.

    Images given as files or encoded bytes are stored as they are; PIL images are encoded as `image_format`
    ("png", lossless, by default).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        *,
        layout: str = DIFFUSERS,
        rows_per_shard: int = 256,
        max_shard_bytes: int = 256 * 1024 * 1024,
        flush_interval_s: float = 60.0,
        image_format: str = "png",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"parquet layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if image_format.lower().lstrip(".") not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        self.format = layout
        self._schema = arrow_schema(layout)
        self._columns = LAYOUTS[layout]
        self._image_format = IMAGE_FORMATS[image_format.lower().lstrip(".")]
        self._rows_per_shard = rows_per_shard
        self._max_shard_bytes = max_shard_bytes
        self._flush_interval_s = flush_interval_s
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._buffer_since = 0.0
        self._shards: list[str] = []
        self._next_shard = 0
        super().__init__(root, name)

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    def _recover(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        remove_temps(self.data_dir)
        for shard in sorted(self.data_dir.iterdir()):
            match = _SHARD.match(shard.name)
            if not match:
                continue
            with open_dataset_file(shard, self.path) as handle:
                names = set(pq.read_schema(handle).names)
                if not {"group", "sample_id"} <= names or layout_of_columns(names) != self.format:
                    raise ValueError(f"{shard} is not a {self.format!r} shard written by this pack")
                keys = pq.read_table(handle, columns=["group", "sample_id"]).to_pydict()
            self._keys.update(zip(keys["group"], keys["sample_id"], strict=True))
            self._committed += len(keys["group"])
            self._shards.append(shard.name)
            self._next_shard = max(self._next_shard, int(match.group(1)) + 1)

    def _manifest_extra(self) -> dict[str, Any]:
        return {"shards": [f"{DATA_DIR}/{name}" for name in self._shards]}

    def _discard_temps(self) -> None:
        super()._discard_temps()
        remove_temps(self.data_dir)

    def _add(self, row: EditRow, key: Key) -> None:
        record = self._record(row, key)
        if not self._buffer:
            self._buffer_since = time.monotonic()
        self._buffer.append(record)
        self._buffer_bytes += _image_bytes_in(record, self._columns)
        if (
            len(self._buffer) >= self._rows_per_shard
            or self._buffer_bytes >= self._max_shard_bytes
            or time.monotonic() - self._buffer_since >= self._flush_interval_s
        ):
            self.flush()

    def _record(self, row: EditRow, key: Key) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for column in self._columns:
            if column.field == "sample_id":
                record[column.name] = key[1]
                continue
            value = getattr(row, column.field)
            if column.kind == "image":
                value = None if value is None else {"bytes": self._image_bytes(value), "path": None}
            record[column.name] = value
        return record

    def _image_bytes(self, source: ImageSource) -> bytes:
        raw = raw_bytes(source)
        # Any encoding PIL can read is fine for the Image feature, so files go in unchanged (size checked).
        if raw is not None and encoded_format(raw) is not None:
            open_header(raw)
            return raw
        return encode_image(source, self._image_format)

    def flush(self) -> None:
        """Write the buffered rows as the next shard (complete or absent, whatever happens)."""
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        name = f"train-{self._next_shard:05d}.parquet"
        final = self.data_dir / name
        # Small row groups keep a reader's memory low when images are large. A failed write (full disk) leaves
        # no half shard behind, and the rows stay buffered, uncommitted.
        write_atomically(final, lambda handle: pq.write_table(table, handle, row_group_size=64))
        self._committed += len(self._buffer)
        self._shards.append(name)
        self._next_shard += 1
        self._buffer = []
        self._buffer_bytes = 0
        self._write_manifest(clean=False)


def _image_bytes_in(record: dict[str, Any], columns: tuple[Column, ...]) -> int:
    cells = (record[column.name] for column in columns if column.kind == "image")
    return sum(len(cell["bytes"]) for cell in cells if cell is not None)
