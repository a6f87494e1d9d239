"""Dataset formats: every door reads back what every writer wrote, and names cannot escape their root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.dataset import formats
from comfyui_ip2p.dataset.paths import resolve_inside
from comfyui_ip2p.dataset.records import EditRow, caption_group, open_image, row_key
from comfyui_ip2p.dataset.writer import WriterBusyError
from comfyui_ip2p.testing.edit_rows import write_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

SCORES = ("p", "cfg", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")


def pixels(seed: int, size: tuple[int, int] = (12, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def make_rows(count: int = 5, per_group: int = 2) -> list[EditRow]:
    rows = []
    for i in range(count):
        g = i // per_group
        rows.append(
            EditRow(
                input_caption=f"a photo of house {g}",
                instruction=f"make house {g} snowy",
                output_caption=f"a photo of snowy house {g}",
                input_image=Image.fromarray(pixels(2 * i)),
                edited_image=Image.fromarray(pixels(2 * i + 1)),
                mask=Image.fromarray(pixels(100 + i)[:, :, 0]) if i % 2 == 0 else None,
                seed=4_000_000_000 + i,
                p=0.1 + i / 10,
                cfg=7.5 + i,
                clip_sim_0=0.21 + i / 100,
                clip_sim_1=0.22 + i / 100,
                clip_sim_dir=0.23 + i / 100,
                clip_sim_image=0.8 - i / 100,
            )
        )
    return rows


def assert_same_rows(got: list[EditRow], want: list[EditRow], exact_pixels: bool = True) -> None:
    assert len(got) == len(want)
    by_key = {row_key(row): row for row in got}
    assert len(by_key) == len(got), "a row came back twice"
    for expected in want:
        row = by_key[row_key(expected)]
        assert (row.input_caption, row.instruction, row.output_caption) == (
            expected.input_caption,
            expected.instruction,
            expected.output_caption,
        )
        assert row.seed == expected.seed
        assert row.group == expected.group
        for name in SCORES:
            assert getattr(row, name) == pytest.approx(getattr(expected, name), abs=1e-12)
        for name in ("input_image", "edited_image"):
            got_px = np.asarray(open_image(getattr(row, name)).convert("RGB"), dtype=np.int16)
            want_px = np.asarray(open_image(getattr(expected, name)), dtype=np.int16)
            if exact_pixels:
                np.testing.assert_array_equal(got_px, want_px)
            else:
                assert got_px.shape == want_px.shape
                assert np.abs(got_px - want_px).mean() < 3
        if expected.mask is None:
            assert row.mask is None
        else:
            np.testing.assert_array_equal(np.asarray(open_image(row.mask)), np.asarray(expected.mask))


# -- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("reference", {"image_format": "png"}), ("diffusers", {}), ("public", {"rows_per_shard": 2})],
)
def test_round_trip_keeps_captions_pixels_and_scores(tmp_path, fmt, options):
    rows = make_rows(5)
    assert write_rows(rows, tmp_path, "ds", fmt, **options) == 5

    assert formats.detect_format(tmp_path / "ds") == fmt
    assert_same_rows(formats.load_rows(tmp_path / "ds"), rows)


def test_public_shards_split_by_rows_per_shard(tmp_path):
    write_rows(make_rows(5), tmp_path, "ds", "public", rows_per_shard=2)

    shards = sorted(p.name for p in (tmp_path / "ds/data").iterdir())
    assert shards == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert [pq.read_metadata(tmp_path / "ds/data" / s).num_rows for s in shards] == [2, 2, 1]


def test_reference_jpeg_is_close_and_stored_as_jpeg(tmp_path):
    rows = make_rows(3)
    write_rows(rows, tmp_path, "ds", "reference")

    stored = tmp_path / "ds/0000000" / f"{rows[0].seed}_0.jpg"
    assert Image.open(stored).format == "JPEG"
    assert_same_rows(formats.load_rows(tmp_path / "ds"), rows, exact_pixels=False)


def test_reference_files_follow_the_paper_layout(tmp_path):
    rows = make_rows(5, per_group=2)
    write_rows(rows, tmp_path, "ds", "reference")
    root = tmp_path / "ds"

    seeds = json.loads((root / "seeds.json").read_text())
    assert seeds == [
        ["0000000", [rows[0].seed, rows[1].seed]],
        ["0000001", [rows[2].seed, rows[3].seed]],
        ["0000002", [rows[4].seed]],
    ]
    prompt = json.loads((root / "0000001/prompt.json").read_text())
    assert prompt["caption"] == prompt["input"] == "a photo of house 1"
    assert prompt["edit"] == "make house 1 snowy"
    assert prompt["output"] == "a photo of snowy house 1"
    lines = (root / "0000001/metadata.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["seed"] == rows[2].seed
    assert first["p2p_threshold"] == pytest.approx(rows[2].p)
    assert first["cfg_scale"] == pytest.approx(rows[2].cfg)
    assert first["clip_sim_dir"] == pytest.approx(rows[2].clip_sim_dir)
    for seed in (rows[2].seed, rows[3].seed):
        assert (root / f"0000001/{seed}_0.jpg").is_file()
        assert (root / f"0000001/{seed}_1.jpg").is_file()


def test_reads_a_reference_dataset_made_by_the_papers_scripts(tmp_path):
    # As generate_img_dataset.py + prepare_dataset.py leave it: "input" key, string seeds, long metadata names.
    root = tmp_path / "paper"
    pair = root / "0000042"
    pair.mkdir(parents=True)
    (pair / "prompt.json").write_text(json.dumps({"input": "a dog", "edit": "make it a cat", "output": "a cat"}))
    for seed in (7, 9):
        Image.fromarray(pixels(seed)).save(pair / f"{seed}_0.jpg", quality=100)
        Image.fromarray(pixels(seed + 1)).save(pair / f"{seed}_1.jpg", quality=100)
    meta = {"seed": 9, "p2p_threshold": 0.5, "cfg_scale": 9.0, "clip_sim_0": 0.3, "clip_sim_1": 0.31}
    meta |= {"clip_sim_dir": 0.25, "clip_sim_image": 0.9}
    (pair / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    # seeds.json lists only seed 9: a reader must trust the index, not the folder listing.
    (root / "seeds.json").write_text(json.dumps([["0000042", ["9"]]]))

    assert formats.detect_format(root / "seeds.json") == "reference"
    (row,) = formats.load_rows(root)
    assert (row.input_caption, row.instruction, row.output_caption) == ("a dog", "make it a cat", "a cat")
    assert (row.seed, row.group, row.p, row.cfg, row.clip_sim_image) == (9, "0000042", 0.5, 9.0, 0.9)
    assert Path(row.input_image) == pair / "9_0.jpg"


def test_reads_the_public_parquet_columns_written_by_datasets(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "original_prompt": datasets.Value("string"),
            "original_image": datasets.Image(),
            "edit_prompt": datasets.Value("string"),
            "edited_prompt": datasets.Value("string"),
            "edited_image": datasets.Image(),
        }
    )
    data = {
        "original_prompt": ["a red car", "a tree"],
        "original_image": [Image.fromarray(pixels(1)), Image.fromarray(pixels(2))],
        "edit_prompt": ["make it blue", "add snow"],
        "edited_prompt": ["a blue car", "a snowy tree"],
        "edited_image": [Image.fromarray(pixels(3)), Image.fromarray(pixels(4))],
    }
    file = tmp_path / "public.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(file))

    assert formats.detect_format(file) == "public"
    rows = formats.load_rows(file)
    assert [(r.input_caption, r.instruction, r.output_caption) for r in rows] == [
        ("a red car", "make it blue", "a blue car"),
        ("a tree", "add snow", "a snowy tree"),
    ]
    assert rows[0].seed is None
    assert rows[0].group == caption_group("a red car", "make it blue", "a blue car")
    np.testing.assert_array_equal(np.asarray(open_image(rows[1].edited_image)), pixels(4))


def test_reads_a_hub_parquet_with_only_the_three_diffusers_columns(tmp_path):
    """What diffusers' training script needs and many hub datasets carry: no caption columns at all."""
    import datasets

    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    data = {"input_image": [Image.fromarray(pixels(5))], "edit_prompt": ["make it night"],
            "edited_image": [Image.fromarray(pixels(6))]}
    file = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(file))

    assert formats.detect_format(file) == "diffusers"
    [row] = formats.load_rows(file)
    assert (row.input_caption, row.instruction, row.output_caption) == ("", "make it night", "")
    np.testing.assert_array_equal(np.asarray(open_image(row.edited_image)), pixels(6))


