"""The public layouts (MagicBrush, HQ-Edit, UltraEdit, the paper's, diffusers', a folder of pairs, any parquet
through a column mapping) read through one lazy RowSource: texts, pixels and masks as written with the hub's
exact columns and dtypes (testing/public_layouts.py), detection by columns, errors that list the columns found,
split selection in shard folders, and opening that costs footers, not images."""

from __future__ import annotations

import io
import os
import pickle
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.dataset import formats, layouts
from comfyui_ip2p.dataset.format_parquet import arrow_schema
from comfyui_ip2p.dataset.paths import DatasetFileError
from comfyui_ip2p.dataset.records import open_image
from comfyui_ip2p.dataset.source import READ_FORMATS, RowSource, open_rows
from comfyui_ip2p.testing.public_layouts import (
    IMAGE_TYPE,
    LAYOUTS_ON_HUB,
    hub_schema,
    image_cell,
    tiny_rows,
    write_layout,
)
from PIL import Image

# Which EditRow fields each layout carries (the rest read back empty / None).
CAPTIONS = {"public", "hq-edit", "ultraedit", "pairs"}
MASKS = {"magicbrush", "ultraedit", "pairs"}
SCORES = {"ultraedit"}


def pixels(image) -> np.ndarray:
    return np.asarray(open_image(image))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


# -- every layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS_ON_HUB)
def test_every_layout_reads_back_texts_pixels_and_masks(tmp_path, layout):
    rows = tiny_rows(4)
    path = write_layout(layout, tmp_path / layout, rows, shards=2)

    assert formats.detect_format(path) == layout
    source = open_rows(path)
    assert source.format == layout and len(source) == 4
    got = list(source)
    assert got == source[:] and len(formats.load_rows(path)) == 4
    for want, row in zip(rows, got, strict=True):
        assert row.instruction == want.instruction
        captions = (row.input_caption, row.output_caption)
        assert captions == ((want.input_caption, want.output_caption) if layout in CAPTIONS else ("", ""))
        np.testing.assert_array_equal(pixels(row.input_image), pixels(want.input_image))
        np.testing.assert_array_equal(pixels(row.edited_image), pixels(want.edited_image))
        if layout in MASKS and want.mask is not None:
            np.testing.assert_array_equal(pixels(row.mask).reshape(16, 16, -1)[..., 0], pixels(want.mask))
        else:
            assert row.mask is None
        if layout in SCORES:
            assert row.scores() == {**want.scores(), "p": None, "cfg": None}
        else:
            assert set(row.scores().values()) == {None}


def test_magicbrush_and_ultraedit_rows_get_stable_keys(tmp_path):
    rows = tiny_rows(3)
    magic = open_rows(write_layout("magicbrush", tmp_path / "mb", rows))
    assert [(r.group, r.seed) for r in magic] == [("magicbrush:000000:10", 10), ("magicbrush:000001:11", 11),
                                                  ("magicbrush:000002:12", 12)]
    ultra = open_rows(write_layout("ultraedit", tmp_path / "ue", rows))
    assert [r.seed for r in ultra] == [10, 11, 12]
    assert [r.group for r in ultra] == [r.group for r in rows]  # from the captions, as for our own rows


