"""Pictures of a run: the loss curve and the validation grid (PIL only, no plotting library)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..dataset.pixels import tensor_to_image

BACKGROUND, AXES, RAW, SMOOTH = (255, 255, 255), (60, 60, 60), (170, 190, 230), (20, 70, 170)


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: readable trend from noisy per-step losses."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        out.append(average / (1.0 - weight**n))
    return out


def loss_curve(losses: Sequence[float], width: int = 640, height: int = 320) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 56, width - 12, 28, height - 28
    draw.rectangle([left, top, right, bottom], outline=AXES)
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=AXES, font=font)
        return image
    trend = smoothed(losses)
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * (value - low) / span

    for series, colour, line in ((losses, RAW, 1), (trend, SMOOTH, 2)):
        points = [point(i, v) for i, v in enumerate(series)]
        if len(points) == 1:
            points = points * 2
        draw.line(points, fill=colour, width=line)
    draw.text((left, 8), f"training loss: {len(losses)} steps, last {trend[-1]:.4g} (smoothed)", fill=AXES,
              font=font)
    draw.text((4, top - 6), f"{high:.3g}", fill=AXES, font=font)
    draw.text((4, bottom - 6), f"{low:.3g}", fill=AXES, font=font)
    draw.text((left, bottom + 6), "1", fill=AXES, font=font)
    draw.text((right - 40, bottom + 6), f"{len(losses)}", fill=AXES, font=font)
    return image


def validation_grid(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                    edits: Sequence[tuple[int, Sequence[torch.Tensor]]], instructions: Sequence[str]) -> Image.Image:
    """One row per validation sample: input, target, then the model's edit after each validated step.

    Every image is [3, H, W] in [0, 1], as the trainer holds it."""
    tiles = [_picture(t) for t in inputs]
    side = max(128, *(max(t.size) for t in tiles))
    header, label = 18, 14
    columns = 2 + len(edits)
    grid = Image.new("RGB", (columns * side, header + len(tiles) * (side + label)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    titles = ["input", "target", *[f"step {step}" for step, _ in edits]]
    for column, title in enumerate(titles):
        draw.text((column * side + 4, 3), title, fill=AXES, font=font)
    for row, instruction in enumerate(instructions):
        y = header + row * (side + label)
        cells = [inputs[row], targets[row], *[images[row] for _, images in edits]]
        for column, cell in enumerate(cells):
            grid.paste(_picture(cell).resize((side, side)), (column * side, y))
        draw.text((4, y + side), instruction[:80], fill=AXES, font=font)
    return grid


def _picture(image: torch.Tensor) -> Image.Image:
    return tensor_to_image(image.permute(1, 2, 0))
