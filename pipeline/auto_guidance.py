"""Automatic guidance: edit a small s_I x s_T grid in one run, score every cell with CLIP, pick the best.

The scores are the paper's evaluation metrics through the CLIP filter's encoder (models/clip_filter): the image
similarity of each cell to the input, and the direction similarity between the image change and the text change
(from the empty prompt to the instruction, or from an input caption to an output caption). The choice itself
is the pure rule in algorithms/guidance_choice.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from ..algorithms.guidance_choice import GuidanceChoice, choose_cell
from ..dataset.clip_filter import ClipScores
from ..dataset.pixels import image_to_tensor
from . import clip_filter
from .edit import SamplingSettings
from .grid import Cell, edit_grid, grid_cells
from .settings import check_finite


@dataclass(frozen=True)
class AutoGuidance:
    edit: torch.Tensor  # [1, H, W, 3], the chosen cell's edit
    cells: torch.Tensor  # [K, H, W, 3], every cell, row by row
    scales: Cell  # the chosen (s_I, s_T)
    choice: GuidanceChoice
    scores: ClipScores
    plot: torch.Tensor  # [1, h, w, 3]
    report: str


def text_change(instruction: str, input_caption: str, output_caption: str) -> tuple[str, str]:
    """The (from, to) texts of the direction similarity: the captions when given, else "" -> instruction."""
    given = (bool(input_caption.strip()), bool(output_caption.strip()))
    if given == (True, True):
        return input_caption, output_caption
    if given == (False, False):
        return "", instruction
    raise ValueError("give both input_caption and output_caption (the text change the edit should follow), or "
                     "leave both empty to measure the change from the empty prompt to the instruction")


def auto_guidance(model, clip, vae, image: torch.Tensor, instruction: str, image_scales: Sequence[float],
                  text_scales: Sequence[float], resolution: int, settings: SamplingSettings, clip_weights: str,
                  min_image_similarity: float, input_caption: str = "", output_caption: str = "",
                  batch_size: int = 32) -> AutoGuidance:
    check_finite(min_image_similarity=min_image_similarity)
    before, after = text_change(instruction, input_caption, output_caption)
    cells = grid_cells(image_scales, text_scales)
    # The encoder is loaded before sampling: missing or broken weights should cost no sampling time.
    clip_filter.load_encoder(clip_weights)
    pixels, edits = edit_grid(model, clip, vae, image, instruction, cells, resolution, settings)
    scores, _ = clip_filter.edit_metrics(clip_weights, pixels, edits, before, after, batch_size)
    choice = choose_cell(scores.sim_dir.tolist(), scores.sim_image.tolist(), min_image_similarity)
    plot = score_plot(scores, choice, image_scales, text_scales, min_image_similarity)
    report = choice_report(scores, choice, cells, min_image_similarity, before, after)
    return AutoGuidance(edits[choice.index:choice.index + 1], edits, cells[choice.index], choice, scores, plot,
                        report)


def choice_report(scores: ClipScores, choice: GuidanceChoice, cells: Sequence[Cell], minimum: float,
                  before: str, after: str) -> str:
    s_i, s_t = cells[choice.index]
    head = (f"chose s_I = {s_i:g}, s_T = {s_t:g}: sim_dir {float(scores.sim_dir[choice.index]):.4f}, "
            f"sim_image {float(scores.sim_image[choice.index]):.4f}")
    if not choice.passed:
        head += (f" (no cell reached sim_image >= {minimum:g}: this is the most faithful one; lower "
                 "min_image_similarity or try lower text_guidance / higher image_guidance values)")
    lines = [head, f"text change: {before!r} -> {after!r}"]
    for index, (cell_i, cell_t) in enumerate(cells):
        mark = "" if choice.passing[index] else "  below min_image_similarity"
        lines.append(f"s_I {cell_i:g}, s_T {cell_t:g}: sim_dir {float(scores.sim_dir[index]):.4f}, "
                     f"sim_image {float(scores.sim_image[index]):.4f}{mark}")
    return "\n".join(lines)


CELL = 72
MARGIN_TOP, MARGIN_LEFT = 40, 84


def heat_colour(value: float, low: float, high: float) -> tuple[int, int, int]:
    """Blue (lowest sim_dir of the grid) to red (highest); a grid of equal values is all mid."""
    t = 0.5 if high - low < 1e-12 else (value - low) / (high - low)
    t = min(max(t, 0.0), 1.0) if t == t else 0.5  # NaN -> mid
    return int(40 + 200 * t), int(60 + 80 * (1 - abs(2 * t - 1))), int(240 - 200 * t)


def score_plot(scores: ClipScores, choice: GuidanceChoice, image_scales: Sequence[float],
               text_scales: Sequence[float], minimum: float) -> torch.Tensor:
    """A heat map of sim_dir (rows s_I, columns s_T) with each cell's sim_dir and sim_image written in it;
    cells below the image-similarity minimum are crossed out, the chosen cell is framed. IMAGE [1, h, w, 3]."""
    rows, cols = len(image_scales), len(text_scales)
    canvas = Image.new("RGB", (MARGIN_LEFT + cols * CELL, MARGIN_TOP + rows * CELL), "white")
    draw = ImageDraw.Draw(canvas)
    values = scores.sim_dir.tolist()
    finite = [v for v in values if v == v]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    draw.text((6, 4), f"CLIP direction similarity; x: image similarity < {minimum:g}", fill="black")
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        box = (MARGIN_LEFT + c * CELL, MARGIN_TOP + r * CELL, MARGIN_LEFT + (c + 1) * CELL - 1,
               MARGIN_TOP + (r + 1) * CELL - 1)
        draw.rectangle(box, fill=heat_colour(values[index], low, high))
        if not choice.passing[index]:
            draw.line(box, fill="gray", width=3)
            draw.line((box[0], box[3], box[2], box[1]), fill="gray", width=3)
        draw.text((box[0] + 4, box[1] + 4), f"{values[index]:.3f}", fill="white")
        draw.text((box[0] + 4, box[1] + 18), f"img {float(scores.sim_image[index]):.2f}", fill="white")
        if index == choice.index:
            draw.rectangle(box, outline="black", width=4)
    for c, scale in enumerate(text_scales):
        draw.text((MARGIN_LEFT + c * CELL + 6, MARGIN_TOP - 14), f"s_T = {scale:g}", fill="black")
    for r, scale in enumerate(image_scales):
        draw.text((6, MARGIN_TOP + r * CELL + CELL // 2 - 6), f"s_I = {scale:g}", fill="black")
    return image_to_tensor(canvas)[None]
