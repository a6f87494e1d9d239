"""Training batches from any dataset `dataset.source` reads: joint augmentation, encoding, optional caching.

Rows come as a lazy sequence (dataset.source.open_rows: `len()` and indexing, each row read from disk when it is
asked for); nothing here copies them into a list, so a dataset of any size costs the same memory to train on.

Each image pair is resized so its short side is the training resolution (long side rounded down to a
multiple of 8), then input and target get the same random crop (offsets on the 8-pixel latent grid) and the
same horizontal flip. A row's mask (MagicBrush, UltraEdit) is resized, cropped and flipped with its images and
averaged over each 8x8 cell onto the latent grid, for the masked loss. Two interchangeable batch sources:

- `PixelBatches` decodes, augments and VAE/text-encodes every sample at every step (what diffusers' script
  does);
- `LatentBatches` encodes every image once, plain and mirrored, and every instruction once (training/latent_cache:
  in memory or in memory-mapped chunk files on disk), then augments in latent space: a flip picks the mirrored
  encoding (exact), a crop slices the latent on the same 8-pixel grid. For square images at the training
  resolution (no crop room) the two sources give identical batches; with crop room the latent crop is the crop
  of the whole image's encoding, which differs from encoding the crop only within the VAE's receptive field of
  the crop border.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow, open_image
from ..dataset.source import open_rows
from .latent_cache import CachedRow, ChunkStore, MemoryChunks, build_cache

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
    # [B, 1, h, w] in [0, 1] on the latent grid when a row of the batch has a mask (rows without one: all ones)
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Placement:
    top: int
    left: int
    flip: bool


def read_rows(path: str | os.PathLike, format: str | None = None,
              mapping: dict[str, str] | None = None) -> Sequence[EditRow]:
    """The dataset's rows as a lazy sequence (dataset.source.open_rows); refused when it has none."""
    rows = open_rows(path, None if format in (None, "", "auto") else format, mapping)
    if not len(rows):
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


def load_mask(row: EditRow, size: tuple[int, int]) -> torch.Tensor | None:
    """The row's mask as [1, H, W] in [0, 1] (bright = the edited region) at the pair's size (H, W), or None.

    Box resampling: a mask's value is the share of its pixels that is masked, which never overshoots [0, 1]."""
    if row.mask is None:
        return None
    mask = open_image(row.mask, "the row's mask").convert("L").resize((size[1], size[0]), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).reshape(1, size[0], size[1])


def latent_mask(mask: torch.Tensor) -> torch.Tensor:
    """[1, H, W] pixels -> [1, H/8, W/8]: the share of each latent pixel's 8x8 cell that is masked (area)."""
    return F.avg_pool2d(mask[None], FACTOR)[0]


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


def stack_masks(masks: list[torch.Tensor | None], side: int) -> torch.Tensor | None:
    """[B, 1, side, side] with ones for rows without a mask; None when no row has one."""
    if all(m is None for m in masks):
        return None
    return torch.stack([torch.ones(1, side, side) if m is None else m for m in masks])


class PixelBatches:
    """Encodes every sample at every step."""

    def __init__(self, rows: Sequence[EditRow], encoders: Encoders, resolution: int, random_crop: bool = True,
                 random_flip: bool = True) -> None:
        self.rows, self.encoders = rows, encoders  # the lazy sequence itself: never a list of every row
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        with torch.no_grad():
            self.empty_context = encoders.encode_texts([""])

    def __len__(self) -> int:
        return len(self.rows)

    def placement(self, u: torch.Tensor, height: int, width: int) -> Placement:
        return place(u, height, width, self.resolution, self.random_crop, self.random_flip)

    @torch.no_grad()
    def batch(self, indices: Sequence[int], uniforms: torch.Tensor) -> Batch:
        sources, targets, masks, texts = [], [], [], []
        for index, u in zip(indices, uniforms, strict=True):
            row = self.rows[index]
            source, target = load_pair(row, self.resolution)
            mask = load_mask(row, tuple(source.shape[1:]))
            where = self.placement(u, source.shape[1], source.shape[2])
            sources.append(crop_flip(source, where, self.resolution))
            targets.append(crop_flip(target, where, self.resolution))
            masks.append(None if mask is None else latent_mask(crop_flip(mask, where, self.resolution)))
            texts.append(row.instruction)
        latents = self.encoders.encode_images(torch.stack(sources + targets))
        image, target = latents.split(len(indices))
        context = self.encoders.encode_texts(texts)
        return Batch(target=target, image=image, context=context,
                     mask=stack_masks(masks, self.resolution // FACTOR))


def load_for_cache(row: EditRow, resolution: int) -> CachedRow:
    """What the latent cache encodes of a row: the pair at its fitted size and its mask on the latent grid."""
    source, target = load_pair(row, resolution)
    mask = load_mask(row, tuple(source.shape[1:]))
    return CachedRow(source, target, row.instruction, None if mask is None else latent_mask(mask))


class LatentBatches(PixelBatches):
    """Encodes every image (plain and mirrored) and every instruction once, then trains from the latent cache:
    `store` is where its chunks live (training.latent_cache: MemoryChunks by default, DiskChunks for a cache
    memory-mapped from disk); both give bit-identical batches."""

    def __init__(self, rows: Sequence[EditRow], encoders: Encoders, resolution: int, random_crop: bool = True,
                 random_flip: bool = True, progress: Progress | None = None, images_per_call: int = 16,
                 store: ChunkStore | None = None, world=None) -> None:
        super().__init__(rows, encoders, resolution, random_crop, random_flip)
        self.store = store if store is not None else MemoryChunks()
        build_cache(self.store, len(rows), lambda i: load_for_cache(self.rows[i], resolution), encoders,
                    images_per_call, progress, world)

    def batch(self, indices: Sequence[int], uniforms: torch.Tensor) -> Batch:
        sources, targets, masks, contexts = [], [], [], []
        for index, u in zip(indices, uniforms, strict=True):
            stored, context, mask = self.store.row(index)
            where = self.placement(u, stored.shape[-2] * FACTOR, stored.shape[-1] * FACTOR)
            sources.append(crop_latent(stored[0], stored[1], where, self.resolution))
            targets.append(crop_latent(stored[2], stored[3], where, self.resolution))
            masks.append(None if mask is None else crop_latent(mask, mask.flip(-1), where, self.resolution))
            contexts.append(context)
        return Batch(target=torch.stack(targets), image=torch.stack(sources), context=torch.stack(contexts),
                     mask=stack_masks(masks, self.resolution // FACTOR))


def make_batches(rows: Sequence[EditRow], encoders: Encoders, resolution: int, cache_latents: bool,
                 random_crop: bool = True, random_flip: bool = True, progress: Progress | None = None,
                 store: ChunkStore | None = None, world=None) -> PixelBatches:
    if not len(rows):
        raise ValueError("the dataset has no rows; build one with SaveEditDataset or point to another")
    if cache_latents:
        return LatentBatches(rows, encoders, resolution, random_crop, random_flip, progress, store=store,
                             world=world)
    return PixelBatches(rows, encoders, resolution, random_crop, random_flip)
