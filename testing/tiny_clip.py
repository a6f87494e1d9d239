"""A random open_clip CLIP small enough to build in milliseconds, for the CLIP filter and metrics nodes.

It is saved with a sidecar `<stem>.json` open_clip config, as users do for custom models, so the nodes load it
through their normal path.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def build_tiny_clip(seed: int = 0):
    import open_clip
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.CLIP(**TINY_CLIP)


def write_tiny_clip(folder: str | Path, stem: str = "tiny_clip", seed: int = 0) -> str:
    """Writes `<stem>.safetensors` + `<stem>.json` into `folder` (once); returns the weights' file name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{stem}.safetensors"
    if not weights.exists():
        model = build_tiny_clip(seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        (folder / f"{stem}.json").write_text(json.dumps(TINY_CLIP))
    return weights.name
