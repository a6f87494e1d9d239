"""Widgets several node families share: the seed input (its ranges are algorithms/seeds.py)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..algorithms.seeds import SEED_MAX


def seed_input(name: str = "seed", tooltip: str = "", *, maximum: int = SEED_MAX,
               control_after_generate: bool = True, **options) -> io.Int.Input:
    """An INT seed widget from 0 (the default) to `maximum`, with the front end's control_after_generate (fixed /
    increment / randomize) unless `control_after_generate` is off (a cache key such as an LLM request seed)."""
    return io.Int.Input(name, default=0, min=0, max=maximum, control_after_generate=control_after_generate or None,
                        tooltip=tooltip, **options)
