"""The paper's reference layout (timothybrooks/instruct-pix2pix), read and written.

    seeds.json                 [["0000000", [seed, ...]], ...]   the index the reference EditDataset reads
    0000000/prompt.json        {"caption"/"input": ..., "edit": ..., "output": ...}
    0000000/<seed>_0.jpg       input image (always written: the reference EditDataset opens exactly this name)
    0000000/<seed>_1.jpg       edited image
    0000000/<seed>_0.png       with image_format "png" only: the lossless copy beside the jpg, which our
    0000000/<seed>_1.png       reader prefers (the reference code never looks at it)
    0000000/<seed>_mask.png    optional mask (our addition; the reference ignores it)
    0000000/metadata.jsonl     one line per seed: seed, p2p_threshold, cfg_scale, clip_sim_*

A row is committed when its metadata.jsonl line is on disk (its images are written before it). seeds.json is
rewritten atomically every few seconds and on close; while our manifest says the writer did not close
cleanly, readers also take the committed metadata lines that seeds.json does not list yet.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import (
    append_line,
    atomic_write_bytes,
    atomic_write_json,
    check_dataset_file,
    cut_torn_tail,
    dataset_path,
    read_dataset_json,
    read_jsonl,
    remove_temps,
)
from .records import IMAGE_FORMATS, EditRow, encode_image
from .writer import DatasetWriter, Key, read_manifest

FORMAT = "reference"
SEEDS_NAME = "seeds.json"
PROMPT_NAME = "prompt.json"
METADATA_NAME = "metadata.jsonl"

_PAIR_DIR = re.compile(r"^\d{7}$")
_SAMPLE_FILE = re.compile(r"^(\d+)_(0|1|mask)\.[A-Za-z]+$")
# Lossless first: a dataset saved with image_format "png" holds each image twice (see ReferenceWriter).
_IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
# Row field -> metadata.jsonl keys, the reference generator's name first.
_METADATA_KEYS = {
    "p": ("p2p_threshold", "p"),
    "cfg": ("cfg_scale", "cfg"),
    "clip_sim_0": ("clip_sim_0",),
    "clip_sim_1": ("clip_sim_1",),
    "clip_sim_dir": ("clip_sim_dir",),
    "clip_sim_image": ("clip_sim_image",),
}


def is_reference_dataset(folder: Path) -> bool:
    # lexists: a seeds.json that is a FIFO or a link out is this format's file, refused when read, not ignored
    return os.path.lexists(folder / SEEDS_NAME) or any(
        os.path.lexists(folder / name / PROMPT_NAME) for name in _pair_dir_names(folder)
    )


def iter_reference_rows(folder: Path) -> Iterator[EditRow]:
    """Rows in seeds.json order; images come back as paths (nothing is decoded until asked)."""
    for name, seeds in reference_index(folder):
        pair = ReferencePair.read(folder, name)
        for seed in seeds:
            yield pair.row(seed)


@dataclass
class ReferencePair:
    """What one pair folder holds apart from its images: its prompt, metadata lines and file names. Reading
    it costs two small files and a listing; rows of the folder are then made without touching the disk."""

    folder: Path
    pair_dir: Path
    prompt: dict[str, Any]
    metadata: dict[int, dict[str, Any]]
    files: dict[str, bool]

    @classmethod
    def read(cls, folder: Path, name: str) -> ReferencePair:
        pair_dir = _pair_dir(folder, name)
        prompt = _read_prompt(pair_dir)
        if prompt is None:
            raise FileNotFoundError(f"{pair_dir / PROMPT_NAME} is missing; {SEEDS_NAME} lists {name!r}")
        return cls(folder, pair_dir, prompt, _metadata_by_seed(pair_dir), _regular_files(pair_dir))

    def row(self, seed: int) -> EditRow:
        return _row(self.folder, self.pair_dir, self.prompt, seed, self.metadata.get(seed, {}), self.files)


def reference_scores(folder: Path, name: str) -> dict[int, dict[str, Any]]:
    """The metadata.jsonl records of one pair folder by seed (no prompt, no images read)."""
    return _metadata_by_seed(_pair_dir(folder, name))


def score_of(record: dict[str, Any], field: str) -> float | None:
    """A score field ("clip_sim_dir", "p", ...) of one metadata.jsonl record, under any of its names."""
    return _first_number(record, _METADATA_KEYS[field])


def reference_index(folder: Path) -> list[tuple[str, list[int]]]:
    """[(pair dir name, [seed, ...]), ...] of the rows the dataset holds."""
    listed = _read_seeds_json(folder)
    if listed is not None and not _needs_scan(folder):
        return listed
    merged = {name: list(seeds) for name, seeds in listed or []}
    for name in sorted(set(merged) | set(_pair_dir_names(folder))):
        seeds = merged.setdefault(name, [])
        seen = set(seeds)
        for seed in _committed_seeds(_pair_dir(folder, name)):
            if seed not in seen:
                seeds.append(seed)
                seen.add(seed)
    return [(name, seeds) for name, seeds in sorted(merged.items()) if seeds]


def _pair_dir(folder: Path, name: str) -> Path:
    """`folder/name`, refused before anything in it is read when a symlink takes it out of the dataset."""
    pair_dir = folder / name
    if not pair_dir.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"the pair folder {pair_dir} of the dataset {folder} leads outside it (a symlink?); "
                         "datasets must hold their files, not links to other places")
    return pair_dir


def _needs_scan(folder: Path) -> bool:
    # Our writer was killed or is still running: seeds.json may lag behind metadata.jsonl.
    manifest = read_manifest(folder)
    return manifest is not None and not manifest.get("clean", False)


def _pair_dir_names(folder: Path) -> Iterator[str]:
    for entry in os.scandir(folder):
        if _PAIR_DIR.match(entry.name) and entry.is_dir():
            yield entry.name


def _read_seeds_json(folder: Path) -> list[tuple[str, list[int]]] | None:
    path = folder / SEEDS_NAME
    if not os.path.lexists(path):
        return None
    value = read_dataset_json(path, folder)
    if not isinstance(value, list):
        raise ValueError(f"{path} must be a list of [folder name, [seed, ...]]")
    index = []
    for entry in value:
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], list)):
            raise ValueError(f"{path}: entry {entry!r} is not [folder name, [seed, ...]]")
        name = str(entry[0])
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            # A downloaded seeds.json must not make us read outside the dataset folder.
            raise ValueError(f"{path}: {name!r} is not a plain folder name")
        index.append((name, [int(seed) for seed in entry[1]]))
    return index


def _read_prompt(pair_dir: Path) -> dict[str, Any] | None:
    path = pair_dir / PROMPT_NAME
    if not os.path.lexists(path):
        return None
    value = read_dataset_json(path, pair_dir.parent)
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object with caption/input, edit and output")
    return value


def _prompt_captions(prompt: dict[str, Any]) -> tuple[str, str, str]:
    caption = prompt.get("caption", prompt.get("input", ""))
    return str(caption), str(prompt.get("edit", "")), str(prompt.get("output", ""))


def _metadata_by_seed(pair_dir: Path) -> dict[int, dict[str, Any]]:
    by_seed = {}
    for record in read_jsonl(pair_dir / METADATA_NAME, pair_dir.parent):
        try:
            by_seed[int(record["seed"])] = record
        except (KeyError, TypeError, ValueError):
            continue
    return by_seed


def _committed_seeds(pair_dir: Path) -> list[int]:
    """Seeds with a metadata line and both images: what a killed writer finished in this folder."""
    if not pair_dir.is_dir():
        return []
    files = _regular_files(pair_dir)
    return [
        seed for seed in _metadata_by_seed(pair_dir) if _find_image(files, seed, "0") and _find_image(files, seed, "1")
    ]


def _regular_files(pair_dir: Path) -> dict[str, bool]:
    """Names in `pair_dir` -> whether each may be read as a file (a regular file, or a symlink that
    paths.open_dataset_file judges when opened). Listing costs no extra system call per file (d_type)."""
    with os.scandir(pair_dir) as entries:
        return {e.name: e.is_symlink() or e.is_file(follow_symlinks=False) for e in entries}


def _find_image(files: dict[str, bool], seed: int, part: str) -> str | None:
    for suffix in _IMAGE_SUFFIXES:
        name = f"{seed}_{part}.{suffix}"
        if name in files:
            return name
    return None


def _row(
    folder: Path, pair_dir: Path, prompt: dict[str, Any], seed: int, meta: dict[str, Any], files: dict[str, bool]
) -> EditRow:
    images = []
    for part in ("0", "1"):
        found = _find_image(files, seed, part)
        if found is None:
            raise FileNotFoundError(f"{pair_dir}: seed {seed} is listed but {seed}_{part}.jpg is missing")
        images.append(_image_path(folder, pair_dir, found, files))
    mask = _find_image(files, seed, "mask")
    caption, edit, output = _prompt_captions(prompt)
    scores = {field: _first_number(meta, keys) for field, keys in _METADATA_KEYS.items()}
    return EditRow(
        input_caption=caption,
        instruction=edit,
        output_caption=output,
        input_image=images[0],
        edited_image=images[1],
        mask=_image_path(folder, pair_dir, mask, files) if mask else None,
        seed=None if meta.get("seedless") else seed,
        group=str(prompt.get("group") or pair_dir.name),
        **scores,
    )


def _image_path(folder: Path, pair_dir: Path, name: str, files: dict[str, bool]) -> Path:
    """The image as a path held to the dataset folder. A FIFO, device or socket is refused now, while listing,
    not when some later node opens it (the listing already knows; nothing is opened)."""
    path = dataset_path(pair_dir / name, folder)
    if not files[name]:
        check_dataset_file(path)
    return path


def _first_number(meta: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if meta.get(key) is not None:
            return float(meta[key])
    return None


class ReferenceWriter(DatasetWriter):
    """Writes the reference layout; `image_format` "jpg" (the reference's, quality 100) or "png" (lossless).

    With "png" every image is written twice: `<seed>_0.jpg` as the reference code needs it (its EditDataset
    opens exactly `{seed}_0.jpg`/`{seed}_1.jpg`, its prepare_dataset.py lists `*_0.jpg`), and `<seed>_0.png`
    beside it, which this pack's reader prefers. Why not refuse png for this layout: png is the node's default,
    and a refusal would come only after the whole (expensive) pair generation ran; why not png only: the
    reference code then finds no image at all. The price is disk space, for the user who asked for lossless.

    Rows of one group share a pair folder, so they must share input caption, instruction and output caption.
    Seedless rows are filed under their content id (see records.sample_id) and read back seedless.
    """

    format = FORMAT

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        *,
        image_format: str = "jpg",
        index_interval_s: float = 5.0,
    ) -> None:
        suffix = image_format.lower().lstrip(".")
        if suffix not in ("jpg", "jpeg", "png"):
            raise ValueError(f"reference image_format must be 'jpg' or 'png', got {image_format!r}")
        self._suffix = "png" if suffix == "png" else "jpg"
        self._index_interval_s = index_interval_s
        self._dirs: dict[str, str] = {}
        self._group_by_dir: dict[str, str] = {}
        self._ours: set[str] = set()
        self._captions: dict[str, tuple[str, str, str]] = {}
        self._seeds: dict[str, list[int]] = {}
        self._next_index = 0
        self._index_written_at = 0.0
        super().__init__(root, name)

    def _accepts_foreign_folder(self) -> bool:
        # Extending a reference dataset made elsewhere (e.g. the paper's) is fine.
        return super()._accepts_foreign_folder() or is_reference_dataset(self.path)

    def _recover(self) -> None:
        scanned = _read_seeds_json(self.path) is None or _needs_scan(self.path)
        remove_temps(self.path)
        index = reference_index(self.path)
        names = sorted(set(_pair_dir_names(self.path)) | {name for name, _ in index})
        for name in names:
            self._adopt_pair_dir(name)
        numbered = [int(name) for name in names if _PAIR_DIR.match(name)]
        self._next_index = max(numbered, default=-1) + 1
        for name, seeds in index:
            self._seeds[name] = list(seeds)
            self._keys.update((self._group_by_dir.get(name, name), seed) for seed in seeds)
            self._committed += len(seeds)
        if scanned:
            # Only in folders our writer made: elsewhere unlisted images may have been left out on purpose.
            for name in self._ours:
                _remove_orphans(self.path / name, set(self._seeds.get(name, [])))
        self._write_index()

    def _adopt_pair_dir(self, name: str) -> None:
        pair_dir = self.path / name
        if not pair_dir.is_dir():
            return
        remove_temps(pair_dir)
        # No cut of an unterminated last line here: it may be another tool's complete record. append_line puts
        # the next record on a line of its own, and readers skip a torn line.
        prompt = _read_prompt(pair_dir)
        if prompt is None:
            # Killed between creating the folder and writing prompt.json (images come after it).
            if not any(pair_dir.iterdir()):
                pair_dir.rmdir()
            return
        group = str(prompt.get("group") or name)
        if "group" in prompt:
            self._ours.add(name)
        self._dirs.setdefault(group, name)
        self._group_by_dir[name] = group
        self._captions[name] = _prompt_captions(prompt)

    def _pair_dir_for(self, row: EditRow) -> str:
        captions = (row.input_caption, row.instruction, row.output_caption)
        name = self._dirs.get(row.group)
        if name is not None:
            if self._captions.get(name) != captions:
                raise ValueError(
                    f"group {row.group!r} (folder {name}) holds captions {self._captions.get(name)!r}, "
                    f"not {captions!r}; rows of one group must share their captions (or leave group empty)"
                )
            return name
        name = f"{self._next_index:07d}"
        self._next_index += 1
        pair_dir = self.path / name
        pair_dir.mkdir(exist_ok=True)
        prompt = {"caption": captions[0], "input": captions[0], "edit": captions[1], "output": captions[2]}
        prompt["group"] = row.group
        try:
            atomic_write_json(pair_dir / PROMPT_NAME, prompt)
        except BaseException:
            # A full disk: leave no temporary and no empty pair folder behind.
            remove_temps(pair_dir)
            if not any(pair_dir.iterdir()):
                pair_dir.rmdir()
            raise
        self._dirs[row.group] = name
        self._group_by_dir[name] = row.group
        self._ours.add(name)
        self._captions[name] = captions
        return name

    def _add(self, row: EditRow, key: Key) -> None:
        name = self._pair_dir_for(row)
        pair_dir = self.path / name
        seed = key[1]
        try:
            for suffix in dict.fromkeys(("jpg", self._suffix)):  # jpg always, for the reference code
                fmt = IMAGE_FORMATS[suffix]
                atomic_write_bytes(pair_dir / f"{seed}_0.{suffix}", encode_image(row.input_image, fmt))
                atomic_write_bytes(pair_dir / f"{seed}_1.{suffix}", encode_image(row.edited_image, fmt))
            if row.mask is not None:
                atomic_write_bytes(pair_dir / f"{seed}_mask.png", encode_image(row.mask, "PNG"))
            # The commit point: once this line is whole on disk the row exists.
            append_line(pair_dir / METADATA_NAME, json.dumps(_metadata_record(row, seed)))
        except BaseException:
            _undo_row(pair_dir, seed)
            raise
        self._seeds.setdefault(name, []).append(seed)
        self._committed += 1
        if time.monotonic() - self._index_written_at >= self._index_interval_s:
            self._write_index()

    def flush(self) -> None:
        self._write_index()

    def _write_index(self) -> None:
        index = [[name, seeds] for name, seeds in sorted(self._seeds.items()) if seeds]
        atomic_write_json(self.path / SEEDS_NAME, index)
        self._index_written_at = time.monotonic()


def _metadata_record(row: EditRow, seed: int) -> dict[str, Any]:
    record: dict[str, Any] = {"seed": seed}
    for field, keys in _METADATA_KEYS.items():
        value = getattr(row, field)
        if value is not None:
            record[keys[0]] = value
    if row.seed is None:
        record["seedless"] = True
    return record


def _undo_row(pair_dir: Path, seed: int) -> None:
    """After a failed write (full disk): no temporary, image or torn metadata line of the row stays behind."""
    remove_temps(pair_dir)
    cut_torn_tail(pair_dir / METADATA_NAME)
    committed = set(_metadata_by_seed(pair_dir))
    if seed not in committed:
        for path in pair_dir.glob(f"{seed}_*"):
            if _SAMPLE_FILE.match(path.name):
                path.unlink(missing_ok=True)


def _remove_orphans(pair_dir: Path, committed: set[int]) -> None:
    """Delete sample images whose metadata line never made it (the writer died between the two)."""
    for path in pair_dir.iterdir():
        match = _SAMPLE_FILE.match(path.name)
        if match and int(match.group(1)) not in committed:
            path.unlink(missing_ok=True)
