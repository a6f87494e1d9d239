"""EditRowsFromImages and DatasetInfo through ComfyUI's executor: IMAGE batches become rows that Save Edit Dataset
writes and Load Edit Dataset reads back with the very pixels Save Image would write; a rerun adds nothing; the
counts and sizes that do not match are refused naming the node; Dataset Info describes a dataset and draws its
CLIP scores."""

from __future__ import annotations

import dataclasses
import io
import uuid

import numpy as np
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset.records import encoded_format, raw_bytes
from comfyui_ip2p.testing import probe_nodes
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import random_rows, write_rows
from comfyui_ip2p.testing.probe_nodes import inspected
from PIL import Image

SIZE = (24, 40)  # height, width: not square, so a swapped axis shows
INSTRUCTIONS = ["make it winter", "add a red hat", "turn it into a painting"]


@pytest.fixture(scope="module")
def probes(comfy_nodes):
    probe_nodes.register()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def probe_image(seed: int, batch: int = 3, height: int = SIZE[0], width: int = SIZE[1]) -> dict:
    return {"class_type": "IP2PProbeImage", "inputs": {"batch": batch, "height": height, "width": width,
                                                       "channels": 3, "fill": "random", "seed": seed}}


def probe_pixels(seed: int, batch: int = 3, channels: int = 3) -> torch.Tensor:
    """What IP2PProbeImage makes for these inputs (random floats, so truncation and rounding differ)."""
    return torch.rand((batch, *SIZE, channels), generator=torch.Generator().manual_seed(seed))


def save_image_bytes(pixels: torch.Tensor) -> np.ndarray:
    """ComfyUI's SaveImage conversion (nodes.py): 255. * image.cpu().numpy(), clipped, then astype(uint8)."""
    return np.clip(255.0 * pixels.cpu().numpy(), 0, 255).astype(np.uint8)


