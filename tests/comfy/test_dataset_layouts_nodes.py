"""Every public dataset layout through the nodes: a small synthetic dataset with exactly the hub's columns and
dtypes (testing/public_layouts.py) loads through Load Edit Dataset with the format detected, previews, is
described by Dataset Info and trains 2 steps through TrainIP2P; a parquet of another layout loads through a
column mapping, and a wrong mapping is refused listing the columns the file has."""

from __future__ import annotations

import shutil
import uuid

import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing import probe_nodes
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.probe_nodes import inspected
from comfyui_ip2p.testing.public_layouts import LAYOUTS_ON_HUB, tiny_rows, write_layout
from comfyui_ip2p.testing.threads import torch_threads

ROWS = 4
TRAIN = {"mode": "lora", "steps": 2, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-4,
         "resolution": 32, "seed": 0, "ema_decay": 0.0, "cache_latents": False, "gradient_checkpointing": False,
         "lora_rank": 2, "checkpoint_every": 0, "validation_every": 0, "resume": False, "validation_count": 0,
         "validation_steps": 1}
# HQ-Edit's columns under other names: no known layout matches, so only a mapping reads it.
RENAMED = {"input": "caption_before", "input_image": "before", "edit": "prompt", "inverse_edit": "undo",
           "output": "caption_after", "output_image": "after"}
MAPPING = "input_image=before, edited_image=after, instruction=prompt, input_caption=caption_before"
CREATED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: a second thread gains little and spins on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def probes(comfy_nodes):
    probe_nodes.register()


@pytest.fixture(scope="module", autouse=True)
def remove_runs(comfy_base):
    yield
    for name in CREATED:
        shutil.rmtree(comfy_base / "input" / name, ignore_errors=True)
        shutil.rmtree(comfy_base / "output" / "ip2p_train" / name, ignore_errors=True)
        (comfy_base / "models" / "loras" / f"{name}.safetensors").unlink(missing_ok=True)


def unique(prefix: str) -> str:
    CREATED.append(f"{prefix}_{uuid.uuid4().hex[:6]}")
    return CREATED[-1]


def mapped_dataset(comfy_base, name: str) -> None:
    """A parquet folder whose columns are HQ-Edit's renamed: a layout nobody published."""
    folder = write_layout("hq-edit", comfy_base / "input" / name, tiny_rows(ROWS, size=32))
    for shard in (folder / "data").glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.rename_columns([RENAMED[c] for c in table.column_names]), shard)


def layout_graph(name: str, fmt: str, ckpt: str, mapping: str = "") -> dict:
    return {
        "1": {"class_type": "IP2PProbeCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": "none", "format": fmt, "max_rows": 0,
                                                          "preview_count": 2, "dataset_override": f"input/{name}",
                                                          "column_mapping": mapping}},
        "3": {"class_type": "DatasetInfo", "inputs": {"dataset": ["2", 0], "bins": 10}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"class_type": "IP2PProbeInspect", "inputs": {"images": ["2", 2]}},
        "6": {"class_type": "IP2PProbeInspect", "inputs": {"images": ["2", 3]}},
        "7": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                    "dataset": ["2", 0], "checkpoint_name": name, **TRAIN}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 3]}},
    }