def test_a_failed_atomic_write_leaves_neither_a_temp_file_nor_a_changed_file(tmp_path, monkeypatch):
    from comfyui_ip2p.dataset import paths

    target = tmp_path / "seeds.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paths.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        paths.atomic_write_bytes(target, b"new contents")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seeds.json"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("target", ["diffusers", "reference"])
def test_converting_keeps_jpeg_bytes_unchanged(tmp_path, target):
    write_rows(make_rows(2), tmp_path, "src", "reference")
    source_rows = formats.load_rows(tmp_path / "src")
    write_rows(source_rows, tmp_path, "dst", target)

    converted = formats.load_rows(tmp_path / "dst")
    src_by_key = {row_key(r): r for r in source_rows}
    for row in converted:
        original = Path(src_by_key[row_key(row)].input_image).read_bytes()
        if target == "reference":
            assert Path(row.input_image).read_bytes() == original
        else:
            assert row.input_image.format == "JPEG"
            stored = pq.read_table(tmp_path / "dst/data/train-00000.parquet", columns=["input_image"])
            assert original in [cell["bytes"] for cell in stored.column("input_image").to_pylist()]


# -- Hugging Face datasets compatibility ---------------------------------------------------------------


def test_diffusers_dataset_loads_in_hf_datasets_as_images(tmp_path):
    import datasets
    rows = make_rows(3)
    write_rows(rows, tmp_path, "ds", "diffusers", rows_per_shard=2)
    folder = tmp_path / "ds"

    by_folder = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf_cache"))["train"]
    by_files = datasets.load_dataset(
        "parquet", data_files=str(folder / "data/*.parquet"), cache_dir=str(tmp_path / "hf_cache")
    )["train"]

    for loaded in (by_folder, by_files):
        assert loaded.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
        assert sorted(loaded["edit_prompt"]) == sorted(r.instruction for r in rows)
        assert len(loaded) == 3
        for item in loaded:
            assert isinstance(item["input_image"], Image.Image)
            assert isinstance(item["edited_image"], Image.Image)
            want = next(r for r in rows if r.seed == item["seed"])
            np.testing.assert_array_equal(np.asarray(item["input_image"]), np.asarray(want.input_image))
            np.testing.assert_array_equal(np.asarray(item["edited_image"]), np.asarray(want.edited_image))
            assert item["input_caption"] == want.input_caption


