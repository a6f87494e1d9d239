"""The latent cache: every row's image latents, instruction embedding and mask, encoded once, in chunks of rows,
held in memory or in chunk files on disk that are read back memory-mapped. Pure torch.

A chunk (a dict torch.save writes and `torch.load(weights_only=True)` reads):
- "latents": per row a float32 [4, C, h, w]: input, mirrored input, target, mirrored target, at the pair's fitted
  size (training.data.load_pair);
- "texts": float32 [k, T, D], the chunk's distinct instructions as `encode_texts` returns them (77 tokens; 78 for
  SDXL, whose pooled embedding rides along as a last token), each encoded once per chunk;
- "text_index": int64 [n], each row's place in "texts";
- "masks": per row a float32 [1, h, w] on the latent grid (the share of each 8x8 cell that is masked), or None.

Chunks are encoded the same way wherever they are kept (image encoder calls never span two chunks), so the
memory and disk caches hold bit-identical values. On disk (DiskChunks) a cache is a folder named by `cache_key`
(dataset fingerprint, VAE and text encoder fingerprint, resolution, pooled text, chunk size, format version): a
different dataset, VAE or resolution never reuses a cache. Each chunk file is written whole or not at all
(training.files: temporary + rename), so a run killed while caching reuses its complete chunks and rewrites only
the rest; reading maps a file instead of loading it (`torch.load(mmap=True)`), so pages come from disk on demand
and only the few chunks in use are open. "auto" keeps the cache in memory while its estimated size fits a budget
(a quarter of the available RAM, or IP2P_CACHE_MEMORY_GB), on disk beyond.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .files import save_bytes, save_torch

CHUNK_ROWS = 256
FORMAT_VERSION = 1
# Chunk files kept mapped at once: a random batch touches up to batch-size chunks per step.
OPEN_CHUNKS = 64
TEXTS_PER_CALL = 32
MEMORY_BUDGET_ENV = "IP2P_CACHE_MEMORY_GB"
# "auto" keeps the cache in memory up to this share of the RAM available when training starts.
MEMORY_BUDGET_SHARE = 0.25
LOCATIONS = ("auto", "memory", "disk")


@dataclass
class CachedRow:
    """One row as the cache encodes it: the pair at its fitted size [3, H, W], its instruction, its latent mask."""

    source: torch.Tensor
    target: torch.Tensor
    instruction: str
    mask: torch.Tensor | None = None


class ChunkStore(Protocol):
    chunk_rows: int
    shared: bool  # every process of a launch sees the same chunks (a folder), so each may encode a share

    def has(self, index: int) -> bool: ...

    def put(self, index: int, chunk: dict[str, Any]) -> None: ...

    def get(self, index: int) -> dict[str, Any]: ...

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class _Chunks:
    chunk_rows: int = CHUNK_ROWS

    def get(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Row `index` of the dataset: (latents [4, C, h, w], instruction embedding [T, D], mask or None)."""
        chunk = self.get(index // self.chunk_rows)
        at = index % self.chunk_rows
        return chunk["latents"][at], chunk["texts"][int(chunk["text_index"][at])], chunk["masks"][at]


class MemoryChunks(_Chunks):
    shared = False

    def __init__(self, chunk_rows: int = CHUNK_ROWS) -> None:
        self.chunk_rows = chunk_rows
        self.chunks: dict[int, dict[str, Any]] = {}

    def has(self, index: int) -> bool:
        return index in self.chunks

    def put(self, index: int, chunk: dict[str, Any]) -> None:
        self.chunks[index] = chunk

    def get(self, index: int) -> dict[str, Any]:
        return self.chunks[index]


class DiskChunks(_Chunks):
    """Chunk files `chunk-NNNNNN.pt` in `folder` (one cache key), written atomically, read memory-mapped."""

    shared = True

    def __init__(self, folder: str | os.PathLike, chunk_rows: int = CHUNK_ROWS, describe: dict | None = None,
                 open_chunks: int = OPEN_CHUNKS) -> None:
        self.folder, self.chunk_rows, self.open_chunks = Path(folder), chunk_rows, open_chunks
        self.folder.mkdir(parents=True, exist_ok=True)
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()
        record = self.folder / "cache.json"
        if describe is not None and not record.is_file():  # for people looking into the folder
            save_bytes(json.dumps({"format": FORMAT_VERSION, "chunk_rows": chunk_rows, **describe},
                                  indent=1).encode("utf-8"), record)

    def path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:06d}.pt"

    def has(self, index: int) -> bool:
        # Only complete chunks carry the final name (a killed writer leaves a hidden temporary, removed on rewrite).
        return self.path(index).is_file()

    def put(self, index: int, chunk: dict[str, Any]) -> None:
        save_torch(chunk, self.path(index))

    def get(self, index: int) -> dict[str, Any]:
        chunk = self._open.get(index)
        if chunk is None:
            chunk = torch.load(self.path(index), map_location="cpu", mmap=True, weights_only=True)
            self._open[index] = chunk
            if len(self._open) > self.open_chunks:
                self._open.popitem(last=False)  # its mapping goes with the last reference to its tensors
        else:
            self._open.move_to_end(index)
        return chunk


