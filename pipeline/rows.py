"""Rows from any workflow and a dataset at a glance, ComfyUI side.

`rows_from_images` turns IMAGE batches (inputs, edits, optional MASK) and per-image texts into EditRows, so edits
made with any nodes become a dataset through SaveEditDataset. `dataset_info` describes a dataset on disk (rows,
size, columns, masks, CLIP scores) and draws a histogram of its CLIP scores, reading only what the lazy row
source gives without decoding an image (dataset/source.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow
from ..dataset.source import RowSource, open_rows
from .train import confined_dataset

# --- EditRowsFromImages -----------------------------------------------------------------------------------------


def to_8bit(pixels: torch.Tensor) -> np.ndarray:
    """IMAGE or MASK floats as 8-bit values, exactly as ComfyUI's SaveImage writes them: clip(255 * x), then
    truncated to uint8 (not rounded), so a row saved here matches the PNG SaveImage would have written.

    NaN, which the cast would turn into an arbitrary byte, becomes 0.
    """
    array = 255.0 * pixels.detach().cpu().float().numpy()
    return np.clip(np.nan_to_num(array, nan=0.0), 0, 255).astype(np.uint8)


def pil_image(pixels: torch.Tensor) -> Image.Image:
    """One [H, W, C] IMAGE as an 8-bit RGB PIL image: 3 channels as they are, alpha (a 4th or 5th channel)
    dropped, one or two channels (gray, gray + alpha) as gray."""
    array = to_8bit(pixels)
    if array.shape[-1] >= 3:
        return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")
    return Image.fromarray(np.ascontiguousarray(array[..., 0]), "L").convert("RGB")


def pil_mask(mask: torch.Tensor) -> Image.Image:
    """One [H, W] MASK as an 8-bit gray PIL image (255 = edit here)."""
    return Image.fromarray(np.ascontiguousarray(to_8bit(mask)), "L")


def per_image_texts(text: str, count: int, what: str, required: bool) -> list[str]:
    """One text per image from a multiline string: no line (when not required), one line for all, or one per
    image. Blank lines are ignored, so a trailing newline or a spacer line does not change the count."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        if required:
            raise ValueError(f"no {what}: write one line for all {count} edited images or one line per image")
        return [""] * count
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} lines of {what} for {count} edited images: write one line for all of them "
                         f"or exactly one line per edited image, in the batch's order")
    return lines


