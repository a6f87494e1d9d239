"""Datasets as untrusted input, on real files: appending never damages an existing record, images are
size-checked before decoding, every file is read through one door (inside the dataset, a regular file, never
blocking), the reference layout is what the reference code reads, and `datasets` sees only data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.dataset import formats
from comfyui_ip2p.dataset.format_parquet import arrow_schema
from comfyui_ip2p.dataset.paths import (
    DatasetFileError,
    append_line,
    dataset_path,
    open_dataset_file,
    read_jsonl_counted,
)
from comfyui_ip2p.dataset.records import EditRow, ImageTooLargeError, open_image
from comfyui_ip2p.dataset.writer import MANIFEST_NAME, OLD_MANIFEST_NAME
from comfyui_ip2p.testing.edit_rows import BARN_PROMPT as PROMPT
from comfyui_ip2p.testing.edit_rows import foreign_reference_pair, jpeg_bytes, random_rows, write_rows
from PIL import Image


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpg(seed: int, size: int = 24) -> bytes:
    return jpeg_bytes(seed, size)


def foreign_reference(folder: Path, metadata: bytes, seeds: tuple[int, ...] = (1, 2)) -> Path:
    """A reference dataset written by another tool (the paper's generator): no manifest, no group key."""
    return foreign_reference_pair(folder, seeds, metadata)


def same_captions_row(seed: int) -> EditRow:
    """A row for the foreign pair folder 0000000 (its group is the folder name: prompt.json has no group)."""
    return EditRow(PROMPT["input"], PROMPT["edit"], PROMPT["output"], jpg(seed), jpg(seed + 50), seed=seed,
                   p=0.5, group="0000000")


# --- 1. appending never damages an existing record -------------------------------------------------------------

TWO_RECORDS = (b'{"seed": 1, "p2p_threshold": 0.3, "cfg_scale": 8.0}\n'
               b'{"seed": 2, "p2p_threshold": 0.7, "cfg_scale": 9.5}')


def test_append_after_a_record_without_final_newline_keeps_every_byte(tmp_path):
    pair = foreign_reference(tmp_path / "ds", TWO_RECORDS)
    images = {path.name: digest(path) for path in pair.glob("*.jpg")}
    with formats.open_writer(tmp_path, "ds", "reference", image_format="jpg") as writer:
        assert {("0000000", 1), ("0000000", 2)} <= writer.keys
        assert writer.extend([same_captions_row(3), *random_rows(groups=1, per_group=1)]) == 2
    data = (pair / "metadata.jsonl").read_bytes()
    assert data.startswith(TWO_RECORDS + b"\n"), data  # old bytes untouched, the missing newline added
    assert [json.loads(line)["seed"] for line in data.splitlines()] == [1, 2, 3]
    assert {name: digest(pair / name) for name in images} == images
    rows = {row.seed: row for row in formats.load_rows(tmp_path / "ds")}
    assert sorted(rows) == [0, 1, 2, 3]
    assert (rows[1].p, rows[2].p, rows[2].cfg, rows[3].p) == (0.3, 0.7, 9.5, 0.5)


def test_a_partial_last_line_is_kept_and_skipped_with_a_count(tmp_path):
    partial = b'{"seed": 1, "p2p_threshold": 0.3}\n{"seed": 2, "p2p_thr'
    pair = foreign_reference(tmp_path / "ds", partial)
    write_rows([same_captions_row(3)], tmp_path, "ds", "reference", image_format="jpg")
    data = (pair / "metadata.jsonl").read_bytes()
    assert data.startswith(partial + b"\n")
    records, skipped = read_jsonl_counted(pair / "metadata.jsonl")
    assert [r["seed"] for r in records] == [1, 3] and skipped == 1
    # seeds.json still lists seed 2 (its images are there): it stays a row, without scores
    assert sorted(row.seed for row in formats.load_rows(tmp_path / "ds")) == [1, 2, 3]


def test_a_foreign_metadata_file_is_not_damaged(tmp_path):
    garbage = b"\x00\xffnot json at all\r\nstill not json"
    pair = foreign_reference(tmp_path / "ds", garbage)
    write_rows([same_captions_row(3)], tmp_path, "ds", "reference", image_format="jpg")
    data = (pair / "metadata.jsonl").read_bytes()
    assert data.startswith(garbage + b"\n") and json.loads(data[len(garbage) + 1:])["seed"] == 3
    assert sorted(row.seed for row in formats.load_rows(tmp_path / "ds")) == [1, 2, 3]


def test_append_line_adds_a_missing_newline_only_once(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}')
    append_line(path, '{"a": 2}')
    append_line(path, '{"a": 3}')
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'


# --- 2. decompression bombs ------------------------------------------------------------------------------------

def bomb_png(side: int = 8192) -> bytes:
    """A PNG claiming side x side pixels in a few KB (1-bit zeros compress to almost nothing)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def bomb_parquet(folder: Path, layout: str = "diffusers") -> Path:
    """A small diffusers-column parquet whose first row's images are bombs, as a remote user would upload it."""
    small = jpg(0)
    bomb = bomb_png()
    schema = arrow_schema(layout)
    columns = {"input_image": "original_image"} if layout == "public" else {}
    record = {field.name: None for field in schema}
    record.update({columns.get("input_image", "input_image"): {"bytes": bomb, "path": None},
                   "edited_image": {"bytes": small, "path": None}, "edit_prompt": "make it snow"})
    path = folder / "data/train-00000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([record], schema=schema), path)
    return path


def test_a_parquet_of_bomb_images_is_refused_before_decoding(tmp_path):
    shard = bomb_parquet(tmp_path / "ds")
    assert shard.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError) as caught:
        formats.load_rows(tmp_path / "ds")
    text = str(caught.value)
    assert "input_image of row 0 of data/train-00000.parquet" in text, text
    assert "8192x8192" in text and "64 megapixels" in text and "IP2P_MAX_IMAGE_PIXELS" in text, text


