"""Issue #12, the dataset file rows, attacked through a real ComfyUI server on 127.0.0.1: appending into a
reference dataset whose metadata.jsonl lacks its final newline, a parquet of decompression bombs, a FIFO in
place of an image or a shard, symlinks from inside a dataset to outside it. Plus datasets of 0, 1 and n rows
in every format through LoadEditDataset. The unit side of each (real files, no ComfyUI) is
tests/unit/test_dataset_trust_files.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset import formats
from comfyui_ip2p.dataset.format_parquet import arrow_schema
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.comfy_server import upload
from comfyui_ip2p.testing.edit_rows import BARN_PROMPT as PROMPT
from comfyui_ip2p.testing.edit_rows import foreign_reference_pair, jpeg_bytes, random_rows, write_rows
from PIL import Image

TAG = uuid.uuid4().hex[:8]
SECRET_TEXT = f"IP2P-TRUST-SENTINEL-{uuid.uuid4().hex}"
SECRET_RGB = (201, 13, 177)
TWO_RECORDS = (b'{"seed": 1, "p2p_threshold": 0.3, "cfg_scale": 8.0}\n'
               b'{"seed": 2, "p2p_threshold": 0.7, "cfg_scale": 9.5}')

pytestmark = pytest.mark.server


def load_graph(dataset: str, preview_count: int = 4) -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": dataset, "format": "auto", "max_rows": 0,
                                                              "preview_count": preview_count}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 3]}}}


def copy_graph(source: str, name: str, fmt: str = "diffusers") -> dict:
    """Load a dataset and save its rows as a new one: what would carry anything read from outside into output/."""
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": source, "format": "auto", "max_rows": 0,
                                                              "preview_count": 1}},
            "2": {"class_type": "SaveEditDataset", "inputs": {"rows": ["1", 1], "dataset_name": name,
                                                              "format": fmt, "image_format": "jpg"}}}


def outcome(server, prompt: dict, timeout: float = 120.0) -> tuple[str, float]:
    """('' or the node's error text, seconds until the prompt finished)."""
    started = time.monotonic()
    prompt_id = server.queue(prompt)
    while time.monotonic() - started < timeout:
        status = server.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {})
        if status.get("completed") is not None:
            errors = [data.get("exception_message", "") for event, data in status.get("messages", [])
                      if event == "execution_error"]
            text = "\n".join(errors) if status.get("status_str") != "success" else ""
            return text, time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s (blocked on a FIFO?)")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpg(seed: int, size: int = 24, color: tuple[int, int, int] | None = None) -> bytes:
    return jpeg_bytes(seed, size, color)


def reference_folder(folder: Path, seeds: tuple[int, ...], metadata: bytes) -> Path:
    return foreign_reference_pair(folder, seeds, metadata)


