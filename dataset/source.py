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

import bisect
import csv
import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .format_parquet import parquet_files, read_parquet_schema
from .format_reference import FORMAT as REFERENCE
from .format_reference import SEEDS_NAME, ReferencePair, is_reference_dataset, reference_index, reference_scores
from .format_reference import score_of as reference_score_of
from .layouts import (
    DIFFUSERS,
    HQ_EDIT,
    IMAGE,
    LAYOUTS,
    MAGICBRUSH,
    MAPPED,
    MASK_TRANSPARENT,
    PAIRS,
    PUBLIC,
    ULTRAEDIT,
    Column,
    Layout,
    check_mapping,
    describe_layouts,
    layout_of_columns,
    mapped_layout,
)
from .paths import (
    MAX_TEXT_FILE_BYTES,
    check_dataset_file,
    dataset_path,
    file_stamp,
    open_dataset_file,
    read_dataset_bytes,
)
from .records import SCORE_FIELDS, EditRow, ImageSource, check_pixels, open_header, open_image
from .writer import MANIFEST_NAMES, read_manifest

WRITE_FORMATS = (REFERENCE, DIFFUSERS, PUBLIC)
READ_FORMATS = (REFERENCE, DIFFUSERS, PUBLIC, MAGICBRUSH, HQ_EDIT, ULTRAEDIT, PAIRS, MAPPED)
PAIR_SUFFIXES = ("png", "jpg", "jpeg", "webp")
PAIR_PARTS = ("input", "edited", "mask")
_INDEX_SUFFIXES = (".csv", ".jsonl")
# Row groups kept decoded (as Arrow tables, images still encoded): a sequential reader needs one, a reader
# that interleaves two shards two. Hub row groups of image data hold about 100 rows.
ROW_GROUP_CACHE = 2
_EXPECTED = (
    "expected a folder with seeds.json and NNNNNNN/ pair folders (reference layout), a folder of "
    "<name>_input.png / <name>_edited.png pairs with one .csv or .jsonl of instructions (pairs), or parquet "
    "files with columns input_image, edit_prompt, edited_image (diffusers), original_prompt, original_image, "
    "edit_prompt, edited_prompt, edited_image (public clip-filtered), or the columns of MagicBrush, HQ-Edit or "
    "UltraEdit; any other parquet reads with a column mapping"
)
_MAPPING_HINT = (
    "give a column mapping such as 'input_image=<column>, edited_image=<column>, instruction=<column>' "
    "(optionally mask=, input_caption=, output_caption=)"
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
        return RowSource(_ReferenceBackend(path))
    if fmt == PAIRS:
        return RowSource(_PairsBackend(path))
    if fmt == MAPPED:
        if checked is None:
            raise ValueError(f"the format {MAPPED!r} needs a column mapping; {_MAPPING_HINT}")
        return RowSource(_ParquetBackend(path, mapped_layout(checked)))
    if fmt in LAYOUTS:
        return RowSource(_ParquetBackend(path, LAYOUTS[fmt]))
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(READ_FORMATS)}")


def detect_format(path: str | os.PathLike, mapping: object = None) -> str:
    """The format of a dataset folder or file (one of READ_FORMATS); "mapped" whenever a mapping is given."""
    path = dataset_root_path(path)
    if mapping is not None:
        return MAPPED
    if path.is_file():
        if path.suffix.lower() in _INDEX_SUFFIXES:
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
    if _is_pairs_folder(path):
        return PAIRS
    files = parquet_files(path)
    if not files:
        raise ValueError(f"{path} holds no dataset this pack can read; {_EXPECTED}")
    return _parquet_layout(path, files)


def _parquet_layout(path: Path, files: list[Path]) -> str:
    names = read_parquet_schema(files[0], _root_of(path)).names
    layout = layout_of_columns(set(names))
    if layout is None:
        raise ValueError(f"{_shown_file(files[0], path)} has the columns {', '.join(names)}, which match no known "
                         f"layout ({describe_layouts()}); {_MAPPING_HINT}")
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


def _root_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _shown_file(file: Path, path: Path) -> str:
    root = _root_of(path)
    return file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name


# -------------------------------------------------------------------------------------------------------------
# The sequence
# -------------------------------------------------------------------------------------------------------------