def test_magicbrush_masks_convert_transparency_and_resolution(tmp_path):
    """MagicBrush stores the masked source image as RGBA (edited region transparent), sometimes at another
    size; an image without alpha is read by the card's 'white region'."""
    source = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[2:4, 2:6] = 0  # edited region, at half the resolution
    rgba = np.dstack([np.zeros((8, 8, 3), np.uint8) + 200, alpha])
    white = np.zeros((16, 16), np.uint8)
    white[10:, :] = 255
    table = pa.Table.from_pylist(
        [{"img_id": "7", "turn_index": 1, "source_img": {"bytes": png(source), "path": None},
          "mask_img": {"bytes": png(rgba, "RGBA"), "path": None}, "instruction": "a",
          "target_img": {"bytes": png(source), "path": None}},
         {"img_id": "7", "turn_index": 2, "source_img": {"bytes": png(source), "path": None},
          "mask_img": {"bytes": png(white, "L"), "path": None}, "instruction": "b",
          "target_img": {"bytes": png(source), "path": None}}], schema=hub_schema("magicbrush"))
    pq.write_table(table, tmp_path / "mb.parquet")
    first, second = open_rows(tmp_path / "mb.parquet")
    expected = np.zeros((16, 16), np.uint8)
    expected[4:8, 4:12] = 255
    np.testing.assert_array_equal(pixels(first.mask), expected)
    np.testing.assert_array_equal(pixels(second.mask), white)


def test_ultraedit_free_form_null_columns_read_as_no_mask(tmp_path):
    path = write_layout("ultraedit", tmp_path / "ue", tiny_rows(2, masks=False))
    schema = pq.read_schema(next((path / "data").glob("*.parquet")))
    assert schema.field("mask_image").type == pa.null() and schema.field("edit_object").type == pa.null()
    assert schema.field("idx").type == pa.int64() and schema.field("ssim").type == pa.float64()
    assert [row.mask for row in open_rows(path)] == [None, None]


def test_hub_files_load_in_hf_datasets_with_decoded_images(tmp_path):
    import datasets

    path = write_layout("magicbrush", tmp_path / "mb", tiny_rows(2))
    loaded = datasets.load_dataset("parquet", data_files=str(path / "data/*.parquet"), split="train")
    assert loaded.features["turn_index"].dtype == "int32"
    assert isinstance(loaded[0]["source_img"], Image.Image) and loaded[0]["img_id"] == "000000"


# -- detection and errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [name for name in LAYOUTS_ON_HUB if name != "pairs"])
@pytest.mark.parametrize("with_masks", [False, True])
def test_each_hub_schema_matches_exactly_one_layout(layout, with_masks):
    names = set(hub_schema(layout, with_masks).names)
    assert [name for name, entry in layouts.LAYOUTS.items() if entry.required <= names] == [layout]


@pytest.mark.parametrize("layout", ["diffusers", "public"])
def test_our_own_written_schemas_match_exactly_their_layout(layout):
    names = set(arrow_schema(layout).names)
    assert [name for name, entry in layouts.LAYOUTS.items() if entry.required <= names] == [layout]


def test_unknown_columns_are_listed_with_the_mapping_hint(tmp_path):
    pq.write_table(pa.table({"before": [b"x"], "after": [b"y"], "prompt": ["z"]}), tmp_path / "odd.parquet")
    for call in (formats.detect_format, open_rows):
        with pytest.raises(ValueError, match=r"columns before, after, prompt.*column mapping") as caught:
            call(tmp_path / "odd.parquet")
        assert "input_image=" in str(caught.value)
    with pytest.raises(ValueError, match=r"needs the column\(s\) edit, input, .* its columns are: before, after"):
        open_rows(tmp_path / "odd.parquet", format="hq-edit")


