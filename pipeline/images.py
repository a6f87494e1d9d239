"""Image geometry shared by the edit nodes: the reference implementation's resize, and back; the guidance grid."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..dataset.pixels import image_to_tensor, tensor_to_image


def reference_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The InstructPix2Pix reference resize: longest side near `resolution`, both sides multiples of 64.

    f = R / max(w, h); f = ceil(min(w, h) * f / 64) * 64 / min(w, h); side = floor(side * f / 64) * 64.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    if resolution < 64:
        raise ValueError(f"resolution must be at least 64, got {resolution}")
    factor = resolution / max(width, height)
    factor = math.ceil(min(width, height) * factor / 64) * 64 / min(width, height)
    new_w = int(width * factor / 64) * 64
    new_h = int(height * factor / 64) * 64
    return max(new_w, 64), max(new_h, 64)


# How an image is brought to the edit's size when the aspect differs: `stretch` resizes the whole image to it
# (the default, what this pack always did); `crop` is the reference's ImageOps.fit: the largest centred box of the
# edit's aspect, resized to it, the rest cut off.
FRAMINGS = ("stretch", "crop")


def fit_box(width: int, height: int, out_width: int, out_height: int) -> tuple[float, float, float, float]:
    """The source box (left, top, right, bottom), fractional, that PIL's ImageOps.fit(..., centering=(0.5, 0.5))
    resizes to `out_width` x `out_height`: the largest centred box of the output's aspect.

    Same arithmetic in the same order as Pillow's, so a resize of this box is the reference's pixels exactly.
    """
    input_ratio, output_ratio = width / height, out_width / out_height
    if input_ratio == output_ratio:
        crop_width, crop_height = float(width), float(height)
    elif input_ratio >= output_ratio:
        crop_width, crop_height = output_ratio * height, float(height)
    else:
        crop_width, crop_height = float(width), width / output_ratio
    left, top = (width - crop_width) * 0.5, (height - crop_height) * 0.5
    return left, top, left + crop_width, top + crop_height


def box_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A fractional box rounded to whole pixels (x0, y0, x1, y1), inside a width x height image, never empty."""
    x0, y0 = min(max(0, math.floor(box[0] + 0.5)), width - 1), min(max(0, math.floor(box[1] + 0.5)), height - 1)
    x1, y1 = min(width, math.floor(box[2] + 0.5)), min(height, math.floor(box[3] + 0.5))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def resize_lanczos(images: torch.Tensor, width: int, height: int,
                   box: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """Lanczos resize of a ComfyUI IMAGE batch [B, H, W, C] in [0, 1], per channel in float (no 8-bit loss).

    With `box` (left, top, right, bottom, fractional, in source pixels) only that part is resized, as PIL's
    resize(box=...) and ImageOps.fit do.
    """
    if box is None and images.shape[1] == height and images.shape[2] == width:
        return images
    array = images.detach().cpu().float().numpy()
    out = np.empty((array.shape[0], height, width, array.shape[3]), dtype=np.float32)
    for b in range(array.shape[0]):
        for c in range(array.shape[3]):
            channel = Image.fromarray(array[b, :, :, c], mode="F")
            out[b, :, :, c] = np.asarray(channel.resize((width, height), Image.Resampling.LANCZOS, box=box))
    return torch.from_numpy(out).clamp_(0.0, 1.0).to(images.dtype)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """RGBA -> RGB (alpha dropped, as the reference's PIL convert does), grayscale -> RGB."""
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(*images.shape[:-1], 3).contiguous()
    if channels == 4:
        return images[..., :3].contiguous()
    raise ValueError(f"expected 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {channels}: "
                     "convert the image to RGB first")


# The guidance widgets' range: larger scales only push the latents to inf/NaN.
MAX_SCALE = 100.0


def parse_scales(text: str, name: str) -> list[float]:
    """'1.0, 1.5, 2' -> [1.0, 1.5, 2.0]; refuses empty lists, non-numbers, negatives and NaN."""
    values = []
    for raw in text.replace(";", ",").split(","):
        part = raw.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a number; write values like '1.0, 1.5, 2.0'") from None
        if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
            raise ValueError(f"{name}: {part!r} must be a number from 0 to {MAX_SCALE:g} (typical: 1-10)")
        values.append(value)
    if not values:
        raise ValueError(f"{name}: give at least one value, like '1.0, 1.5, 2.0'")
    if len(values) > 16:
        raise ValueError(f"{name}: at most 16 values, got {len(values)}")
    return values


def guidance_grid(cells: torch.Tensor, row_scales: list[float], column_scales: list[float]) -> torch.Tensor:
    """Lays out [rows*cols, H, W, 3] cells as one labelled image: rows s_I, columns s_T."""
    from PIL import ImageDraw

    rows, cols = len(row_scales), len(column_scales)
    height, width = cells.shape[1], cells.shape[2]
    margin_top, margin_left = 28, 84
    canvas = Image.new("RGB", (margin_left + cols * width, margin_top + rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        canvas.paste(tensor_to_image(cells[index]), (margin_left + c * width, margin_top + r * height))
    for c, scale in enumerate(column_scales):
        draw.text((margin_left + c * width + 6, 8), f"s_T = {scale:g}", fill="black")
    for r, scale in enumerate(row_scales):
        draw.text((6, margin_top + r * height + height // 2 - 6), f"s_I = {scale:g}", fill="black")
    return image_to_tensor(canvas)[None]