@pytest.mark.parametrize("layout", [*LAYOUTS_ON_HUB, "mapped"])
def test_each_public_layout_loads_previews_reports_and_trains(comfy_base, comfy_nodes, probes, tiny_ip2p_ckpt,
                                                             layout):
    name = unique(f"layout_{layout.replace('-', '_')}")
    if layout == "mapped":
        mapped_dataset(comfy_base, name)
    else:
        write_layout(layout, comfy_base / "input" / name, tiny_rows(ROWS, size=32))
    mapping = MAPPING if layout == "mapped" else ""

    loader = comfy_nodes["LoadEditDataset"]
    assert f"input/{name}" in loader.INPUT_TYPES()["required"]["dataset"][1]["options"], "listed for picking"
    handle, rows, inputs, edits = loader.execute(
        "none", "auto", 0, 2, dataset_override=f"input/{name}", column_mapping=mapping).result
    assert handle["format"] == layout and len(rows) == ROWS
    assert (handle["mapping"] is not None) == (layout == "mapped")
    assert inputs.shape == edits.shape == (2, 32, 32, 3)
    assert {r.instruction for r in rows} == {f"make house {i} snowy" for i in range(ROWS)}

    result = checked(run_prompt(layout_graph(name, "auto", tiny_ip2p_ckpt, mapping)))
    report = result.outputs["4"]["text"][0]
    assert f"dataset: input/{name} ({layout})" in report and f"rows: {ROWS}" in report
    if layout == "ultraedit":  # the only published layout here that carries CLIP scores
        assert f"clip_sim_dir: {ROWS} of {ROWS} rows" in report
    # tiny_rows gives every other row a mask; these layouts keep it
    assert ("masks: 2 of 4 rows" if layout in ("magicbrush", "ultraedit", "pairs") else "masks: no") in report
    assert inspected(result, "5")["shape"] == inspected(result, "6")["shape"] == [2, 32, 32, 3]
    assert result.outputs["8"]["text"] == [f"{name}.safetensors"]
    assert (comfy_base / "models" / "loras" / f"{name}.safetensors").is_file()


def test_a_wrong_column_mapping_lists_the_columns_found(comfy_base, comfy_nodes):
    name = unique("layout_wrong_mapping")
    mapped_dataset(comfy_base, name)
    load = comfy_nodes["LoadEditDataset"]
    for mapping in ("", "input_image=source_img, edited_image=target_img, instruction=instruction"):
        with pytest.raises(ValueError, match=r"^LoadEditDataset: ") as caught:
            load.execute("none", "auto", 0, 1, dataset_override=f"input/{name}", column_mapping=mapping)
        assert all(column in str(caught.value) for column in RENAMED.values()), str(caught.value)
    with pytest.raises(ValueError, match=r"^LoadEditDataset: the column mapping part 'before' has no '='"):
        load.execute("none", "auto", 0, 1, dataset_override=f"input/{name}", column_mapping="before")


def test_loading_reads_only_the_previewed_rows_and_info_decodes_no_image(comfy_base, comfy_nodes):
    """A broken image past the previews: loading and Dataset Info never touch it; only using that row fails."""
    from comfyui_ip2p.dataset.records import open_image

    name = unique("layout_lazy")
    folder = write_layout("pairs", comfy_base / "input" / name, tiny_rows(ROWS, size=32))
    (folder / "pair_00003_input.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    handle, rows, inputs, _ = comfy_nodes["LoadEditDataset"].execute(
        "none", "auto", 0, 2, dataset_override=f"input/{name}").result
    # (ComfyUI imports the pack under its custom_nodes name, so the class is compared by name)
    assert type(rows).__name__ == "RowSource" and len(rows) == ROWS and inputs.shape[0] == 2
    assert len(comfy_nodes["LoadEditDataset"].execute("none", "auto", 3, 0,
                                                      dataset_override=f"input/{name}").result[1]) == 3
    report = comfy_nodes["DatasetInfo"].execute(handle, 10).result[0]
    assert f"rows: {ROWS}" in report and "masks: 2 of 4 rows" in report
    with pytest.raises(OSError):
        open_image(rows[3].input_image)
    loader = comfy_nodes["LoadEditDataset"]
    stamp = loader.fingerprint_inputs(dataset="none", dataset_override=f"input/{name}")
    index = folder / "pairs.csv"
    index.write_text(index.read_text().replace("snowy", "rainy"))
    assert loader.fingerprint_inputs(dataset="none", dataset_override=f"input/{name}") != stamp, "edited in place"


def test_ultraedit_free_form_files_have_a_null_mask_column_and_no_masks(comfy_base, comfy_nodes):
    name = unique("layout_ultraedit_free")
    write_layout("ultraedit", comfy_base / "input" / name, tiny_rows(ROWS, size=32, masks=False))
    handle, rows, _, _ = comfy_nodes["LoadEditDataset"].execute("none", "auto", 0, 0,
                                                                dataset_override=f"input/{name}").result
    report = comfy_nodes["DatasetInfo"].execute(handle, 10).result[0]
    assert handle["format"] == "ultraedit" and "masks: no" in report and "mask_image" in report
    assert all(row.mask is None for row in rows)