def test_a_mapping_reads_any_parquet_and_names_missing_columns(tmp_path):
    rows = tiny_rows(2)
    table = pa.Table.from_pylist(
        [{"before": image_cell(r.input_image, "a.png"), "after": image_cell(r.edited_image, "b.png"),
          "prompt": r.instruction, "region": image_cell(r.mask, "m.png"), "note": 3} for r in rows],
        schema=pa.schema([("before", IMAGE_TYPE), ("after", IMAGE_TYPE), ("prompt", pa.string()),
                          ("region", IMAGE_TYPE), ("note", pa.int64())]))
    pq.write_table(table, tmp_path / "any.parquet")
    mapping = layouts.parse_mapping("input_image=before, edited_image=after,instruction = prompt, mask=region")

    assert formats.detect_format(tmp_path / "any.parquet", mapping) == "mapped"
    got = formats.load_rows(tmp_path / "any.parquet", mapping=mapping)
    assert [r.instruction for r in got] == [r.instruction for r in rows]
    np.testing.assert_array_equal(pixels(got[0].mask), pixels(rows[0].mask))
    assert got[1].mask is None

    with pytest.raises(ValueError, match=r"column mapping names the column\(s\) source.*columns are: before, after"):
        open_rows(tmp_path / "any.parquet", mapping={**mapping, "input_image": "source"})
    with pytest.raises(ValueError, match=r"'note' .* holds int64, not an image"):
        open_rows(tmp_path / "any.parquet", mapping={**mapping, "input_image": "note"})
    with pytest.raises(ValueError, match="not 'magicbrush'"):
        open_rows(tmp_path / "any.parquet", format="magicbrush", mapping=mapping)
    with pytest.raises(ValueError, match="needs a column mapping"):
        open_rows(tmp_path / "any.parquet", format="mapped")


@pytest.mark.parametrize(("text", "message"), [
    ("input_image=a, edited_image=b", "lacks the field"),
    ("input_image=a, edited_image=b, instruction=c, depth=d", "unknown field 'depth'"),
    ("input_image=a, edited_image=b, instruction", "has no '='"),
    ("input_image=a, edited_image=b, instruction=c, instruction=d", "twice"),
    ("input_image=a, edited_image=b, instruction=", "no column name"),
    ("input_image=a, edited_image=b, instruction=" + "x" * 200, "more than 128"),
    ("input_image=a\x07b, edited_image=b, instruction=c", "control characters"),
    ("x" * 5000, "more than 4096"),
])
def test_parse_mapping_refuses_bad_text_naming_the_part(text, message):
    with pytest.raises(ValueError, match=message):
        layouts.parse_mapping(text)


@pytest.mark.parametrize("mapping", [
    ["input_image", "a"],
    {"input_image": 3, "edited_image": "b", "instruction": "c"},
    {"input_image": "a", "edited_image": "b", "instruction": "c", 7: "d"},
    {"input_image": "a", "edited_image": "b"},
    {"input_image": "a", "edited_image": "b", "instruction": "c", "__class__": "d"},
])
def test_check_mapping_refuses_untrusted_shapes(mapping):
    with pytest.raises(ValueError, match="column mapping"):
        layouts.check_mapping(mapping)


def test_check_mapping_returns_a_fresh_plain_dict():
    given = {"input_image": "a", "edited_image": "b", "instruction": "c", "mask": "m"}
    checked = layouts.check_mapping(given)
    assert checked == given and checked is not given
    assert set(READ_FORMATS) >= {"reference", "diffusers", "public", "magicbrush", "hq-edit", "ultraedit",
                                 "pairs", "mapped"}


# -- shard folders and splits ------------------------------------------------------------------------------


def test_a_sharded_folder_reads_every_train_shard_in_order_and_no_other_split(tmp_path):
    rows = tiny_rows(7, masks=False)
    path = write_layout("hq-edit", tmp_path / "hq", rows, shards=3, row_group_size=2)
    write_layout("hq-edit", tmp_path / "hq", tiny_rows(2, seed=9), split="test")
    write_layout("hq-edit", tmp_path / "hq", tiny_rows(2, seed=8), split="validation")
    assert len(list((path / "data").iterdir())) == 5

    source = open_rows(path)
    assert [r.instruction for r in source] == [r.instruction for r in rows]
    assert source.blocks() == [(0, 2), (2, 4), (4, 5), (5, 7)]  # row groups of 2 within shards of 2, 3, 2 rows