def test_a_bomb_jpg_in_the_reference_layout_is_refused_naming_the_file(tmp_path):
    write_rows(random_rows(groups=1, per_group=1), tmp_path, "ds", "reference", image_format="jpg")
    target = next((tmp_path / "ds").glob("*/*_1.jpg"))
    Image.new("L", (9000, 8000)).save(target, format="JPEG")
    row = formats.load_rows(tmp_path / "ds")[0]
    with pytest.raises(ImageTooLargeError, match=r"0000000/\d+_1\.jpg.*9000x8000"):
        open_image(row.edited_image)


def test_the_pixel_budget_is_configurable_and_also_guards_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("IP2P_MAX_IMAGE_PIXELS", "100")
    rows = random_rows(groups=1, per_group=1, size=16)
    with pytest.raises(ImageTooLargeError, match="16x16"):
        open_image(rows[0].input_image)
    monkeypatch.delenv("IP2P_MAX_IMAGE_PIXELS")
    # Encoded bytes are copied into a dataset undecoded: they are still checked, so no bomb is passed on.
    bomb = EditRow("a", "b", "c", bomb_png(), jpg(1), seed=1)
    for fmt in formats.FORMATS:
        with pytest.raises(ImageTooLargeError):
            write_rows([bomb], tmp_path, f"copy_{fmt}", fmt, image_format="jpg")


# --- 3. one door: inside the dataset, regular files, never blocking --------------------------------------------

