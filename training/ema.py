"""Exponential moving average of the trained weights, with the reference implementation's warm-up.

The reference (LitEma) counts updates n = 1, 2, ... and uses decay min(d, (1 + n) / (10 + n)), so early
updates follow the weights closely and the full decay applies only after thousands of steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def warmup_decay(decay: float, update: int) -> float:
    """The decay used by update number `update` (1-based)."""
    return min(decay, (1.0 + update) / (10.0 + update))


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.names = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in params.values()]

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> float:
        """One step towards the current weights; returns the decay it used."""
        self.updates += 1
        decay = warmup_decay(self.decay, self.updates)
        current = [p.detach().float() for p in params.values()]
        torch._foreach_lerp_(self.shadow, current, 1.0 - decay)
        return decay

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """The EMA weights inside the `with` block (for validation), the raw ones again after it."""
        saved = [p.detach().clone() for p in params.values()]
        for p, s in zip(params.values(), self.shadow, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for p, s in zip(params.values(), saved, strict=True):
                p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: s.cpu() for n, s in zip(self.names, self.shadow, strict=True)}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"saved EMA lacks {len(missing)} weights (e.g. {min(missing)})")
        self.decay = state["decay"]
        self.updates = state["updates"]
        for s, name in zip(self.shadow, self.names, strict=True):
            s.copy_(state["shadow"][name])
