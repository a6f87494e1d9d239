"""Training batches from any dataset `dataset.formats` reads: joint augmentation, encoding, optional caching.

Each image pair is resized so its short side is the training resolution (long side rounded down to a
multiple of 8), then input and target get the same random crop (offsets on the 8-pixel latent grid) and the
same horizontal flip. Two interchangeable batch sources:

- `PixelBatches` decodes, augments and VAE/text-encodes every sample at every step (what diffusers' script
  does);
- `LatentBatches` encodes every image once, plain and mirrored, and every distinct instruction once, then
  augments in latent space: a flip picks the mirrored encoding (exact), a crop slices the latent on the same
  8-pixel grid. For square images at the training resolution (no crop room) the two sources give identical
  batches; with crop room the latent crop is the crop of the whole image's encoding, which differs from
  encoding the crop only within the VAE's receptive field of the crop border.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..dataset.formats import load_rows
from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow, open_image

FACTOR = 8  # pixels per latent pixel
Progress = Callable[[int, int], None]


@dataclass
class Encoders:
    """The frozen encoders. Images: [B, 3, H, W] in [0, 1] -> raw latents [B, C, H/8, W/8] (no scale
    factor: the trainer scales the target itself). Texts: a list of strings -> embeddings [B, T, D]."""

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_texts: Callable[[list[str]], torch.Tensor]


@dataclass
class Batch:
    target: torch.Tensor  # raw target latents [B, C, h, w]
    image: torch.Tensor  # raw input-image latents [B, C, h, w]
    context: torch.Tensor  # instruction embeddings [B, T, D]


@dataclass(frozen=True)
class Placement:
    top: int
    left: int
    flip: bool


def read_rows(path: str | os.PathLike, format: str | None = None) -> list[EditRow]:
    rows = load_rows(path, None if format in (None, "", "auto") else format)
    if not rows:
        raise ValueError(f"the dataset at {path} has no rows; build one with SaveEditDataset or point to another")
    return rows


def fit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Short side = resolution, long side scaled and rounded down to a multiple of 8 (never below it)."""
    scale = resolution / min(width, height)
    new_w = max(resolution, int(width * scale) // FACTOR * FACTOR)
    new_h = max(resolution, int(height * scale) // FACTOR * FACTOR)
    return (resolution, new_h) if width <= height else (new_w, resolution)


def load_pair(row: EditRow, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and edited image as [3, H, W] in [0, 1] at the input's fitted size (Lanczos)."""
    source, edited = open_image(row.input_image).convert("RGB"), open_image(row.edited_image).convert("RGB")
    size = fit_size(*source.size, resolution)
    resize = Image.Resampling.LANCZOS
    return _channels_first(source.resize(size, resize)), _channels_first(edited.resize(size, resize))


def _channels_first(image: Image.Image) -> torch.Tensor:
    return image_to_tensor(image).permute(2, 0, 1).contiguous()


def place(u: torch.Tensor, height: int, width: int, resolution: int, random_crop: bool,
          random_flip: bool) -> Placement:
    """Crop offsets on the latent grid and a flip from three uniforms `u` (always three, for a fixed stream)."""
    rows_free, cols_free = (height - resolution) // FACTOR, (width - resolution) // FACTOR
    if random_crop:
        top = min(rows_free, int(u[0] * (rows_free + 1))) * FACTOR
        left = min(cols_free, int(u[1] * (cols_free + 1))) * FACTOR
    else:
        top, left = rows_free // 2 * FACTOR, cols_free // 2 * FACTOR
    return Placement(top, left, bool(random_flip and u[2] < 0.5))


def crop_flip(image: torch.Tensor, where: Placement, size: int) -> torch.Tensor:
    crop = image[..., where.top:where.top + size, where.left:where.left + size]
    return crop.flip(-1) if where.flip else crop


def crop_latent(plain: torch.Tensor, mirrored: torch.Tensor, where: Placement, size: int) -> torch.Tensor:
    """The latent of crop_flip(image): mirrored crops come from the mirrored image's encoding."""
    top, side = where.top // FACTOR, size // FACTOR
    if not where.flip:
        left = where.left // FACTOR
        return plain[..., top:top + side, left:left + side]
    left = (plain.shape[-1] * FACTOR - where.left - size) // FACTOR
    return mirrored[..., top:top + side, left:left + side]


class PixelBatches:
    """Encodes every sample at every step."""

    def __init__(self, rows: Sequence[EditRow], encoders: Encoders, resolution: int, random_crop: bool = True,
                 random_flip: bool = True) -> None:
        self.rows, self.encoders = list(rows), encoders
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        with torch.no_grad():
            self.empty_context = encoders.encode_texts([""])

    def __len__(self) -> int:
        return len(self.rows)

    def placement(self, u: torch.Tensor, height: int, width: int) -> Placement:
        return place(u, height, width, self.resolution, self.random_crop, self.random_flip)

    @torch.no_grad()
    def batch(self, indices: Sequence[int], uniforms: torch.Tensor) -> Batch:
        sources, targets = [], []
        for index, u in zip(indices, uniforms, strict=True):
            source, target = load_pair(self.rows[index], self.resolution)
            where = self.placement(u, source.shape[1], source.shape[2])
            sources.append(crop_flip(source, where, self.resolution))
            targets.append(crop_flip(target, where, self.resolution))
        latents = self.encoders.encode_images(torch.stack(sources + targets))
        image, target = latents.split(len(indices))
        context = self.encoders.encode_texts([self.rows[i].instruction for i in indices])
        return Batch(target=target, image=image, context=context)


class LatentBatches(PixelBatches):
    """Encodes every image (plain and mirrored) and every distinct instruction once, then trains from memory."""

    def __init__(self, rows: Sequence[EditRow], encoders: Encoders, resolution: int, random_crop: bool = True,
                 random_flip: bool = True, progress: Progress | None = None, images_per_call: int = 16) -> None:
        super().__init__(rows, encoders, resolution, random_crop, random_flip)
        self.images_per_call = images_per_call
        self.latents = self._encode_images(progress)
        self.texts, self.text_index = self._encode_texts()

    @torch.no_grad()
    def _encode_images(self, progress: Progress | None) -> list[torch.Tensor]:
        """Per row a [4, C, h, w] tensor: input, mirrored input, target, mirrored target."""
        latents: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        pairs_per_call = max(1, self.images_per_call // 4)
        for number, row in enumerate(self.rows, start=1):
            source, target = load_pair(row, self.resolution)
            stack = torch.stack([source, source.flip(-1), target, target.flip(-1)])
            # One encoder call per run of same-sized pairs keeps the batch dimension useful.
            if pending and (stack.shape != pending[0].shape or len(pending) >= pairs_per_call):
                latents += self._encode_group(pending)
                pending = []
            pending.append(stack)
            if progress is not None:
                progress(number, len(self.rows))
        if pending:
            latents += self._encode_group(pending)
        return latents

    def _encode_group(self, group: list[torch.Tensor]) -> list[torch.Tensor]:
        encoded = self.encoders.encode_images(torch.cat(group)).float().cpu()
        return list(encoded.split(4))

    @torch.no_grad()
    def _encode_texts(self) -> tuple[torch.Tensor, list[int]]:
        distinct = sorted({row.instruction for row in self.rows})
        position = {text: i for i, text in enumerate(distinct)}
        chunks = [self.encoders.encode_texts(distinct[i:i + 32]).cpu() for i in range(0, len(distinct), 32)]
        return torch.cat(chunks), [position[row.instruction] for row in self.rows]

    def batch(self, indices: Sequence[int], uniforms: torch.Tensor) -> Batch:
        sources, targets = [], []
        for index, u in zip(indices, uniforms, strict=True):
            stored = self.latents[index]
            where = self.placement(u, stored.shape[-2] * FACTOR, stored.shape[-1] * FACTOR)
            sources.append(crop_latent(stored[0], stored[1], where, self.resolution))
            targets.append(crop_latent(stored[2], stored[3], where, self.resolution))
        context = self.texts[[self.text_index[i] for i in indices]]
        return Batch(target=torch.stack(targets), image=torch.stack(sources), context=context)


def make_batches(rows: Sequence[EditRow], encoders: Encoders, resolution: int, cache_latents: bool,
                 random_crop: bool = True, random_flip: bool = True,
                 progress: Progress | None = None) -> PixelBatches:
    if cache_latents:
        return LatentBatches(rows, encoders, resolution, random_crop, random_flip, progress)
    return PixelBatches(rows, encoders, resolution, random_crop, random_flip)