def finishes(action: Callable[[], object], seconds: float = 10.0) -> BaseException | None:
    """Runs `action` in a daemon thread; the exception it raised, failing the test if it blocks."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for {time.monotonic() - started:.0f} s (a FIFO opened blocking?)"
    return outcome[0]


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("what", ["image", "prompt.json", "seeds.json", "metadata.jsonl"])
def test_a_fifo_in_a_reference_dataset_fails_fast(tmp_path, what):
    write_rows(random_rows(groups=1, per_group=2), tmp_path, "ds", "reference", image_format="jpg")
    pair = tmp_path / "ds/0000000"
    target = {"image": next(pair.glob("*_0.jpg")), "prompt.json": pair / "prompt.json",
              "seeds.json": tmp_path / "ds/seeds.json", "metadata.jsonl": pair / "metadata.jsonl"}[what]
    fifo(target)
    error = finishes(lambda: [open_image(r.input_image) for r in formats.load_rows(tmp_path / "ds")])
    assert isinstance(error, DatasetFileError), error
    assert "FIFO" in str(error) and "not a regular file" in str(error)


@pytest.mark.parametrize("fmt", ["diffusers", "public"])
def test_a_fifo_shard_fails_fast(tmp_path, fmt):
    write_rows(random_rows(groups=1, per_group=2), tmp_path, "ds", fmt)
    fifo(tmp_path / "ds/data/train-00000.parquet")
    for action in (lambda: formats.load_rows(tmp_path / "ds"), lambda: write_rows([], tmp_path, "ds", fmt)):
        error = finishes(action)
        assert isinstance(error, DatasetFileError) and "FIFO" in str(error), error


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A folder beside the datasets that nothing may read: a secret prompt, a secret parquet."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "prompt.json").write_text(json.dumps({**PROMPT, "edit": "SECRET-OUTSIDE"}))
    write_rows(random_rows(groups=1, per_group=1, seed=9), folder, "secret", "diffusers")
    return folder


def swap_for_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def test_links_out_of_a_dataset_are_refused_without_telling_whether_the_target_exists(tmp_path, outside):
    messages = []
    for target in (outside / "prompt.json", outside / "no_such_file.json"):
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        write_rows(random_rows(groups=1, per_group=1), tmp_path, "ds", "reference", image_format="jpg")
        swap_for_link(tmp_path / "ds/0000000/prompt.json", target)
        with pytest.raises(DatasetFileError) as caught:
            formats.load_rows(tmp_path / "ds")
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "0000000/prompt.json" in messages[0] and "outside the dataset folder" in messages[0]
    assert str(outside) not in messages[0] and "SECRET" not in messages[0]


@pytest.mark.parametrize("fmt", ["diffusers", "public"])
def test_a_shard_linked_out_of_the_dataset_is_refused(tmp_path, outside, fmt):
    write_rows(random_rows(groups=1, per_group=1), tmp_path, "ds", fmt)
    swap_for_link(tmp_path / "ds/data/train-00000.parquet", outside / "secret/data/train-00000.parquet")
    with pytest.raises(DatasetFileError, match=r"train-00000\.parquet.*outside the dataset folder"):
        formats.load_rows(tmp_path / "ds", fmt)


def test_an_image_swapped_for_a_link_after_listing_is_refused_when_opened(tmp_path, outside):
    write_rows(random_rows(groups=1, per_group=1), tmp_path, "ds", "reference", image_format="jpg")
    row = formats.load_rows(tmp_path / "ds")[0]
    assert row.input_image.dataset_root == tmp_path / "ds"
    assert pickle.loads(pickle.dumps(row)).input_image.dataset_root == tmp_path / "ds"  # DataLoader workers
    Image.new("RGB", (8, 8)).save(outside / "secret.jpg")
    swap_for_link(Path(row.input_image), outside / "secret.jpg")
    with pytest.raises(DatasetFileError, match="outside the dataset folder"):
        open_image(row.input_image)


def test_links_that_stay_inside_the_dataset_are_read(tmp_path):
    write_rows(random_rows(groups=1, per_group=2), tmp_path, "ds", "reference", image_format="jpg")
    first, second = sorted((tmp_path / "ds/0000000").glob("*_1.jpg"))
    swap_for_link(second, first)  # a deduplicating copy tool does this
    images = [np.asarray(open_image(r.edited_image)) for r in formats.load_rows(tmp_path / "ds")]
    assert np.array_equal(images[0], images[1])


def test_the_door_refuses_devices_and_folders(tmp_path):
    with pytest.raises(DatasetFileError, match="device"):
        open_dataset_file("/dev/zero")
    with pytest.raises(DatasetFileError, match="folder"):
        open_dataset_file(tmp_path, tmp_path.parent)
    inside = dataset_path(tmp_path / "x.bin", tmp_path)
    inside.write_bytes(b"ok")
    with open_dataset_file(inside) as handle:
        assert handle.read() == b"ok"


# --- 4. the reference layout, as the reference code reads it ---------------------------------------------------
# Rules written down from timothybrooks/instruct-pix2pix (read, never imported or fetched by this test):
# - edit_dataset.py, EditDataset.__init__: `json.load(open(Path(path, "seeds.json")))` is a list of
#   [dir_name, [seed, ...]]; __getitem__: `name, seeds = self.seeds[i]`, `propt_dir = Path(path, name)`,
#   `json.load(open(propt_dir / "prompt.json"))["edit"]`, `Image.open(propt_dir / f"{seed}_0.jpg")` and
#   `f"{seed}_1.jpg"`, then `np.array(image)` as "h w c" (3 channels).
# - edit_dataset.py, EditDatasetEval.__getitem__: prompt.json keys "edit", "input", "output".
# - dataset_creation/prepare_dataset.py: for every dir in the dataset folder,
#   `[p.name.split("_")[0] for p in sorted(prompt_dir.glob("*_0.jpg"))]`; dirs with seeds are listed, sorted.
REFERENCE_INDEX = "seeds.json"
REFERENCE_PROMPT = "prompt.json"
REFERENCE_PROMPT_KEYS = ("edit", "input", "output")
REFERENCE_IMAGE_NAMES = ("{seed}_0.jpg", "{seed}_1.jpg")
PREPARE_GLOB = "*_0.jpg"


def reference_edit_dataset(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every item the reference EditDataset/EditDatasetEval would return, by their path logic."""
    items = []
    for name, seeds in json.loads((folder / REFERENCE_INDEX).read_text()):
        prompt_dir = Path(folder, name)
        prompt = json.loads((prompt_dir / REFERENCE_PROMPT).read_text())
        assert all(isinstance(prompt[key], str) for key in REFERENCE_PROMPT_KEYS)
        for seed in seeds:
            pair = [Image.open(prompt_dir / pattern.format(seed=seed)) for pattern in REFERENCE_IMAGE_NAMES]
            assert all(image.format == "JPEG" for image in pair)
            arrays = [np.array(image) for image in pair]
            assert all(array.ndim == 3 and array.shape[2] == 3 for array in arrays)
            items.append((prompt["edit"], *arrays))
    return items