def test_a_folder_without_train_reads_its_splits_but_not_held_out_ones(tmp_path):
    # UltraEdit's splits are FreeForm_0, FreeForm_1, ... (no train); MagicBrush's held-out one is dev.
    write_layout("ultraedit", tmp_path / "ue", tiny_rows(2, seed=1), split="FreeForm_0")
    write_layout("ultraedit", tmp_path / "ue", tiny_rows(3, seed=2), split="FreeForm_1")
    write_layout("ultraedit", tmp_path / "ue", tiny_rows(4, seed=3), split="dev")
    assert len(open_rows(tmp_path / "ue")) == 5
    write_layout("magicbrush", tmp_path / "only_dev", tiny_rows(3), split="dev")
    assert len(open_rows(tmp_path / "only_dev")) == 3
    write_layout("magicbrush", tmp_path / "held", tiny_rows(1), split="test")
    write_layout("magicbrush", tmp_path / "held", tiny_rows(1), split="validation")
    with pytest.raises(ValueError, match="only the held-out splits test, validation"):
        open_rows(tmp_path / "held")


# -- laziness ---------------------------------------------------------------------------------------------


def test_opening_a_large_parquet_dataset_decodes_no_image(tmp_path):
    """5000 rows of 6 KB images (60 MB): opening and len() cost the footers, far below the image bytes."""
    rng = np.random.default_rng(0)
    cells = [png(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)) for _ in range(8)]
    count = 5000
    table = pa.table({"input_image": pa.array([{"bytes": cells[i % 8], "path": None} for i in range(count)],
                                              IMAGE_TYPE),
                      "edit_prompt": [f"edit {i}" for i in range(count)],
                      "edited_image": pa.array([{"bytes": cells[(i + 1) % 8], "path": None} for i in range(count)],
                                               IMAGE_TYPE)})
    image_bytes = 2 * sum(len(cells[i % 8]) for i in range(count))
    (tmp_path / "big").mkdir()
    pq.write_table(table, tmp_path / "big/train-00000.parquet", row_group_size=100, use_dictionary=False,
                   compression="none")
    del table
    assert os.path.getsize(tmp_path / "big/train-00000.parquet") > image_bytes

    tracemalloc.start()
    try:
        source = open_rows(tmp_path / "big")
        assert len(source) == count and source.format == "diffusers"
        assert source.head(10).fingerprint() != source.fingerprint()
        opened = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opened < image_bytes / 50, (opened, image_bytes)
    row = source[4321]  # one row group read
    assert row.instruction == "edit 4321" and pixels(row.input_image).shape == (32, 64, 3)
    assert source.size_bytes == os.path.getsize(tmp_path / "big/train-00000.parquet")


def test_row_source_slices_heads_scores_and_pickles(tmp_path):
    rows = tiny_rows(5)
    source = open_rows(write_layout("ultraedit", tmp_path / "ue", rows, shards=2, row_group_size=2))
    assert isinstance(source, RowSource) and source.path == tmp_path / "ue"
    assert {"clip_sim_source", "idx", "mask_image", "dinov2_sim"} <= set(source.columns)
    assert [r.seed for r in source[1:4]] == [11, 12, 13] and [r.seed for r in source[::-2]] == [14, 12, 10]
    assert source[-1].seed == 14
    with pytest.raises(IndexError):
        source[5]
    head = source.head(3)
    assert len(head) == 3 and [r.seed for r in head] == [10, 11, 12] and len(source.head(99)) == 5
    assert head.scores("clip_sim_dir") == [r.clip_sim_dir for r in rows[:3]]
    assert source.scores("clip_sim_0") == [r.clip_sim_0 for r in rows]
    assert source.head(4).head(2).scores("clip_sim_image") == [r.clip_sim_image for r in rows[:2]]
    assert source.scores("p") == [None] * 5
    with pytest.raises(ValueError, match="unknown score"):
        source.scores("dinov2_sim")
    clone = pickle.loads(pickle.dumps(head))
    assert [r.seed for r in clone] == [10, 11, 12] and clone.fingerprint() == head.fingerprint()


