"""Writers survive crashes: a killed writer leaves a loadable dataset, and a resumed one finishes it.

The crash tests run the writer in a real child process and SIGKILL it, so nothing of Python's shutdown
(finally blocks, __exit__, buffered files) gets a chance to tidy up.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from comfyui_ip2p.dataset import formats
from comfyui_ip2p.dataset.records import EditRow, open_image, row_key
from comfyui_ip2p.testing.edit_rows import write_rows
from PIL import Image

TOTAL = 12


def make_row(i: int) -> EditRow:
    """Row i of the crash tests; the child processes build the very same rows from this function."""
    g = i // 3
    rng = np.random.default_rng(i)
    return EditRow(
        input_caption=f"a street {g}",
        instruction=f"make street {g} rainy",
        output_caption=f"a rainy street {g}",
        input_image=Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
        edited_image=Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
        seed=500 + i,
        p=0.1 + i / 20,
        cfg=7.5 + i / 2,
        clip_sim_dir=0.2 + i / 100,
    )


# Parquet flushes every 2 rows so a kill can also catch a half-full buffer and a shard mid-write.
OPTIONS = {"reference": {"image_format": "png"}, "diffusers": {"rows_per_shard": 2}, "public": {"rows_per_shard": 2}}

CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    from comfyui_ip2p.dataset import formats

    spec = importlib.util.spec_from_file_location("crash_rows", sys.argv[1])
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    root, name, fmt, total, delay = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
    with formats.open_writer(root, name, fmt, **rows.OPTIONS[fmt]) as writer:
        print(json.dumps({"resumed": len(writer)}), flush=True)
        for i in range(total):
            added = writer.add(rows.make_row(i))
            print(json.dumps({"i": i, "added": added, "committed": len(writer)}), flush=True)
            time.sleep(delay)
    """
)


def writer_command(root: Path, fmt: str, delay: float) -> list[str]:
    return [sys.executable, "-c", CHILD, __file__, str(root), "ds", fmt, str(TOTAL), str(delay)]


def start_writer(root: Path, fmt: str, delay: float) -> subprocess.Popen:
    command = writer_command(root, fmt, delay)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_rows_match(rows: list[EditRow]) -> None:
    keys = [row_key(row) for row in rows]
    assert len(keys) == len(set(keys)), "a row is present more than once"
    expected = {row_key(make_row(i)): make_row(i) for i in range(TOTAL)}
    for row in rows:
        want = expected[row_key(row)]
        assert (row.input_caption, row.instruction, row.seed) == (want.input_caption, want.instruction, want.seed)
        assert row.p == pytest.approx(want.p)
        for name in ("input_image", "edited_image"):
            got, expected_image = open_image(getattr(row, name)), getattr(want, name)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected_image))


@pytest.mark.parametrize("fmt", ["reference", "diffusers", "public"])
def test_sigkill_mid_run_then_resume_gives_every_row_exactly_once(tmp_path, fmt):
    child = start_writer(tmp_path, fmt, delay=0.05)
    committed = 0
    try:
        for line in child.stdout:
            committed = json.loads(line).get("committed", committed)
            if committed >= 5:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()

    # The dead writer's dataset loads and holds at least every row it had reported as committed.
    after_kill = formats.load_rows(tmp_path / "ds")
    assert committed <= len(after_kill) < TOTAL
    assert_rows_match(after_kill)

    resumed = start_writer(tmp_path, fmt, delay=0)
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0] == {"resumed": len(after_kill)}
    assert sum(event.get("added", False) for event in events) == TOTAL - len(after_kill)

    final = formats.load_rows(tmp_path / "ds")
    assert len(final) == TOTAL
    assert_rows_match(final)


