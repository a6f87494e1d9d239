"""The pack's seed ranges, in one place.

- SEED_MAX: every seed widget (edit, Prompt-to-Prompt, training) takes 0..2**64-1, the range of ComfyUI core's
  KSampler seed, so a seed copied from a core node works here unchanged. torch.Generator.manual_seed accepts all
  of it, and ComfyUI's noise (comfy.sample.prepare_noise) is drawn from it as is.
- ROW_SEED_LIMIT: the per-sample seeds written into datasets (P2P pairs, dataset builder chunks) are stored in
  signed int64 columns (parquet, `datasets`), so they are taken modulo 2**63 (`row_seed`).
- REQUEST_SEED_MAX: the seed sent with an LLM request. OpenAI-compatible servers read it into their own integer
  types (llama.cpp: 32 bits), so the widget stays below 2**31.
"""

from __future__ import annotations

SEED_MAX = 0xFFFFFFFFFFFFFFFF
ROW_SEED_LIMIT = 2**63
REQUEST_SEED_MAX = 2**31 - 1


def row_seed(seed: int, offset: int = 0) -> int:
    """The seed of the sample `offset` places after `seed`, inside a dataset's int64 seed column."""
    return (seed + offset) % ROW_SEED_LIMIT
