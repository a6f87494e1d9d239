"""Reference attentions for tests and benchmarks of Prompt-to-Prompt sharing (algorithms/p2p_attention.py).

`sdpa_attention` is plain fused attention in the shipped kernel's calling convention; `explicit_attention` and
`explicit_shared_attention` materialise softmax(q k^T / sqrt(d)), the textbook form the fused kernel must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]."""
    batch, tokens, channels = x.shape
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d]."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention through torch's fused scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention that materialises softmax(q k^T / sqrt(d)) @ v."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scale = qh.shape[-1] ** -0.5
    weights = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return merge_heads(weights @ vh)


def explicit_shared_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, src_index: torch.Tensor | None
) -> torch.Tensor:
    """What shared_attention must give, row by row: the materialised attention map of its source row."""
    if src_index is None:
        return explicit_attention(q, k, v, heads)
    rows = []
    for row, src in enumerate(src_index.tolist()):
        rows.append(explicit_attention(q[src : src + 1], k[src : src + 1], v[row : row + 1], heads))
    return torch.cat(rows)
