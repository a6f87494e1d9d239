"""Rows of parquet datasets, read a row group at a time: every known layout of dataset/layouts.py and "mapped"."""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .format_parquet import parquet_files
from .layouts import (
    IMAGE,
    MAPPED,
    MASK_TRANSPARENT,
    Column,
    Layout,
)
from .paths import (
    dataset_path,
    open_dataset_file,
)
from .records import EditRow, ImageSource, check_pixels, open_header, open_image
from .row_backend import LRU, MAPPING_HINT, Backend, root_of, shown_file

# Row groups kept decoded (as Arrow tables, images still encoded): a sequential reader needs one, a reader
# that interleaves two shards two. Hub row groups of image data hold about 100 rows.
ROW_GROUP_CACHE = 2

# -------------------------------------------------------------------------------------------------------------
# Parquet (every known layout and "mapped")
# -------------------------------------------------------------------------------------------------------------


class ParquetBackend(Backend):
    def __init__(self, path: Path, layout: Layout) -> None:
        self.format = layout.name
        self.path = path
        self.layout = layout
        self.root = root_of(path)
        self.files = parquet_files(path)
        self._plans: list[tuple[Column, ...]] = []
        # Row-group starts (global row index) with their (file, row group): O(row groups) small ints.
        self._starts: list[int] = []
        self._where: list[tuple[int, int, int]] = []  # (file, row group, row index in the file of its first row)
        self._stamps: list[str] = []
        self._sizes: list[int] = []
        columns: dict[str, None] = {}
        total = 0
        for number, file in enumerate(self.files):
            with open_dataset_file(file, self.root) as handle:
                info = os.fstat(handle.fileno())
                try:
                    parquet = pq.ParquetFile(handle)
                except (pa.ArrowInvalid, OSError) as error:
                    raise ValueError(f"{self._shown(file)} of the dataset {path} is not a readable parquet file "
                                     f"({error})") from None
                schema = parquet.schema_arrow
                metadata = parquet.metadata
            self._plans.append(self._plan(file, schema))
            columns.update(dict.fromkeys(schema.names))
            in_file = 0
            for group in range(metadata.num_row_groups):
                count = metadata.row_group(group).num_rows
                if count:
                    self._starts.append(total)
                    self._where.append((number, group, in_file))
                    total += count
                    in_file += count
            self._stamps.append(f"{self._shown(file)}|{info.st_size}|{info.st_mtime_ns}")
            self._sizes.append(info.st_size)
        self._total = total
        self.columns = tuple(columns)
        self._cache = LRU(ROW_GROUP_CACHE)

    def _shown(self, file: Path) -> str:
        return shown_file(file, self.path)

    def _plan(self, file: Path, schema: pa.Schema) -> tuple[Column, ...]:
        """The layout's columns this file has, after checking it has the identifying ones."""
        names = set(schema.names)
        missing = sorted(self.layout.required - names)
        if missing:
            if self.layout.name == MAPPED:
                what = f"the column mapping names the column(s) {', '.join(missing)}, which"
                hint = "correct the mapping"
            else:
                what = f"the {self.layout.name!r} layout needs the column(s) {', '.join(missing)}, which"
                hint = f"choose the format that matches (or auto), or {MAPPING_HINT}"
            raise ValueError(f"{what} {self._shown(file)} of the dataset {self.path} does not have; its columns "
                             f"are: {', '.join(schema.names)}; {hint}")
        plan = tuple(column for column in self.layout.columns if column.name in names)
        if self.layout.name == MAPPED:
            for column in plan:
                _check_column_type(column, schema.field(column.name).type, self._shown(file))
        return plan

    def __len__(self) -> int:
        return self._total

    def _locate(self, index: int) -> tuple[int, int, int, int]:
        """(file, row group, row in the group, row in the file) of row `index`."""
        slot = bisect.bisect_right(self._starts, index) - 1
        file_number, group, in_file = self._where[slot]
        offset = index - self._starts[slot]
        return file_number, group, offset, in_file + offset

    def _row_group(self, file_number: int, group: int) -> pa.Table:
        def read() -> pa.Table:
            # Only the columns the layout maps (a mapping may name one column for two fields).
            names = list(dict.fromkeys(column.name for column in self._plans[file_number]))
            with open_dataset_file(self.files[file_number], self.root) as handle:
                return pq.ParquetFile(handle).read_row_group(group, columns=names)

        return self._cache.get((file_number, group), read)

    def row(self, index: int) -> EditRow:
        file_number, group, offset, in_file = self._locate(index)
        record = self._row_group(file_number, group).slice(offset, 1).to_pylist()[0]
        file = self.files[file_number]
        where = f"row {in_file} of {self._shown(file)} in the dataset {self.path}"
        return _row_from_record(record, self._plans[file_number], self.layout, file.parent, self.root, where)

    def scores(self, name: str, start: int, stop: int) -> list[float | None]:
        column = next((c.name for c in self.layout.columns if c.field == name), None)
        out: list[float | None] = [None] * (stop - start)
        if column is None or start >= stop:
            return out
        first = bisect.bisect_right(self._starts, start) - 1
        done_files: set[int] = set()
        for slot in range(first, len(self._starts)):
            if self._starts[slot] >= stop:
                break
            file_number, _, in_file = self._where[slot]
            if file_number in done_files:
                continue
            done_files.add(file_number)
            if column not in {c.name for c in self._plans[file_number]}:
                continue
            with open_dataset_file(self.files[file_number], self.root) as handle:
                values = pq.read_table(handle, columns=[column]).column(0).to_pylist()
            file_start = self._starts[slot] - in_file
            for offset, value in enumerate(values):
                index = file_start + offset
                if start <= index < stop:
                    out[index - start] = None if value is None else float(value)
        return out

    def blocks(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, [*self._starts[1:], self._total], strict=True))

    def mask_count(self) -> int | None:
        column = next((c.name for c in self.layout.columns if c.field == "mask"), None)
        total = 0
        for number, file in enumerate(self.files):
            if column is None or column not in {c.name for c in self._plans[number]}:
                continue
            with open_dataset_file(file, self.root) as handle:
                parquet = pq.ParquetFile(handle)
                if pa.types.is_null(parquet.schema_arrow.field(column).type):
                    continue  # UltraEdit's free-form files: a column of type null holds no mask
                counts = [_set_cells(parquet.metadata.row_group(g), column)
                          for g in range(parquet.metadata.num_row_groups)]
            if None in counts:
                return None
            total += sum(counts)
        return total

    def stamps(self) -> list[str]:
        return [*self._stamps, f"rows={self._total}"]

    def size_bytes(self) -> int:
        return sum(self._sizes)