def rows_graph(name: str, fmt: str) -> dict:
    return {
        "1": probe_image(seed=1),
        "2": probe_image(seed=2),
        "3": probe_image(seed=3),
        "4": {"class_type": "ImageToMask", "inputs": {"image": ["3", 0], "channel": "green"}},
        "5": {"class_type": "EditRowsFromImages", "inputs": {
            "input_images": ["1", 0], "edited_images": ["2", 0], "instructions": "\n".join(INSTRUCTIONS) + "\n",
            "input_captions": "a photo of a dog", "output_captions": "a photo of a dog, edited", "mask": ["4", 0]}},
        "6": {"class_type": "SaveEditDataset", "inputs": {"rows": ["5", 0], "dataset_name": name, "format": fmt,
                                                          "image_format": "png"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def decoded_png(source) -> np.ndarray:
    """The pixels of a row image as read back: a file (reference layout) or a lazily opened parquet cell."""
    if isinstance(source, Image.Image):
        assert source.format == "PNG", "the saved image must be the lossless PNG"
        return np.asarray(source)
    data = raw_bytes(source)
    assert data is not None and encoded_format(data) == "PNG", "the saved image must be the lossless PNG"
    return np.asarray(Image.open(io.BytesIO(data)))


def load(comfy_nodes, name: str, max_rows: int = 0, preview_count: int = 2):
    return comfy_nodes["LoadEditDataset"].execute("none", "auto", max_rows, preview_count,
                                                  dataset_override=f"output/{name}").result


@pytest.mark.parametrize("fmt", ["diffusers", "reference"])
def test_rows_from_images_round_trip_bit_identical_and_a_rerun_adds_nothing(comfy_nodes, probes, fmt):
    name = unique(f"rows_{fmt}")
    result = checked(run_prompt(rows_graph(name, fmt)))
    assert result.outputs["6"]["text"] == [f"3 new rows, 3 in total, in output/{name} ({fmt})"]
    assert result.outputs["7"]["text"][0].startswith("3 rows (40x24) from 3 input and 3 edited images")

    handle, rows, inputs, edits = load(comfy_nodes, name)
    assert handle["format"] == fmt and len(rows) == 3
    assert inputs.shape == edits.shape == (2, *SIZE, 3)
    by_instruction = {row.instruction: row for row in rows}
    assert sorted(by_instruction) == sorted(INSTRUCTIONS)
    sources, targets = save_image_bytes(probe_pixels(1)), save_image_bytes(probe_pixels(2))
    masks = save_image_bytes(probe_pixels(3)[..., 1])  # ImageToMask's green channel
    for index, instruction in enumerate(INSTRUCTIONS):
        row = by_instruction[instruction]
        assert (row.input_caption, row.output_caption) == ("a photo of a dog", "a photo of a dog, edited")
        assert np.array_equal(decoded_png(row.input_image), sources[index])
        assert np.array_equal(decoded_png(row.edited_image), targets[index])
        assert np.array_equal(decoded_png(row.mask), masks[index])
    assert "masks: 3 of 3 rows" in comfy_nodes["DatasetInfo"].execute(handle, 10).result[0]
    # the loaded rows are a lazy sequence: Save Edit Dataset copies it like a list
    copied = comfy_nodes["SaveEditDataset"].execute(rows, f"{name}_copy", "public", "png").result
    assert copied[1] == 3 and len(load(comfy_nodes, f"{name}_copy", preview_count=0)[1]) == 3
    # truncation, not rounding: the test images hold values where the two differ
    assert not np.array_equal(sources, np.round(255.0 * probe_pixels(1).numpy()).astype(np.uint8))

    again = checked(run_prompt(rows_graph(name, fmt)))
    assert again.outputs["6"]["text"] == [f"0 new rows, 3 in total, in output/{name} ({fmt})"]
    assert len(load(comfy_nodes, name, preview_count=0)[1]) == 3


def run_rows(comfy_nodes, inputs: torch.Tensor, edits: torch.Tensor, instructions: str = "snow", mask=None,
             **captions):
    return comfy_nodes["EditRowsFromImages"].execute(inputs, edits, instructions, mask=mask, **captions).result


def test_one_input_image_serves_a_batch_and_one_line_serves_every_image(comfy_nodes):
    source, edits = probe_pixels(4, batch=1), probe_pixels(5, batch=3)
    mask = torch.zeros(1, *SIZE)
    mask[:, 4:10, 8:20] = 1.0
    rows, summary = run_rows(comfy_nodes, source, edits, "make it winter\n\n", mask=mask,
                             input_captions="a house\na barn\na shed")
    assert [r.instruction for r in rows] == ["make it winter"] * 3
    assert [r.input_caption for r in rows] == ["a house", "a barn", "a shed"]
    assert [r.output_caption for r in rows] == ["", "", ""]
    assert all(np.array_equal(np.asarray(r.input_image), save_image_bytes(source)[0]) for r in rows)
    assert all(np.asarray(r.mask).max() == 255 and np.asarray(r.mask).sum() == 255 * 6 * 12 for r in rows)
    assert "3 caption pairs, with masks" in summary
    gray, rgba = probe_pixels(6, batch=1, channels=1), probe_pixels(7, batch=1, channels=4)
    (row,), _ = run_rows(comfy_nodes, gray, rgba)
    assert np.array_equal(np.asarray(row.input_image), np.repeat(save_image_bytes(gray)[0], 3, axis=-1))
    assert np.array_equal(np.asarray(row.edited_image), save_image_bytes(rgba)[0, ..., :3])


@pytest.mark.parametrize(("edits", "instructions", "mask", "message"), [
    (probe_pixels(1, batch=3), "snow", None, "2 input images for 3 edited images: give one input image per"),
    (torch.rand(2, 32, 32, 3), "snow", None, "the input images are 40x24 but the edited images are 32x32"),
    (probe_pixels(1, batch=2), "a\nb\nc", None, "3 lines of instructions for 2 edited images"),
    (probe_pixels(1, batch=2), " \n", None, "no instructions"),
    (probe_pixels(1, batch=2), "snow", torch.rand(3, *SIZE), "3 masks for 2 edited images"),
    (probe_pixels(1, batch=2), "snow", torch.rand(1, 8, 8), "the mask is 8x8 but the images are 40x24"),
])
def test_counts_and_sizes_that_do_not_match_are_refused_naming_the_node(comfy_nodes, edits, instructions, mask,
                                                                         message):
    with pytest.raises(ValueError, match=r"^EditRowsFromImages: ") as caught:
        run_rows(comfy_nodes, probe_pixels(0, batch=2), edits, instructions, mask=mask)
    assert message in str(caught.value)


def test_a_mismatch_through_the_executor_is_our_node_error(comfy_nodes, probes):
    graph = {"1": probe_image(seed=1, batch=2), "2": probe_image(seed=2, batch=3),
             "5": {"class_type": "EditRowsFromImages", "inputs": {"input_images": ["1", 0], "edited_images": ["2", 0],
                                                                  "instructions": "snow"}},
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}}
    result = run_prompt(graph)
    assert not result.ok and result.error["node_type"] == "EditRowsFromImages"
    assert result.error["exception_message"].startswith("EditRowsFromImages: 2 input images for 3 edited images")


# --- DatasetInfo --------------------------------------------------------------------------------------------------


def info_graph(name: str, bins: int = 20) -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": "none", "format": "auto", "max_rows": 0,
                                                              "preview_count": 0,
                                                              "dataset_override": f"output/{name}"}},
            "2": {"class_type": "DatasetInfo", "inputs": {"dataset": ["1", 0], "bins": bins}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
            "4": {"class_type": "IP2PProbeInspect", "inputs": {"images": ["2", 1]}},
            "5": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
            "6": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}