def peak_rss_reset(pid: int) -> bool:
    """Resets the kernel's peak-RSS counter of `pid` (VmHWM); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# --- 3 (first table): appending into a reference dataset without a final newline -------------------------------

def test_appending_to_a_reference_dataset_without_final_newline_damages_nothing(comfy_server, comfy_base):
    target = comfy_base / "output" / f"trust_foreign_{TAG}"
    pair = reference_folder(target, (1, 2), TWO_RECORDS)
    before = {path.name: digest(path) for path in pair.iterdir() if path.name != "metadata.jsonl"}
    # The new row comes from another dataset with the same captions: it is appended into the same pair folder.
    reference_folder(comfy_base / "input" / f"trust_more_{TAG}", (3,), b'{"seed": 3, "p2p_threshold": 0.5}\n')
    text, _ = outcome(comfy_server, copy_graph(f"input/trust_more_{TAG}", target.name, "reference"))
    assert text == "", text
    data = (pair / "metadata.jsonl").read_bytes()
    assert data.startswith(TWO_RECORDS + b"\n"), data  # every old byte kept; the missing newline added
    assert [json.loads(line)["seed"] for line in data.splitlines()] == [1, 2, 3]
    assert {name: digest(pair / name) for name in before} == before
    rows = {row.seed: row for row in formats.load_rows(target)}
    assert sorted(rows) == [1, 2, 3] and (rows[1].p, rows[2].p, rows[3].p) == (0.3, 0.7, 0.5)


# --- 4: decompression bombs ------------------------------------------------------------------------------------

def bomb_parquet_bytes() -> bytes:
    """A diffusers-column parquet of a few KB whose images claim 8192x8192 (1-bit zeros compress to nothing)."""
    buffer = io.BytesIO()
    Image.new("1", (8192, 8192)).save(buffer, format="PNG", optimize=True)
    cell = {"bytes": buffer.getvalue(), "path": None}
    schema = arrow_schema("diffusers")
    records = [{**{field.name: None for field in schema}, "input_image": cell, "edited_image": cell,
                "edit_prompt": f"bomb {i}"} for i in range(4)]
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out)
    return out.getvalue()


def test_a_parquet_of_decompression_bombs_is_refused_and_the_server_survives(comfy_server, comfy_base):
    data = bomb_parquet_bytes()
    assert len(data) < 200_000
    upload(comfy_server, data, "train.parquet", f"trust_bomb_{TAG}")
    pid = comfy_server.process.pid
    resettable = peak_rss_reset(pid)
    peak_before = peak_rss_mb(pid)
    text, _ = outcome(comfy_server, load_graph(f"input/trust_bomb_{TAG}"))  # preview_count 4, the default
    assert text.startswith("LoadEditDataset: "), text
    assert "input_image of row 0 of train.parquet" in text and "8192x8192" in text, text
    assert "64 megapixels" in text and "IP2P_MAX_IMAGE_PIXELS" in text, text
    # Nothing was decoded: one 8192x8192 RGB decode alone is 200 MB, the old previews were gigabytes.
    grown = peak_rss_mb(pid) - peak_before
    assert grown < (150 if resettable else 1000), f"peak RSS grew by {grown:.0f} MB"
    assert comfy_server.get("/system_stats")["system"]
    good = f"trust_good_{TAG}"
    write_rows(random_rows(groups=1, per_group=2, size=32), comfy_base / "input", good, "diffusers")
    assert outcome(comfy_server, load_graph(f"input/{good}"))[0] == ""


# --- 5: a FIFO in a dataset ------------------------------------------------------------------------------------

def interrupt(server) -> None:
    import urllib.request

    request = urllib.request.Request(server.url + "/interrupt", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def fifo_in_place_of(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_a_fifo_in_a_dataset_fails_fast_and_the_executor_stays_free(comfy_server, comfy_base):
    image_case = comfy_base / "input" / f"trust_fifo_image_{TAG}"
    write_rows(random_rows(groups=1, per_group=2, size=32), image_case.parent, image_case.name,
                       "reference", image_format="jpg")
    fifo_in_place_of(next((image_case / "0000000").glob("*_0.jpg")))
    shard_case = comfy_base / "input" / f"trust_fifo_shard_{TAG}"
    write_rows(random_rows(groups=1, per_group=2, size=32), shard_case.parent, shard_case.name, "diffusers")
    fifo_in_place_of(shard_case / "data/train-00000.parquet")
    try:
        for case in (image_case, shard_case):
            text, seconds = outcome(comfy_server, load_graph(f"input/{case.name}"), timeout=60)
            assert text.startswith("LoadEditDataset: ") and "is a FIFO, not a regular file" in text, text
            assert seconds < 15, f"took {seconds:.1f} s"
    finally:
        # the FIFOs would block any later test that reads every file under the shared base folder
        shutil.rmtree(image_case)
        shutil.rmtree(shard_case)
    interrupt(comfy_server)
    good = f"trust_after_fifo_{TAG}"
    write_rows(random_rows(groups=1, per_group=1, size=32), comfy_base / "input", good, "reference")
    text, seconds = outcome(comfy_server, load_graph(f"input/{good}"), timeout=60)
    assert text == "" and seconds < 30, text


# --- 6: symlinks from inside a dataset to outside it -----------------------------------------------------------

@pytest.fixture(scope="module")
def sentinel(comfy_base) -> Path:
    """Beside the base, never to be read: a secret prompt.json and a dataset of secret-coloured images."""
    folder = comfy_base.parent / f"trust_sentinel_{TAG}"
    folder.mkdir()
    (folder / "prompt.json").write_text(json.dumps({**PROMPT, "edit": SECRET_TEXT}))
    rows = [formats.EditRow(SECRET_TEXT, SECRET_TEXT, SECRET_TEXT, jpg(0, color=SECRET_RGB),
                            jpg(1, color=SECRET_RGB), seed=i) for i in range(2)]
    write_rows(rows, folder, "secret", "diffusers")
    return folder


def shows_secret(data: bytes) -> bool:
    try:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    except OSError:
        return False
    return bool((np.abs(pixels - SECRET_RGB).max(axis=-1) <= 6).mean() > 0.5)


def nothing_secret_under(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert SECRET_TEXT.encode() not in data and not shows_secret(data), f"{path} holds the sentinel"


def linked(folder: Path, relative: str, target: Path) -> None:
    (folder / relative).unlink()
    (folder / relative).symlink_to(target)


def test_links_out_of_a_dataset_are_refused_and_nothing_outside_is_copied(comfy_server, comfy_base, sentinel):
    inputs = comfy_base / "input"
    cases = {
        "prompt": ("reference", "0000000/prompt.json", sentinel / "prompt.json"),
        "prompt_missing": ("reference", "0000000/prompt.json", sentinel / "no_such_prompt.json"),
        "shard": ("diffusers", "data/train-00000.parquet", sentinel / "secret/data/train-00000.parquet"),
        "shard_missing": ("diffusers", "data/train-00000.parquet", sentinel / "secret/data/no_such.parquet"),
    }
    messages = {}
    for case, (fmt, relative, target) in cases.items():
        name = f"trust_link_{case}_{TAG}"
        write_rows(random_rows(groups=1, per_group=2, size=32), inputs, name, fmt, image_format="jpg")
        linked(inputs / name, relative, target)
        text, _ = outcome(comfy_server, copy_graph(f"input/{name}", f"trust_copy_{case}_{TAG}"))
        assert text.startswith("LoadEditDataset: ") and "outside the dataset folder" in text, text
        assert str(sentinel) not in text and SECRET_TEXT not in text, text
        assert not (comfy_base / "output" / f"trust_copy_{case}_{TAG}").exists()
        messages[case] = text.replace(name, "<name>")
    # The same words whether the outside file exists or not: a workflow learns nothing about outside paths.
    assert messages["prompt"] == messages["prompt_missing"]
    assert messages["shard"] == messages["shard_missing"]
    nothing_secret_under(comfy_base / "output")
    assert SECRET_TEXT not in json.dumps(comfy_server.get("/history"))
    assert SECRET_TEXT not in comfy_server.log_tail(10**7)


# --- datasets of 0, 1 and n rows in every format, through LoadEditDataset --------------------------------------

@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_load_edit_dataset_reads_exactly_the_rows_written(comfy_nodes, comfy_base, fmt):
    node = comfy_nodes["LoadEditDataset"]
    for count in (0, 1, 5):
        name = f"trust_rows_{fmt}_{count}_{TAG}"
        rows = random_rows(groups=1, per_group=count, size=32) if count else []
        write_rows(rows, comfy_base / "input", name, fmt, image_format="png")
        handle, loaded, inputs, edits = node.execute(dataset=f"input/{name}", format="auto", max_rows=0,
                                                     preview_count=4).args
        assert (handle["format"], len(loaded), inputs.shape[0], edits.shape[0]) == (fmt, count, *[min(count, 4)] * 2)
        if count:  # through the executor too (core's PreviewImage cannot show an empty batch)
            result = checked(run_prompt(load_graph(f"input/{name}")))
            assert len(result.outputs["2"]["images"]) == min(count, 4)
        else:  # the pack's own word on why `datasets` will refuse it
            saved = checked(run_prompt(copy_graph(f"input/{name}", f"trust_empty_copy_{fmt}_{TAG}", fmt)))
            assert "has no rows yet" in saved.outputs["2"]["text"][0]


def test_previews_of_large_images_stay_within_the_budget(comfy_nodes, comfy_base):
    from comfyui_ip2p.pipeline.datasets import PREVIEW_BATCH_PIXELS, PREVIEW_IMAGE_PIXELS

    big = [formats.EditRow("a", "b", "c", Image.new("RGB", (3000, 2400), (i * 40, 90, 30)),
                           Image.new("RGB", (3000, 2400), (30, i * 40, 90)), seed=i) for i in range(3)]
    name = f"trust_big_{TAG}"
    write_rows(big, comfy_base / "input", name, "diffusers")
    node = comfy_nodes["LoadEditDataset"]
    for count in (1, 3):
        _, rows, inputs, edits = node.execute(dataset=f"input/{name}", format="auto", max_rows=0,
                                              preview_count=count).args
        per_image = min(PREVIEW_IMAGE_PIXELS, PREVIEW_BATCH_PIXELS // count)
        for batch in (inputs, edits):
            assert batch.shape[0] == count and batch.shape[1] * batch.shape[2] <= per_image, batch.shape
            assert abs(batch.shape[2] / batch.shape[1] - 3000 / 2400) < 0.01  # shape kept
        assert rows[0].input_image.size == (3000, 2400)  # the rows keep the full images