def _set_cells(group: pq.RowGroupMetaData, column: str) -> int | None:
    """Rows of a row group whose `column` is set, from its statistics. An image cell is a struct (bytes, path):
    a row has one unless every part is null, so the part with the fewest nulls counts."""
    nulls = []
    for index in range(group.num_columns):
        chunk = group.column(index)
        if chunk.path_in_schema == column or chunk.path_in_schema.startswith(f"{column}."):
            stats = chunk.statistics
            if stats is None or not stats.has_null_count:
                return None
            nulls.append(stats.null_count)
    return group.num_rows - min(nulls) if nulls else 0


# Arrow types a mapped column may have, by the field's kind.
def _check_column_type(column: Column, kind: pa.DataType, shown: str) -> None:
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    image_struct = pa.types.is_struct(kind) and {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)}
    ok = pa.types.is_null(kind) or (text or binary or bool(image_struct) if column.kind == IMAGE else text)
    if not ok:
        want = "an image (struct of bytes and path, binary, or a path string)" if column.kind == IMAGE else "text"
        raise ValueError(f"the column mapping reads {column.field} from the column {column.name!r} of {shown}, "
                         f"which holds {kind}, not {want}; correct the mapping")


def _row_from_record(record: dict[str, Any], columns: tuple[Column, ...], layout: Layout, base: Path, root: Path,
                     where: str) -> EditRow:
    values: dict[str, Any] = {}
    for column in columns:
        if column.field in ("sample_id", "key"):
            continue
        value = record[column.name]
        if column.kind == IMAGE:
            value = decode_cell(value, base, root, f"the {column.name} of {where}")
        elif column.field in ("input_caption", "instruction", "output_caption", "group") and value is not None:
            value = str(value)
        values[column.field] = value
    if layout.group_from:
        # e.g. MagicBrush: one edit per (img_id, turn_index); captions are absent, so they cannot key the row
        parts = [str(record.get(name)) for name in layout.group_from]
        values["group"] = f"{layout.name}:{':'.join(parts)}"
    if layout.mask == MASK_TRANSPARENT and values.get("mask") is not None:
        values["mask"] = transparent_to_white(values["mask"], values.get("input_image"), f"the mask of {where}")
    for text_field in ("input_caption", "instruction", "output_caption"):
        if values.get(text_field) is None:
            values[text_field] = ""
    return EditRow(**values)


def decode_cell(value: Any, base: Path, root: Path, what: str) -> Image.Image | Path | None:
    """An image cell (the Image feature's {bytes, path}, raw bytes, or a path string) as a lazily opened image
    (size checked, pixels not decoded) or a path held to the dataset; bytes win over the path, as in `datasets`."""
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, bytes):
        data, path = value, None
    else:
        data, path = None, str(value)
    if data is not None:
        return open_header(data, what)
    if path:
        return dataset_path(base / path, root)
    return None


def transparent_to_white(mask: ImageSource, source: ImageSource | None, what: str) -> Image.Image:
    """A MagicBrush mask (the source image as RGBA, edited region transparent) as our mask: "L", 255 where the
    edit happened, at the source image's size. Decodes the mask (not the source: its header gives the size).
    An image without alpha is taken as white = edit, as the dataset card words it."""
    image = open_image(mask, what)
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        edit = np.asarray(image.convert("RGBA"))[..., 3] < 128
    else:
        edit = np.asarray(image.convert("L")) > 127
    out = Image.fromarray(np.where(edit, 255, 0).astype(np.uint8), "L")
    size = _image_size(source)
    if size is not None and out.size != size:
        out = out.resize(size, Image.NEAREST)
    return out


def _image_size(source: ImageSource | None) -> tuple[int, int] | None:
    if source is None:
        return None
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, bytes | bytearray | memoryview):
        return open_header(bytes(source)).size
    with open_dataset_file(source) as handle, Image.open(handle) as image:
        return check_pixels(image).size