# -- lazy reading and detection ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["reference", "diffusers"])
def test_iter_rows_yields_early_rows_before_touching_later_ones(tmp_path, fmt):
    write_rows(make_rows(4, per_group=2), tmp_path, "ds", fmt, **_small_shards(fmt))
    folder = tmp_path / "ds"
    # Break the last part of the dataset: a lazy reader still yields the first rows before failing. Parquet
    # footers are read when the dataset is opened (row counts), so the shard breaks after opening.
    rows = formats.iter_rows(folder)
    if fmt == "reference":
        (folder / "0000001/prompt.json").write_text("not json")
    else:
        (folder / "data/train-00001.parquet").write_bytes(b"not parquet")
    first = [next(rows), next(rows)]
    assert [r.seed for r in first] == [4_000_000_000, 4_000_000_001]
    with pytest.raises((ValueError, OSError)):
        next(rows)


def test_a_broken_shard_is_named_when_the_dataset_is_opened(tmp_path):
    write_rows(make_rows(4, per_group=2), tmp_path, "ds", "diffusers", rows_per_shard=2)
    (tmp_path / "ds/data/train-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"data/train-00001\.parquet .* not a readable parquet file"):
        formats.open_rows(tmp_path / "ds")


def _small_shards(fmt: str) -> dict:
    return {} if fmt == "reference" else {"rows_per_shard": 2}


def test_detect_format_explains_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"seeds\.json"):
        formats.detect_format(tmp_path / "empty")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="input_image, edit_prompt, edited_image"):
        formats.detect_format(tmp_path / "other.parquet")
    with pytest.raises(FileNotFoundError):
        formats.load_rows(tmp_path / "missing")


# -- rows and keys -------------------------------------------------------------------------------------


def test_seedless_rows_get_a_stable_content_key_and_stay_seedless(tmp_path):
    row = EditRow("a", "b", "c", Image.fromarray(pixels(1)), Image.fromarray(pixels(2)))
    twin = EditRow("a", "b", "c", Image.fromarray(pixels(1)), Image.fromarray(pixels(2)))
    other = EditRow("a", "b", "c", Image.fromarray(pixels(1)), Image.fromarray(pixels(3)))
    assert row_key(row) == row_key(twin) != row_key(other)

    for fmt in ("reference", "diffusers"):
        assert write_rows([row, twin, other], tmp_path, fmt, fmt, image_format="png") == 2
        loaded = formats.load_rows(tmp_path / fmt)
        assert [r.seed for r in loaded] == [None, None]
        assert {row_key(r) for r in loaded} == {row_key(row), row_key(other)}