def test_killed_reference_writer_rows_show_up_in_seeds_json_after_resume(tmp_path):
    child = start_writer(tmp_path, "reference", delay=0.02)
    for line in child.stdout:
        if json.loads(line).get("committed", 0) >= 4:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    done = subprocess.run(writer_command(tmp_path, "reference", delay=0), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    # The paper's EditDataset only reads seeds.json: after a clean finish it must list every row.
    seeds = json.loads((tmp_path / "ds/seeds.json").read_text())
    listed = sorted(seed for _, group_seeds in seeds for seed in group_seeds)
    assert listed == [500 + i for i in range(TOTAL)]
    assert [name for name, _ in seeds] == ["0000000", "0000001", "0000002", "0000003"]


def crash_after(tmp_path: Path, fmt: str, rows: int) -> None:
    """A child that writes `rows` rows and dies without closing (os._exit skips every cleanup)."""
    code = CHILD.replace("time.sleep(delay)", "time.sleep(delay)\n        if i + 1 == total: os._exit(0)")
    code = "import os\n" + code
    args = [sys.executable, "-c", code, __file__, str(tmp_path), "ds", fmt, str(rows), "0"]
    subprocess.run(args, check=True, capture_output=True)


def test_reference_reader_and_writer_survive_a_torn_line_temps_and_orphans(tmp_path):
    crash_after(tmp_path, "reference", rows=4)
    pair = tmp_path / "ds/0000001"
    # What kills mid-row leave: images without their metadata line (the row never committed), a half
    # written temporary, and a torn metadata line.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pair / "777_0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pair / "777_1.png")
    (pair / ".504_1.png.tmp-999").write_bytes(b"half")
    with open(pair / "metadata.jsonl", "a") as handle:
        handle.write('{"seed": 504, "p2p_thr')

    rows = formats.load_rows(tmp_path / "ds")
    assert sorted(row.seed for row in rows) == [500, 501, 502, 503]
    assert_rows_match(rows)

    with formats.open_writer(tmp_path, "ds", "reference", **OPTIONS["reference"]) as writer:
        assert (make_row(3).group, 503) in writer.keys
        assert (make_row(4).group, 504) not in writer.keys
        assert [writer.add(make_row(i)) for i in range(6)] == [False] * 4 + [True] * 2
    # The torn tail is kept byte for byte (it could have been another tool's record) and the new records start
    # on lines of their own, so every other line parses and readers skip just that one.
    lines = (pair / "metadata.jsonl").read_text().splitlines()
    assert lines.count('{"seed": 504, "p2p_thr') == 1
    for line in lines:
        if line != '{"seed": 504, "p2p_thr':
            json.loads(line)
    assert not (pair / ".504_1.png.tmp-999").exists()
    assert not (pair / "777_0.png").exists()
    assert_rows_match(formats.load_rows(tmp_path / "ds"))
    assert len(formats.load_rows(tmp_path / "ds")) == 6


@pytest.mark.parametrize("fmt", ["diffusers", "public"])
def test_parquet_temp_shard_is_ignored_then_cleaned(tmp_path, fmt):
    crash_after(tmp_path, fmt, rows=5)  # 2 full shards; the 5th row was only buffered and is lost
    data = tmp_path / "ds/data"
    (data / ".train-00002.parquet.tmp-999").write_bytes(b"PAR1 half a shard")

    assert len(formats.load_rows(tmp_path / "ds")) == 4
    if fmt == "diffusers":
        import datasets
        loaded = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "hf"))["train"]
        assert len(loaded) == 4

    with formats.open_writer(tmp_path, "ds", fmt, **OPTIONS[fmt]) as writer:
        assert len(writer) == 4
        assert writer.extend(make_row(i) for i in range(7)) == 3
    assert not (data / ".train-00002.parquet.tmp-999").exists()
    final = formats.load_rows(tmp_path / "ds")
    assert len(final) == 7
    assert_rows_match(final)


@pytest.mark.parametrize("fmt", ["reference", "diffusers", "public"])
def test_rows_added_before_an_error_in_the_block_are_kept(tmp_path, fmt):
    with pytest.raises(RuntimeError, match="boom"), formats.open_writer(tmp_path, "ds", fmt, **OPTIONS[fmt]) as w:
        w.extend(make_row(i) for i in range(3))
        raise RuntimeError("boom")
    assert sorted(row.seed for row in formats.load_rows(tmp_path / "ds")) == [500, 501, 502]


@pytest.mark.parametrize("fmt", ["reference", "diffusers"])
def test_reopening_a_finished_dataset_adds_only_new_rows(tmp_path, fmt):
    assert write_rows([make_row(i) for i in range(3)], tmp_path, "ds", fmt) == 3
    assert write_rows([make_row(i) for i in range(5)], tmp_path, "ds", fmt) == 2
    manifest = json.loads((tmp_path / "ds/.ip2p_dataset.json").read_text())
    assert manifest["clean"] is True
    assert manifest["rows"] == 5
    assert len(formats.load_rows(tmp_path / "ds")) == 5
