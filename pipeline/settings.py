"""Checks of node settings that several concepts share."""

from __future__ import annotations

import math


def check_finite(**settings: float) -> None:
    """NaN passes ComfyUI's min/max checks and every comparison; refuse it (and inf) by the setting's name."""
    for name, value in settings.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
