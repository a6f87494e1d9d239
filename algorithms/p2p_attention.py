"""Prompt-to-Prompt self-attention sharing, as InstructPix2Pix used it to generate image pairs.

The source and the edited image are denoised together from the same noise. While sharing is on, every
self-attention layer lets the edited image reuse the source image's attention map with its own values:

    out_edit = softmax(q_src k_src^T / sqrt(d)) v_edit = attention(q_src, k_src, v_edit)

So sharing is ordinary attention after replacing the edited rows' q and k by their source rows' q and k.
That runs as one fused attention call over the whole batch and never materialises the attention matrix.

Rows are paired through `src_index`: row r takes q and k from row src_index[r]; rows that do not share
point at themselves. Helpers build it for the [source; edited] layout and for CFG batches such as
[cond_src, cond_edit, uncond_src, uncond_edit] (the reference shares in both CFG halves).

Schedule (paper, section 3.1.2): per sample draw p ~ U(0.1, 0.9) and cfg ~ U(7.5, 15); at step i of N
(0-based) sharing is on iff p > i / (N - 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# attn_fn(q, k, v, heads) on [B, T, heads * d] -> [B, T, heads * d]: the calling convention of ComfyUI's
# comfy.ldm.modules.attention.optimized_attention, so a caller can pass that in unchanged.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

P_RANGE = (0.1, 0.9)
CFG_RANGE = (7.5, 15.0)


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    src_index: torch.Tensor | None,
    attn_fn: AttentionFn,
) -> torch.Tensor:
    """Attention where row r uses the attention map of row src_index[r] and its own values: the kernel every
    self-attention layer runs while P2PPairGenerator shares (pipeline/p2p.py's attn1 patch).

    q, k, v: [B, T, heads * d] (k, v may have their own token count). src_index: long [B]; None means plain
    attention. `attn_fn` runs the attention (ComfyUI's optimized attention when sampling); one call covers the
    whole batch. An index on the CPU is checked and an identity index skips the gather; an index on the device
    is used as it is, since reading its values would make every layer wait on the device (build and check it on
    the CPU, as blocks_src_index does, then move it once).
    """
    if src_index is None:
        return attn_fn(q, k, v, heads)
    check_src_index(src_index, q.shape[0])
    if src_index.device.type == "cpu" and is_identity(src_index):
        return attn_fn(q, k, v, heads)
    index = src_index.to(q.device)
    return attn_fn(q.index_select(0, index), k.index_select(0, index), v, heads)


# ---------------------------------------------------------------------------------------------------------
# Row pairing
# ---------------------------------------------------------------------------------------------------------


def is_identity(src_index: torch.Tensor) -> bool:
    return bool((src_index == torch.arange(src_index.numel(), device=src_index.device)).all())


def check_src_index(src_index: torch.Tensor, batch: int) -> None:
    """Type and shape always; the values only on the CPU (where reading them waits on nothing)."""
    if src_index.dtype != torch.long or src_index.shape != (batch,):
        raise ValueError(
            f"src_index must be a long tensor of shape ({batch},), got {src_index.dtype} "
            f"{tuple(src_index.shape)}"
        )
    if batch and src_index.device.type == "cpu" and (int(src_index.min()) < 0 or int(src_index.max()) >= batch):
        raise ValueError(f"src_index values must lie in [0, {batch})")


def share_indices(
    batch: int, pairs: Iterable[tuple[int, int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """src_index for `batch` rows where each (source_row, edited_row) pair shares the source's map.

    Rows not named as an edited row keep their own attention. An edited row may appear only once.
    """
    index = torch.arange(batch, dtype=torch.long)
    edited: set[int] = set()
    for source, edit in pairs:
        if not (0 <= source < batch and 0 <= edit < batch):
            raise ValueError(f"pair ({source}, {edit}) is outside a batch of {batch}")
        if edit in edited:
            raise ValueError(f"row {edit} is the edited row of more than one pair")
        edited.add(edit)
        index[edit] = source
    return index.to(device) if device is not None else index


def blocks_src_index(batch: int, blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """src_index for a batch of `blocks` equal blocks, each laid out as [sources; edits].

    blocks=2 covers a CFG batch [cond_src, cond_edit, uncond_src, uncond_edit] with equal chunks.
    """
    if blocks < 1 or batch % (2 * blocks):
        raise ValueError(f"a batch of {batch} does not split into {blocks} blocks of [sources; edits]")
    half = batch // (2 * blocks)
    pairs = []
    for block in range(blocks):
        start = block * 2 * half
        pairs += [(start + i, start + half + i) for i in range(half)]
    return share_indices(batch, pairs, device)


# ---------------------------------------------------------------------------------------------------------
# Schedule and per-sample parameters
# ---------------------------------------------------------------------------------------------------------


def sharing_on(step_index: int, num_steps: int, p: float) -> bool:
    """Whether sharing is on at 0-based step i of N: p > i / (N - 1), with i / (N - 1) = 0 when N == 1.

    p = 0 never shares. p = 1 shares at every step but the last (1 > (N-1)/(N-1) is false); the last step
    only removes the smallest noise, where the two images should be free to differ.
    """
    if num_steps < 1 or not 0 <= step_index < num_steps:
        raise ValueError(f"step {step_index} is outside 0..{num_steps - 1}")
    progress = step_index / (num_steps - 1) if num_steps > 1 else 0.0
    return p > progress


@dataclass(frozen=True)
class P2PParams:
    """Per-sample Prompt-to-Prompt parameters: p and cfg, float64 tensors of shape [n]."""

    p: torch.Tensor
    cfg: torch.Tensor


def sample_p2p_params(
    count: int,
    generator: torch.Generator,
    p_range: tuple[float, float] = P_RANGE,
    cfg_range: tuple[float, float] = CFG_RANGE,
) -> P2PParams:
    """Draw p ~ U(p_range) and cfg ~ U(cfg_range) for `count` samples.

    Sample i uses the generator's draws 2i and 2i+1, so the first samples do not change when more are
    asked for from the same seed.
    """
    for low, high in (p_range, cfg_range):
        if low > high:
            raise ValueError(f"range ({low}, {high}) is reversed")
    uniform = torch.rand(count, 2, generator=generator, dtype=torch.float64, device=generator.device)
    p = p_range[0] + (p_range[1] - p_range[0]) * uniform[:, 0]
    cfg = cfg_range[0] + (cfg_range[1] - cfg_range[0]) * uniform[:, 1]
    return P2PParams(p=p, cfg=cfg)


__all__ = [
    "CFG_RANGE",
    "P_RANGE",
    "AttentionFn",
    "P2PParams",
    "blocks_src_index",
    "check_src_index",
    "sample_p2p_params",
    "share_indices",
    "shared_attention",
    "sharing_on",
]
