"""Small synthetic datasets in the exact layouts the field publishes, for tests: `write_layout`.

The hub schemas are written out here by hand from the dataset cards (not taken from dataset/layouts.py), so a
wrong column name or dtype in the product's table fails the tests instead of agreeing with itself:

- public     timbrooks/instructpix2pix-clip-filtered: original_prompt, original_image, edit_prompt,
             edited_prompt, edited_image
- diffusers  the column defaults of diffusers' train_instruct_pix2pix.py: input_image, edit_prompt, edited_image
- magicbrush osunlp/MagicBrush: img_id (string), turn_index (int32), source_img, mask_img, instruction,
             target_img; mask_img is the source image as RGBA whose edited region is transparent
- hq-edit    UCSC-VLAA/HQ-Edit: input, input_image, edit, inverse_edit, output, output_image
- ultraedit  BleachNick/UltraEdit(_500k): clip_sim_source, clip_sim_target, clip_sim_dir, clip_sim_image,
             dinov2_sim, ssim (float64), source_caption, target_caption (string), idx (int64), edit_prompt,
             edit_object, source_image, edited_image, mask_image; edit_object and mask_image are null columns
             (free-form) unless a row has a mask (then the region-based set's string / Image)
- pairs      a plain folder: <name>_input.png, <name>_edited.png [, <name>_mask.png] and pairs.csv (or
             pairs.jsonl) with name, instruction, input_caption, output_caption

Images are stored as the `datasets` Image feature stores them in parquet, struct<bytes: binary, path: string>
(PNG bytes, pixel-exact; encoded bytes given in a row go in unchanged), with the `huggingface` schema metadata.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..dataset.records import EditRow, encode_image, encoded_format, open_image, raw_bytes

LAYOUTS_ON_HUB: tuple[str, ...] = ("public", "diffusers", "magicbrush", "hq-edit", "ultraedit", "pairs")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_FEATURE_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float64(): "float64",
                   pa.null(): "null"}


def write_layout(layout: str, folder: Path, rows: list[EditRow], shards: int = 1, *, split: str = "train",
                 row_group_size: int = 100, index: str = "csv") -> Path:
    """Write `rows` as a dataset in `layout` under `folder` (created); returns the path to load.

    Parquet layouts: `folder/data/<split>-0000k-of-0000N.parquet` for k < shards, row groups of
    `row_group_size` rows (datasets writes image data in batches of 100). "pairs": `index` "csv" or "jsonl".
    Fields a layout has no column for are dropped; a missing caption is written as "" where the layout has
    the column. MagicBrush: img_id is the row's position ("000000", ...), turn_index its seed (1 when
    seedless). UltraEdit: idx is the row's seed (its position when seedless). HQ-Edit: inverse_edit is
    "undo: <instruction>".
    """
    if layout not in LAYOUTS_ON_HUB:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS_ON_HUB)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "pairs":
        return _write_pairs(folder, rows, index)
    table = _table(layout, rows)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    shards = max(1, min(shards, len(rows))) if rows else 1
    bounds = np.linspace(0, len(rows), shards + 1).round().astype(int)
    for k in range(shards):
        part = table.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k]))
        pq.write_table(part, data / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=row_group_size)
    return folder


def hub_schema(layout: str, with_masks: bool = False) -> pa.Schema:
    """The layout's parquet schema as the hub's files carry it, with the `huggingface` features metadata."""
    fields = _HUB_FIELDS[layout](with_masks)
    features = {}
    for name, kind in fields:
        features[name] = {"_type": "Image"} if kind == IMAGE_TYPE else {"dtype": _FEATURE_DTYPES[kind],
                                                                        "_type": "Value"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([pa.field(name, kind) for name, kind in fields], metadata=metadata)


_HUB_FIELDS = {
    "public": lambda masks: [("original_prompt", pa.string()), ("original_image", IMAGE_TYPE),
                             ("edit_prompt", pa.string()), ("edited_prompt", pa.string()),
                             ("edited_image", IMAGE_TYPE)],
    "diffusers": lambda masks: [("input_image", IMAGE_TYPE), ("edit_prompt", pa.string()),
                                ("edited_image", IMAGE_TYPE)],
    "magicbrush": lambda masks: [("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE_TYPE),
                                 ("mask_img", IMAGE_TYPE), ("instruction", pa.string()),
                                 ("target_img", IMAGE_TYPE)],
    "hq-edit": lambda masks: [("input", pa.string()), ("input_image", IMAGE_TYPE), ("edit", pa.string()),
                              ("inverse_edit", pa.string()), ("output", pa.string()),
                              ("output_image", IMAGE_TYPE)],
    "ultraedit": lambda masks: [("clip_sim_source", pa.float64()), ("clip_sim_target", pa.float64()),
                                ("clip_sim_dir", pa.float64()), ("clip_sim_image", pa.float64()),
                                ("dinov2_sim", pa.float64()), ("ssim", pa.float64()),
                                ("source_caption", pa.string()), ("target_caption", pa.string()),
                                ("idx", pa.int64()), ("edit_prompt", pa.string()),
                                ("edit_object", pa.string() if masks else pa.null()),
                                ("source_image", IMAGE_TYPE), ("edited_image", IMAGE_TYPE),
                                ("mask_image", IMAGE_TYPE if masks else pa.null())],
}


def _table(layout: str, rows: list[EditRow]) -> pa.Table:
    with_masks = any(row.mask is not None for row in rows)
    schema = hub_schema(layout, with_masks)
    records = [_RECORDS[layout](i, row) for i, row in enumerate(rows)]
    return pa.Table.from_pylist(records, schema=schema)


def image_cell(source: Any, name: str) -> dict[str, Any] | None:
    """An image as the Image feature's parquet cell: encoded bytes (PNG unless already encoded) and a name."""
    if source is None:
        return None
    raw = raw_bytes(source)
    data = raw if raw is not None and encoded_format(raw) is not None else encode_image(source, "PNG")
    return {"bytes": data, "path": name}