def reference_prepare_dataset(folder: Path) -> list[tuple[str, list[str]]]:
    seeds = []
    for prompt_dir in folder.iterdir():
        if prompt_dir.is_dir():
            found = [path.name.split("_")[0] for path in sorted(prompt_dir.glob(PREPARE_GLOB))]
            if found:
                seeds.append((prompt_dir.name, found))
    return sorted(seeds)


@pytest.mark.parametrize("image_format", ["jpg", "jpeg", "png"])
def test_the_reference_layout_is_read_by_the_reference_code_for_every_image_option(tmp_path, image_format):
    rows = random_rows(groups=2, per_group=3, size=32)
    rows[0].mask = Image.new("L", (32, 32), 255)
    write_rows(rows, tmp_path, "ds", "reference", image_format=image_format)
    folder = tmp_path / "ds"
    items = reference_edit_dataset(folder)
    assert len(items) == len(rows) and {edit for edit, *_ in items} == {"make it winter"}
    index = json.loads((folder / REFERENCE_INDEX).read_text())
    prepared = reference_prepare_dataset(folder)
    assert [(name, sorted(map(int, seeds))) for name, seeds in prepared] == \
           [(name, sorted(seeds)) for name, seeds in index]
    # Our reader gets the lossless copy when there is one, pixel for pixel.
    ours = formats.load_rows(folder)
    for row, original in zip(sorted(ours, key=lambda r: r.seed), rows, strict=True):
        got = np.asarray(open_image(row.edited_image).convert("RGB"))
        want = np.asarray(original.edited_image)
        assert np.array_equal(got, want) if image_format == "png" else np.abs(got.astype(int) - want).mean() < 3


# --- 5. `datasets` sees only data ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["diffusers", "public"])
@pytest.mark.parametrize("count", [0, 1, 5])
def test_hf_datasets_loads_exactly_the_rows(tmp_path, fmt, count):
    datasets = pytest.importorskip("datasets")
    rows = random_rows(groups=1, per_group=count, size=16) if count else []
    write_rows(rows, tmp_path, "ds", fmt, rows_per_shard=2)
    folder = tmp_path / "ds"
    bookkeeping = [p.name for p in folder.iterdir() if p.is_file()]
    assert bookkeeping and all(name.startswith(".") for name in bookkeeping), bookkeeping
    assert len(formats.load_rows(folder)) == count
    if count == 0:
        # datasets (5.x) cannot hold a 0-row split in any form; it must say there is no data, never load the
        # pack's bookkeeping as a row (before: a 1-row table of the manifest).
        with pytest.raises((datasets.exceptions.DataFilesNotFoundError, FileNotFoundError), match="data files"):
            datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))
        return
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == count
    assert {"edit_prompt", "edited_image"} <= set(loaded.column_names)
    assert loaded[0]["edited_image"].size == (16, 16)


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_datasets_with_the_manifest_in_the_old_place_still_read_and_move_it(tmp_path, fmt):
    write_rows(random_rows(groups=1, per_group=2), tmp_path, "ds", fmt)
    folder = tmp_path / "ds"
    (folder / MANIFEST_NAME).rename(folder / OLD_MANIFEST_NAME)
    assert formats.detect_format(folder) == fmt and len(formats.load_rows(folder)) == 2
    assert write_rows(random_rows(groups=1, per_group=3), tmp_path, "ds", fmt) == 1
    assert (folder / MANIFEST_NAME).is_file() and not (folder / OLD_MANIFEST_NAME).exists()
    assert len(formats.load_rows(folder)) == 3