def _as_batch(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be an IMAGE batch [batch, height, width, channels], got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch: connect the node that makes the images")
    if images.shape[-1] < 1 or images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{what} has no pixels ({tuple(images.shape)})")
    return images


def _size(images: torch.Tensor) -> str:
    return f"{images.shape[2]}x{images.shape[1]}"


def _paired_inputs(inputs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
    """The input image of every edit: one input per edit, or one input for the whole batch (as CLIPEditMetrics)."""
    if inputs.shape[0] not in (1, edits.shape[0]):
        raise ValueError(f"{inputs.shape[0]} input images for {edits.shape[0]} edited images: give one input image "
                         "per edited image (in the same order) or a single input image for all of them")
    if inputs.shape[1:3] != edits.shape[1:3]:
        raise ValueError(f"the input images are {_size(inputs)} but the edited images are {_size(edits)} (width x "
                         "height): each pair must have one size; resize or crop one side (e.g. with Upscale Image "
                         "or ImageScale) to the other's size")
    return inputs.expand(edits.shape[0], -1, -1, -1) if inputs.shape[0] == 1 else inputs


def _paired_masks(mask: torch.Tensor | None, edits: torch.Tensor) -> list[Image.Image | None]:
    count = edits.shape[0]
    if mask is None:
        return [None] * count
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise ValueError("mask must be a MASK [batch, height, width]")
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape[0] not in (1, count):
        raise ValueError(f"{mask.shape[0]} masks for {count} edited images: give one mask for all of them or one "
                         "per edited image")
    if mask.shape[1:3] != edits.shape[1:3]:
        raise ValueError(f"the mask is {mask.shape[2]}x{mask.shape[1]} but the images are {_size(edits)} (width x "
                         "height): make the mask at the images' size (e.g. Image To Mask of the input image)")
    masks = [pil_mask(m) for m in mask]
    return masks * count if len(masks) == 1 else masks


@dataclass
class Texts:
    """The multiline text inputs of EditRowsFromImages, before they are matched to the images."""

    instructions: str
    input_captions: str = ""
    output_captions: str = ""


def rows_from_images(input_images: torch.Tensor, edited_images: torch.Tensor, texts: Texts,
                     mask: torch.Tensor | None = None) -> tuple[list[EditRow], str]:
    """One EditRow per edited image, and a summary.

    Rows have no seed: their key inside a caption pair is their content id (records.sample_id, a hash of both
    images' pixels), so running the same graph again and saving into the same dataset adds no duplicates, while
    a new edit of the same image is a new row.
    """
    edits = _as_batch(edited_images, "edited_images")
    inputs = _paired_inputs(_as_batch(input_images, "input_images"), edits)
    count = edits.shape[0]
    instructions = per_image_texts(texts.instructions, count, "instructions", required=True)
    input_captions = per_image_texts(texts.input_captions, count, "input_captions", required=False)
    output_captions = per_image_texts(texts.output_captions, count, "output_captions", required=False)
    masks = _paired_masks(mask, edits)
    # One input image serving the whole batch is converted once; its rows share the PIL image (never mutated).
    shared = pil_image(inputs[0]) if input_images.shape[0] == 1 else None
    rows = [EditRow(input_captions[i], instructions[i], output_captions[i],
                    shared if shared is not None else pil_image(inputs[i]), pil_image(edits[i]), mask=masks[i])
            for i in range(count)]
    groups = len({r.group for r in rows})
    summary = (f"{count} rows ({_size(edits)}) from {input_images.shape[0]} input and {count} edited images, "
               f"{groups} caption pair{'s' if groups != 1 else ''}, {'with' if mask is not None else 'no'} masks")
    return rows, summary


# --- DatasetInfo ------------------------------------------------------------------------------------------------

# The CLIP scores CLIPDirectionFilter stores, the paper's filter criterion first.
CLIP_SCORES = ("clip_sim_dir", "clip_sim_image", "clip_sim_0", "clip_sim_1")
PANEL_WIDTH, PANEL_HEIGHT = 400, 250
HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 2 * PANEL_WIDTH, 2 * PANEL_HEIGHT
BACKGROUND, AXES, BARS, MAIN_BARS = (255, 255, 255), (60, 60, 60), (150, 170, 210), (20, 70, 170)
MASK_SAMPLE = 64  # rows looked at for masks in a folder layout (reference, pairs)


@dataclass
class DatasetSummary:
    report: str
    histogram: torch.Tensor  # [1, HISTOGRAM_HEIGHT, HISTOGRAM_WIDTH, 3]
    rows: int
    scored: int  # rows with a clip_sim_dir score


def dataset_info(handle: object, bins: int) -> DatasetSummary:
    """What a dataset holds, from the lazy row source: counts, size, columns, masks, CLIP score statistics.

    Nothing is decoded: the row count and columns come from the index (parquet footers, seeds.json, the pairs
    list), the scores from their own column (parquet reads only that column) or metadata lines.
    """
    if not isinstance(bins, int) or not 1 <= bins <= 1000:
        raise ValueError(f"bins must be a whole number from 1 to 1000, got {bins!r}")
    checked = confined_dataset(handle)
    fmt = checked["format"]
    source = open_rows(checked["path"], None if fmt == "auto" else fmt, checked.get("mapping"))
    scores = {name: finite_scores(source, name) for name in CLIP_SCORES}
    lines = [f"dataset: {shown_path(Path(checked['path']))} ({source.format})",
             f"rows: {len(source)}",
             f"size on disk: {human_bytes(source.size_bytes)}",
             f"columns: {', '.join(source.columns) or '(none)'}",
             f"masks: {masks_text(source)}",
             *score_lines(scores, len(source))]
    return DatasetSummary("\n".join(lines), image_to_tensor(score_histogram(scores, bins))[None], len(source),
                          len(scores["clip_sim_dir"]))


def finite_scores(source: RowSource, name: str) -> list[float]:
    """The score's finite values (rows without one, or with NaN, are left out)."""
    values = source.scores(name)
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def shown_path(path: Path) -> str:
    """`output/<name>` or `input/<name>`, as Load Edit Dataset lists it (the handle holds the absolute path)."""
    for root_name in ("output", "input"):
        root = Path(folder_paths.get_directory_by_type(root_name)).resolve()
        if path.resolve().is_relative_to(root):
            return f"{root_name}/{path.resolve().relative_to(root).as_posix()}"
    return path.name


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} bytes"


def masks_text(source: RowSource) -> str:
    """Whether rows carry masks, without reading an image: the count the dataset's index gives (parquet footers,
    the pairs list), else how many of the first MASK_SAMPLE rows name a mask (a directory entry each)."""
    count = source.mask_count()
    if count is not None:
        return f"{count} of {len(source)} rows" if count else "no"
    sample = source[:MASK_SAMPLE]
    with_mask = sum(1 for row in sample if row.mask is not None)
    if len(sample) == len(source):
        return f"{with_mask} of {len(source)} rows" if with_mask else "no"
    return f"{with_mask} of the first {len(sample)} rows"


def score_lines(scores: dict[str, list[float]], rows: int) -> list[str]:
    if not any(scores.values()):
        return ["CLIP scores: none (CLIPDirectionFilter adds clip_sim_dir, clip_sim_image, clip_sim_0, clip_sim_1)"]
    lines = ["CLIP scores:"]
    for name, values in scores.items():
        if not values:
            lines.append(f"  {name}: none")
            continue
        array = np.asarray(values)
        lines.append(f"  {name}: {len(values)} of {rows} rows, mean {array.mean():.4f}, min {array.min():.4f}, "
                     f"median {np.median(array):.4f}, max {array.max():.4f}")
    return lines


def score_histogram(scores: dict[str, list[float]], bins: int) -> Image.Image:
    """One panel per CLIP score (2 x 2, clip_sim_dir top left): a histogram, or a note when there is none."""
    image = Image.new("RGB", (HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT), BACKGROUND)
    for index, (name, values) in enumerate(scores.items()):
        origin = ((index % 2) * PANEL_WIDTH, (index // 2) * PANEL_HEIGHT)
        _panel(ImageDraw.Draw(image), origin, name, values, bins)
    return image


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], name: str, values: Sequence[float],
           bins: int) -> None:
    font = ImageFont.load_default(size=12)
    x0, y0 = origin
    left, right, top, bottom = x0 + 40, x0 + PANEL_WIDTH - 12, y0 + 26, y0 + PANEL_HEIGHT - 26
    draw.rectangle([left, top, right, bottom], outline=AXES)
    if not values:
        draw.text((x0 + 8, y0 + 6), name, fill=AXES, font=font)
        draw.text((left + 8, top + 8), f"no {name} scores in this dataset", fill=AXES, font=font)
        return
    array = np.asarray(values, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:  # one value: a narrow window around it, so the bar has a place
        low, high = low - 0.05, high + 0.05
    counts, _ = np.histogram(array, bins=bins, range=(low, high))
    tallest = int(counts.max())
    width = (right - left) / bins
    colour = MAIN_BARS if name == "clip_sim_dir" else BARS
    for i, count in enumerate(counts.tolist()):
        if count:
            height = (bottom - top - 1) * count / tallest
            draw.rectangle([left + i * width, bottom - height, left + (i + 1) * width - 1, bottom], fill=colour)
    rows = f"{len(values)} row{'s' if len(values) != 1 else ''}"
    draw.text((x0 + 8, y0 + 6), f"{name}: {rows}, mean {array.mean():.3f}", fill=AXES, font=font)
    draw.text((x0 + 4, top - 2), str(tallest), fill=AXES, font=font)
    draw.text((x0 + 4, bottom - 10), "0", fill=AXES, font=font)
    draw.text((left, bottom + 6), f"{low:.3f}", fill=AXES, font=font)
    draw.text((right - 40, bottom + 6), f"{high:.3f}", fill=AXES, font=font)