def cache_key(dataset: str, encoders: str, resolution: int, pooled: bool, chunk_rows: int = CHUNK_ROWS) -> str:
    """The folder name of a disk cache: what its values depend on, hashed."""
    parts = [FORMAT_VERSION, dataset, encoders, resolution, bool(pooled), chunk_rows]
    return hashlib.blake2b(json.dumps(parts).encode("utf-8"), digest_size=16).hexdigest()


Load = Callable[[int], CachedRow]
Progress = Callable[[int, int], None]


@torch.no_grad()
def encode_chunk(load: Load, start: int, stop: int, encoders, images_per_call: int = 16,
                 on_row: Callable[[], None] | None = None) -> dict[str, Any]:
    """Rows [start, stop) as a chunk: one image encoder call per run of same-sized pairs (up to images_per_call
    images), one text encoder call per TEXTS_PER_CALL distinct instructions."""
    latents: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    text_index: list[int] = []
    texts: dict[str, int] = {}
    pending: list[torch.Tensor] = []
    pairs_per_call = max(1, images_per_call // 4)
    for index in range(start, stop):
        row = load(index)
        stack = torch.stack([row.source, row.source.flip(-1), row.target, row.target.flip(-1)])
        if pending and (stack.shape != pending[0].shape or len(pending) >= pairs_per_call):
            latents += _encode_group(encoders, pending)
            pending = []
        pending.append(stack)
        masks.append(None if row.mask is None else row.mask.float().contiguous())
        text_index.append(texts.setdefault(row.instruction, len(texts)))
        if on_row is not None:
            on_row()
    if pending:
        latents += _encode_group(encoders, pending)
    distinct = list(texts)
    embedded = torch.cat([encoders.encode_texts(distinct[i:i + TEXTS_PER_CALL]).float().cpu()
                          for i in range(0, len(distinct), TEXTS_PER_CALL)])
    return {"latents": latents, "texts": embedded, "text_index": torch.tensor(text_index, dtype=torch.int64),
            "masks": masks}


def _encode_group(encoders, group: list[torch.Tensor]) -> list[torch.Tensor]:
    encoded = encoders.encode_images(torch.cat(group)).float().cpu()
    return [part.clone() for part in encoded.split(4)]  # one storage per row: a chunk file maps row by row


def build_cache(store: ChunkStore, count: int, load: Load, encoders, images_per_call: int = 16,
                progress: Progress | None = None, world=None) -> None:
    """Encodes every chunk `store` lacks. With a shared (disk) store and several processes, each process encodes
    every size-th chunk, they wait for each other, then each encodes whatever it still does not see (a folder
    that is not shared between machines)."""
    chunks = math.ceil(count / store.chunk_rows)
    size, rank = (world.size, world.rank) if world is not None else (1, 0)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], count)

    def fill(index: int) -> None:
        start, stop = index * store.chunk_rows, min(count, (index + 1) * store.chunk_rows)
        if store.has(index):
            done[0] += stop - start - 1
            tick()
            return
        store.put(index, encode_chunk(load, start, stop, encoders, images_per_call, tick))

    split = store.shared and size > 1
    for index in range(chunks):
        if not split or index % size == rank:
            fill(index)
    if split:
        world.barrier()
        for index in range(chunks):
            if not store.has(index):
                fill(index)


def estimate_bytes(rows: int, resolution: int, latent_channels: int, text_shape: tuple[int, ...]) -> int:
    """What a cache of square pairs holds: four latents, one instruction embedding (no two rows alike, the worst
    case) and a mask per row, float32."""
    cells = (resolution // 8) ** 2
    per_row = 4 * latent_channels * cells + math.prod(text_shape[-2:]) + cells
    return 4 * rows * per_row


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with ComfyUI; the plain-torch trainer may lack it
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget() -> int:
    """Bytes "auto" may keep in memory: IP2P_CACHE_MEMORY_GB if set, else a quarter of the available RAM."""
    value = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if value:
        try:
            return int(float(value) * 2**30)
        except ValueError:
            raise ValueError(f"{MEMORY_BUDGET_ENV}={value!r} is not a number of gigabytes") from None
    return int(available_memory() * MEMORY_BUDGET_SHARE)


def choose_location(setting: str, estimated: int, budget: int | None = None) -> str:
    """"memory" or "disk" for a cache location setting ("auto" decides by the estimated size)."""
    if setting not in LOCATIONS:
        raise ValueError(f"cache_location must be one of {', '.join(LOCATIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "memory" if estimated <= (memory_budget() if budget is None else budget) else "disk"