def magicbrush_mask(mask: Any, source: Any) -> bytes:
    """Our mask (white = edit) as MagicBrush stores it: the source image as RGBA, the edited region transparent."""
    image = open_image(source).convert("RGBA")
    edit = np.asarray(open_image(mask).convert("L").resize(image.size, Image.NEAREST)) > 127
    pixels = np.asarray(image).copy()
    pixels[..., 3] = np.where(edit, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _public(i: int, row: EditRow) -> dict[str, Any]:
    return {"original_prompt": row.input_caption, "original_image": image_cell(row.input_image, f"{i}_0.png"),
            "edit_prompt": row.instruction, "edited_prompt": row.output_caption,
            "edited_image": image_cell(row.edited_image, f"{i}_1.png")}


def _diffusers(i: int, row: EditRow) -> dict[str, Any]:
    return {"input_image": image_cell(row.input_image, f"{i}_input.png"), "edit_prompt": row.instruction,
            "edited_image": image_cell(row.edited_image, f"{i}_edited.png")}


def _magicbrush(i: int, row: EditRow) -> dict[str, Any]:
    mask = None
    if row.mask is not None:
        mask = {"bytes": magicbrush_mask(row.mask, row.input_image), "path": f"{i}_mask.png"}
    return {"img_id": f"{i:06d}", "turn_index": 1 if row.seed is None else row.seed,
            "source_img": image_cell(row.input_image, f"{i}_source.png"), "mask_img": mask,
            "instruction": row.instruction, "target_img": image_cell(row.edited_image, f"{i}_target.png")}


def _hq_edit(i: int, row: EditRow) -> dict[str, Any]:
    return {"input": row.input_caption, "input_image": image_cell(row.input_image, f"{i}_input.png"),
            "edit": row.instruction, "inverse_edit": f"undo: {row.instruction}", "output": row.output_caption,
            "output_image": image_cell(row.edited_image, f"{i}_output.png")}


def _ultraedit(i: int, row: EditRow) -> dict[str, Any]:
    return {"clip_sim_source": row.clip_sim_0, "clip_sim_target": row.clip_sim_1, "clip_sim_dir": row.clip_sim_dir,
            "clip_sim_image": row.clip_sim_image, "dinov2_sim": 0.9, "ssim": 0.5,
            "source_caption": row.input_caption, "target_caption": row.output_caption,
            "idx": i if row.seed is None else row.seed, "edit_prompt": row.instruction,
            "edit_object": "object" if row.mask is not None else None,
            "source_image": image_cell(row.input_image, f"{i}_source.png"),
            "edited_image": image_cell(row.edited_image, f"{i}_edited.png"),
            "mask_image": image_cell(row.mask, f"{i}_mask.png")}


_RECORDS = {"public": _public, "diffusers": _diffusers, "magicbrush": _magicbrush, "hq-edit": _hq_edit,
            "ultraedit": _ultraedit}


def _write_pairs(folder: Path, rows: list[EditRow], index: str) -> Path:
    if index not in ("csv", "jsonl"):
        raise ValueError(f"index must be 'csv' or 'jsonl', got {index!r}")
    records = []
    for i, row in enumerate(rows):
        name = f"pair_{i:05d}"
        for part, image in (("input", row.input_image), ("edited", row.edited_image), ("mask", row.mask)):
            if image is not None:
                (folder / f"{name}_{part}.png").write_bytes(encode_image(image, "PNG"))
        records.append({"name": name, "instruction": row.instruction, "input_caption": row.input_caption,
                        "output_caption": row.output_caption})
    if index == "csv":
        with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["name", "instruction", "input_caption", "output_caption"])
            writer.writeheader()
            writer.writerows(records)
    else:
        with open(folder / "pairs.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
    return folder


def tiny_rows(count: int = 4, size: int = 16, seed: int = 0, masks: bool = True) -> list[EditRow]:
    """Seeded random rows with distinct captions, seeds, CLIP scores and (every other row) a binary mask."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        edit = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = None
        if masks and i % 2 == 0:
            mask = Image.fromarray(np.where(rng.random((size, size)) > 0.5, 255, 0).astype(np.uint8), "L")
        rows.append(EditRow(f"a photo of house {i}", f"make house {i} snowy", f"a photo of snowy house {i}",
                            Image.fromarray(base), Image.fromarray(edit), mask=mask, seed=10 + i,
                            clip_sim_0=0.2 + i / 100, clip_sim_1=0.25 + i / 100, clip_sim_dir=0.3 + i / 100,
                            clip_sim_image=0.9 - i / 100))
    return rows


__all__ = ["LAYOUTS_ON_HUB", "hub_schema", "image_cell", "magicbrush_mask", "tiny_rows", "write_layout"]