def scored_dataset(comfy_base, comfy_nodes, fmt: str, scores: list[float] | None) -> str:
    name = unique(f"info_{fmt}")
    rows = random_rows(2, 4, size=32)
    if scores is not None:
        rows = [dataclasses.replace(r, clip_sim_dir=s, clip_sim_image=0.8) for r, s in zip(rows, scores, strict=True)]
    write_rows(rows, comfy_base / "output", name, fmt)
    return name


@pytest.mark.parametrize("fmt", ["diffusers", "reference"])
def test_dataset_info_reports_rows_columns_and_draws_the_scores(comfy_base, comfy_nodes, probes, fmt):
    low = [0.05, 0.1, 0.1, 0.12, 0.2, 0.21, 0.3, 0.31]
    name = scored_dataset(comfy_base, comfy_nodes, fmt, low)
    result = checked(run_prompt(info_graph(name)))
    report = result.outputs["3"]["text"][0]
    assert f"dataset: output/{name} ({fmt})" in report and "rows: 8" in report
    assert "clip_sim_dir: 8 of 8 rows, mean 0.1738" in report and "clip_sim_0: none" in report
    assert inspected(result, "4")["shape"] == [1, 500, 800, 3]
    assert result.outputs["5"]["text"] == ["8"] and result.outputs["6"]["text"] == ["8"]
    if fmt == "diffusers":
        assert "columns: input_image, edit_prompt, edited_image" in report

    info = comfy_nodes["DatasetInfo"]
    handle = load(comfy_nodes, name, preview_count=0)[0]
    first = info.execute(handle, 20).result
    higher = scored_dataset(comfy_base, comfy_nodes, fmt, [0.05, 0.1, 0.1, 0.12, 0.5, 0.55, 0.6, 0.62])
    other = info.execute(load(comfy_nodes, higher, preview_count=0)[0], 20).result
    assert not torch.equal(first[1], other[1]), "other scores must draw another histogram"
    assert first[0].split("CLIP scores:")[1] != other[0].split("CLIP scores:")[1]
    assert torch.equal(info.execute(handle, 20).result[1], first[1])


def test_dataset_info_without_scores_and_masks_says_so(comfy_base, comfy_nodes):
    name = scored_dataset(comfy_base, comfy_nodes, "diffusers", None)
    report, histogram, rows, scored = comfy_nodes["DatasetInfo"].execute(load(comfy_nodes, name, preview_count=0)[0],
                                                                          40).result
    assert (rows, scored) == (8, 0) and "CLIP scores: none" in report and "masks: no" in report
    assert histogram.shape == (1, 500, 800, 3)
    # panels hold only frames and notes: almost every pixel is the white background
    assert float((histogram == 1.0).all(dim=-1).float().mean()) > 0.9


@pytest.mark.parametrize("handle", [{"path": "/etc", "format": "auto"}, {"path": "../../etc", "format": "auto"},
                                    {"format": "auto"}, "output/x", {"path": "x", "format": "nope"}])
def test_dataset_info_refuses_a_forged_handle(comfy_nodes, handle):
    with pytest.raises(ValueError, match=r"^DatasetInfo: "):
        comfy_nodes["DatasetInfo"].execute(handle, 10)