def test_the_fingerprint_follows_the_files_without_reading_them(tmp_path):
    path = write_layout("pairs", tmp_path / "pairs", tiny_rows(3))
    before = open_rows(path).fingerprint()
    assert open_rows(path).fingerprint() == before
    os.utime(path / "pair_00001_edited.png", ns=(1, 1))
    assert open_rows(path).fingerprint() != before


def test_reference_rows_are_lazy_too(tmp_path):
    rows = tiny_rows(4)
    with formats.open_writer(tmp_path, "ref", "reference", image_format="png") as writer:
        writer.extend(rows)
    source = open_rows(tmp_path / "ref")
    assert source.format == "reference" and len(source) == 4
    assert [r.seed for r in source[2:]] == [12, 13]
    assert source.scores("clip_sim_1") == [r.clip_sim_1 for r in rows]
    assert source.blocks() == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one caption pair per folder
    np.testing.assert_array_equal(pixels(source[2].mask), pixels(rows[2].mask))


# -- the pairs folder ---------------------------------------------------------------------------------------


def test_pairs_folder_with_jsonl_and_jpgs_reads(tmp_path):
    rows = tiny_rows(2, masks=False)
    path = write_layout("pairs", tmp_path / "p", rows, index="jsonl")
    (path / "pair_00001_edited.png").rename(path / "pair_00001_edited.webp")
    source = open_rows(path / "pairs.jsonl")
    assert source.format == "pairs" and source.columns == ("name", "instruction", "input_caption",
                                                           "output_caption")
    assert source[1].edited_image.name == "pair_00001_edited.webp"
    assert [r.output_caption for r in source] == [r.output_caption for r in rows]


def test_pairs_folder_names_a_missing_file(tmp_path):
    path = write_layout("pairs", tmp_path / "p", tiny_rows(3))
    (path / "pair_00002_input.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 3 names the pair 'pair_00002', but pair_00002_input\.png"):
        open_rows(path)


def test_pairs_folder_refuses_two_indexes_and_bad_names(tmp_path):
    path = write_layout("pairs", tmp_path / "p", tiny_rows(1))
    (path / "more.jsonl").write_text('{"name": "../x", "instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"exactly one \.csv or \.jsonl.*more\.jsonl, pairs\.csv"):
        open_rows(path)
    (path / "pairs.csv").unlink()
    with pytest.raises(ValueError, match="not a plain pair name"):
        open_rows(path)


# -- confinement -------------------------------------------------------------------------------------------


def test_an_image_cell_path_outside_the_folder_is_refused_and_inside_is_read(tmp_path):
    rows = tiny_rows(1)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds/inside.png").write_bytes(png(pixels(rows[0].input_image)))
    (tmp_path / "secret.png").write_bytes(png(pixels(rows[0].edited_image)))
    schema = hub_schema("diffusers")
    for name, edited in (("good", "inside.png"), ("bad", "../secret.png")):
        cell = {"bytes": None, "path": edited}
        table = pa.Table.from_pylist([{"input_image": cell | {"path": "inside.png"}, "edit_prompt": "a",
                                       "edited_image": cell}], schema=schema)
        pq.write_table(table, tmp_path / f"ds/{name}.parquet")
    [row] = open_rows(tmp_path / "ds/good.parquet")
    np.testing.assert_array_equal(pixels(row.edited_image), pixels(rows[0].input_image))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        open_rows(tmp_path / "ds/bad.parquet")[0]


def test_a_pair_image_linked_out_of_the_folder_is_refused(tmp_path):
    path = write_layout("pairs", tmp_path / "p", tiny_rows(1))
    (tmp_path / "elsewhere.png").write_bytes((path / "pair_00000_input.png").read_bytes())
    (path / "pair_00000_input.png").unlink()
    (path / "pair_00000_input.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises((ValueError, DatasetFileError), match="outside the dataset"):
        list(open_rows(path))

