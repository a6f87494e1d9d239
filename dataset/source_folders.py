"""Rows of the folder layouts: the paper's reference layout and a plain folder of pairs with a CSV/JSONL."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .format_reference import FORMAT as REFERENCE
from .format_reference import SEEDS_NAME, ReferencePair, reference_index, reference_scores
from .format_reference import score_of as reference_score_of
from .layouts import PAIRS
from .paths import (
    MAX_TEXT_FILE_BYTES,
    check_dataset_file,
    dataset_path,
    file_stamp,
    json_lines,
    read_dataset_bytes,
)
from .records import SCORE_FIELDS, EditRow
from .row_backend import LRU, Backend
from .writer import MANIFEST_NAMES

PAIR_SUFFIXES = ("png", "jpg", "jpeg", "webp")
PAIR_PARTS = ("input", "edited", "mask")
INDEX_SUFFIXES = (".csv", ".jsonl")


# -------------------------------------------------------------------------------------------------------------
# The reference layout
# -------------------------------------------------------------------------------------------------------------


class ReferenceBackend(Backend):
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
        self._pairs = LRU(4)

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


def is_pairs_folder(folder: Path) -> bool:
    return looks_like_pairs(entry.name for entry in os.scandir(folder))


def looks_like_pairs(names: Iterable[str]) -> bool:
    """Whether these file names make a folder of pairs: an instructions .csv/.jsonl and `<name>_<part>.<image>`."""
    names = list(names)
    has_index = any(name.lower().endswith(INDEX_SUFFIXES) and not name.startswith(".") for name in names)
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


class PairsBackend(Backend):
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
                   if entry.name.lower().endswith(INDEX_SUFFIXES) and not entry.name.startswith("."))
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
        for number, value in json_lines(text):
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