def test_group_defaults_to_the_caption_triple():
    a = EditRow("x", "y", "z", b"", b"")
    assert a.group == EditRow("x", "y", "z", b"", b"", seed=3).group
    assert a.group != EditRow("x", "y", "z2", b"", b"").group
    assert EditRow("x", "y", "z", b"", b"", group="pair-1").group == "pair-1"


def test_reference_refuses_a_group_with_other_captions(tmp_path):
    rows = make_rows(1)
    clash = EditRow("other", "captions", "here", rows[0].input_image, rows[0].edited_image, seed=1)
    clash.group = rows[0].group
    with formats.open_writer(tmp_path, "ds", "reference") as writer:
        writer.add(rows[0])
        with pytest.raises(ValueError, match="must share their captions"):
            writer.add(clash)


# -- writers refuse what they must not touch -----------------------------------------------------------


def test_second_writer_on_the_same_folder_is_refused(tmp_path):
    first = formats.open_writer(tmp_path, "ds", "diffusers")
    with pytest.raises(WriterBusyError, match="another writer"):
        formats.open_writer(tmp_path, "ds", "diffusers")
    first.close()
    formats.open_writer(tmp_path, "ds", "diffusers").close()  # free again once the first one closed


def test_writer_refuses_other_format_and_foreign_folders(tmp_path):
    write_rows(make_rows(1), tmp_path, "ds", "reference")
    with pytest.raises(ValueError, match="holds a 'reference' dataset"):
        formats.open_writer(tmp_path, "ds", "public")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a dataset written by this pack"):
        formats.open_writer(tmp_path, "photos", "diffusers")
    assert (tmp_path / "photos/holiday.jpg").read_bytes() == b"x"


# -- path safety ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("C:\\Users\\x", "absolute"),
        ("c:relative", "absolute"),
        ("..", r"'\.\.'"),
        ("a/../../b", r"'\.\.'"),
        ("a\\..\\..\\b", r"'\.\.'"),
        ("\uff0e\uff0e/escape", r"'\.\.'"),  # fullwidth dots normalise to ".."
        ("a\x00b", "NUL"),
        ("a\nb", "control"),
        ("photos\u202egpj.exe", "invisible"),  # a right-to-left override disguising the name
        ("a\u200bb", "invisible"),
        ("", "empty"),
        ("./", "root folder itself"),
        ("CON", "device name"),
        ("data:stream", "':'"),
        ("trailing.", "dot or space"),
    ],
)
def test_hostile_names_are_refused_with_a_hint(tmp_path, name, reason):
    with pytest.raises(ValueError, match=reason) as error:
        resolve_inside(tmp_path, name)
    assert "relative folder name" in str(error.value)


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/../../escape"])
def test_writers_refuse_hostile_names_before_creating_anything(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    for fmt in formats.FORMATS:
        with pytest.raises(ValueError, match="relative folder name"):
            formats.open_writer(root, name, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list(root.iterdir()) == []


def test_symlink_out_of_the_root_is_refused_and_inside_is_fine(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "escape")
    (root / "real").mkdir()
    os.symlink(root / "real", root / "alias")

    with pytest.raises(ValueError, match="symlink"):
        resolve_inside(root, "escape/ds")
    with pytest.raises(ValueError, match="symlink"):
        formats.open_writer(root, "escape", "reference")
    assert list(outside.iterdir()) == []
    assert resolve_inside(root, "alias/ds") == (root / "real/ds").resolve()


def test_plain_and_normalised_names_resolve_inside(tmp_path):
    assert resolve_inside(tmp_path, "my_edits") == tmp_path.resolve() / "my_edits"
    assert resolve_inside(tmp_path, "a/./b//c/") == tmp_path.resolve() / "a/b/c"
    assert resolve_inside(tmp_path, "\uff44\uff41\uff54\uff41") == tmp_path.resolve() / "data"
    assert resolve_inside(tmp_path, "été") == tmp_path.resolve() / "été"


# Pieces that combine into the tricky cases: separators, dots and their Unicode look-alikes, drives, NUL.
NAME_PIECES = ["a", "b", ".", "..", "/", "\\", ":", "C:", "~", " ", "\x00", "\uff0e", "\uff0f", "\u2024", "\u2025"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.lists(st.sampled_from(NAME_PIECES), max_size=10).map("".join))
def test_any_name_resolves_inside_the_root_or_is_refused(tmp_path, name):
    root = tmp_path.resolve()
    try:
        target = resolve_inside(root, name)
    except ValueError:
        return
    assert target != root
    assert target.is_relative_to(root)
    assert ".." not in target.relative_to(root).parts