class RowSource(Sequence[EditRow]):
    """A dataset's rows, read on demand: len(), [i] (an EditRow), [a:b] (a list), iteration, head(n) (a lazy
    view), scores(name) (one score per row, no image read), fingerprint() (changes when the files do).

    Safe to share between threads and to pickle (DataLoader workers): the row-group cache is per process and
    is not pickled.
    """

    def __init__(self, backend: _Backend, start: int = 0, stop: int | None = None) -> None:
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
    root = _root_of(path).resolve()
    for field in ("input_image", "edited_image", "mask"):
        value = getattr(row, field)
        if isinstance(value, str | os.PathLike) and not Path(value).resolve().is_relative_to(root):
            raise ValueError(
                f"a row of the dataset {path} names the image file {os.fspath(value)!r}, which is outside the "
                f"dataset folder {root}; put the images inside that folder (or embed them in the parquet "
                "file) and refer to them by relative paths"
            )
    return row


class _Backend:
    format: str
    path: Path
    columns: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, index: int) -> EditRow:
        raise NotImplementedError

    def scores(self, name: str, start: int, stop: int) -> list[float | None]:
        raise NotImplementedError

    def blocks(self) -> list[tuple[int, int]]:
        return [(0, len(self))]

    def mask_count(self) -> int | None:
        return None

    def stamps(self) -> list[str]:
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError


class _LRU:
    """A tiny thread-safe LRU; dropped when pickled (each process fills its own)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: reading a row group must not stall other threads' hits
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"_size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_size"])


# -------------------------------------------------------------------------------------------------------------
# Parquet (every known layout and "mapped")
# -------------------------------------------------------------------------------------------------------------


class _ParquetBackend(_Backend):
    def __init__(self, path: Path, layout: Layout) -> None:
        self.format = layout.name
        self.path = path
        self.layout = layout
        self.root = _root_of(path)
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
        self._cache = _LRU(ROW_GROUP_CACHE)

    def _shown(self, file: Path) -> str:
        return _shown_file(file, self.path)

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
                hint = f"choose the format that matches (or auto), or {_MAPPING_HINT}"
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


# -------------------------------------------------------------------------------------------------------------
# The reference layout
# -------------------------------------------------------------------------------------------------------------


class _ReferenceBackend(_Backend):
    format = REFERENCE
    columns = ("input_caption", "instruction", "output_caption", "input_image", "edited_image", "mask",
               *SCORE_FIELDS)

    def __init__(self, folder: Path) -> None:
        self.path = folder
        index = reference_index(folder)
        self._names = [name for name, _ in index]
        # Seeds as one int64 array: 8 bytes a row, not a Python int and list slot each.
        self._seeds = np.fromiter((seed for _, seeds in index for seed in seeds), dtype=np.int64)
        self._starts = np.cumsum([0, *(len(seeds) for _, seeds in index)]).astype(np.int64)
        self._pairs = _LRU(4)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _pair_of(self, index: int) -> int:
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def row(self, index: int) -> EditRow:
        number = self._pair_of(index)
        name = self._names[number]
        pair = self._pairs.get(name, lambda: ReferencePair.read(self.path, name))
        return pair.row(int(self._seeds[index]))

    def scores(self, name: str, start: int, stop: int) -> list[float | None]:
        out: list[float | None] = []
        number = self._pair_of(start) if start < stop else len(self._names)
        while number < len(self._names) and int(self._starts[number]) < stop:
            records = reference_scores(self.path, self._names[number])
            first, last = max(start, int(self._starts[number])), min(stop, int(self._starts[number + 1]))
            out.extend(reference_score_of(records.get(int(seed), {}), name) for seed in self._seeds[first:last])
            number += 1
        return out

    def blocks(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in zip(self._starts[:-1], self._starts[1:], strict=True)]

    def stamps(self) -> list[str]:
        # Our writers put every file in place by rename, which changes the pair folder's mtime; seeds.json and
        # the manifest change with every commit.
        stamps = [f"rows={len(self)}"]
        for name in (SEEDS_NAME, *MANIFEST_NAMES, *self._names):
            stamp = file_stamp(self.path / name)
            stamps.append(f"{name}|{stamp}")
        return stamps

    def size_bytes(self) -> int:
        return _tree_bytes(self.path)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            total += _tree_bytes(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_size
    return total


# -------------------------------------------------------------------------------------------------------------
# A plain folder of pairs
# -------------------------------------------------------------------------------------------------------------


def _is_pairs_folder(folder: Path) -> bool:
    names = [entry.name for entry in os.scandir(folder)]
    has_index = any(name.lower().endswith(_INDEX_SUFFIXES) and not name.startswith(".") for name in names)
    return has_index and any(_split_pair_name(name) is not None for name in names)


def _split_pair_name(file_name: str) -> tuple[str, str, str] | None:
    """(name, part, suffix) of `<name>_<part>.<suffix>`, or None."""
    stem, dot, suffix = file_name.rpartition(".")
    if not dot or suffix.lower() not in PAIR_SUFFIXES:
        return None
    name, underscore, part = stem.rpartition("_")
    if not underscore or part not in PAIR_PARTS or not name:
        return None
    return name, part, suffix


class _PairsBackend(_Backend):
    format = PAIRS

    def __init__(self, path: Path) -> None:
        folder = path if path.is_dir() else path.parent
        self.path = folder
        index = path if path.is_file() else _index_file(folder)
        self.index = index
        records, self.columns = _read_index(index, folder)
        files: dict[str, dict[str, str]] = {}
        for entry in os.scandir(folder):
            split = _split_pair_name(entry.name)
            if split is not None:
                files.setdefault(split[0], {}).setdefault(split[1], entry.name)
        # One small tuple per row: (input file, edited file, mask file or "", instruction, captions).
        self._rows: list[tuple[str, str, str, str, str, str]] = []
        for number, record in enumerate(records):
            name = record["name"]
            found = files.get(name, {})
            for part in ("input", "edited"):
                if part not in found:
                    raise FileNotFoundError(
                        f"{index.name} row {number + 1} names the pair {name!r}, but {name}_{part}.png (or .jpg, "
                        f".jpeg, .webp) is missing from {folder}")
            self._rows.append((found["input"], found["edited"], found.get("mask", ""), record["instruction"],
                               record["input_caption"], record["output_caption"]))

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, index: int) -> EditRow:
        input_file, edited_file, mask_file, instruction, input_caption, output_caption = self._rows[index]
        images = [self._image(name) for name in (input_file, edited_file)]
        return EditRow(input_caption, instruction, output_caption, images[0], images[1],
                       mask=self._image(mask_file) if mask_file else None)

    def _image(self, name: str) -> Path:
        path = dataset_path(self.path / name, self.path)
        check_dataset_file(path)  # a FIFO or a link out is refused now, not when some node opens it
        return path

    def mask_count(self) -> int | None:
        return sum(1 for row in self._rows if row[2])

    def scores(self, name: str, start: int, stop: int) -> list[float | None]:
        del name  # a folder of pairs carries no scores
        return [None] * max(0, stop - start)

    def stamps(self) -> list[str]:
        names = [self.index.name] + [name for row in self._rows for name in row[:3] if name]
        return [f"rows={len(self)}", *(f"{name}|{file_stamp(self.path / name)}" for name in names)]

    def size_bytes(self) -> int:
        names = [self.index.name] + [name for row in self._rows for name in row[:3] if name]
        return sum((file_stamp(self.path / name) or (0, 0))[1] for name in names)


def _index_file(folder: Path) -> Path:
    found = sorted(entry.name for entry in os.scandir(folder)
                   if entry.name.lower().endswith(_INDEX_SUFFIXES) and not entry.name.startswith("."))
    if len(found) != 1:
        listed = ", ".join(found) or "none"
        raise ValueError(f"a folder of pairs holds exactly one .csv or .jsonl of instructions; {folder} holds "
                         f"{listed}")
    return folder / found[0]


def _read_index(index: Path, folder: Path) -> tuple[list[dict[str, str]], tuple[str, ...]]:
    """The CSV/JSONL records (name, instruction, captions as strings) and the columns/keys found."""
    data = read_dataset_bytes(index, folder, MAX_TEXT_FILE_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{index.name} is not UTF-8 text ({error})") from None
    if index.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = tuple(reader.fieldnames or ())
        raw = [(number + 2, record) for number, record in enumerate(reader)]
    else:
        raw, keys = [], {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise ValueError(f"{index.name} line {number} is not a JSON object")
            raw.append((number, value))
            keys.update(dict.fromkeys(value))
        columns = tuple(keys)
    missing = [key for key in ("name", "instruction") if key not in columns]
    if raw and missing:
        raise ValueError(f"{index.name} lacks {', '.join(missing)}; it has {', '.join(map(str, columns)) or 'none'}; "
                         "a folder of pairs needs name and instruction (input_caption, output_caption optional)")
    return [_pair_record(index.name, number, record) for number, record in raw], columns


def _pair_record(index_name: str, line: int, record: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("name", "instruction", "input_caption", "output_caption"):
        value = record.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"{index_name} line {line}: {key} must be text, got {type(value).__name__}")
        out[key] = value
    name = out["name"]
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\x00") or name != name.strip():
        raise ValueError(f"{index_name} line {line}: {name!r} is not a plain pair name (files are <name>_input.png "
                         "beside the index)")
    return out
