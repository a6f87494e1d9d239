"""Test-only ComfyUI nodes that feed odd inputs into the pack's nodes through ComfyUI's real executor.

A workflow can only hand a node what other nodes produce, so reaching an input like a 2-channel image, a
NaN pixel or an empty batch needs a node that makes one. `register()` adds these classes to ComfyUI's
NODE_CLASS_MAPPINGS in the running process (tests only; the pack never registers them):

- IP2PProbeImage: an IMAGE [B, H, W, C] of any size, channel count and fill (random, NaN, inf, constant).
- IP2PProbeRows: EditRows with chosen captions, image sizes, or no images at all.
- IP2PProbeCheckpoint: MODEL/CLIP/VAE of a checkpoint, loaded once per process (saves ~2 s per graph).
- IP2PProbeInspect: an output node reporting an IMAGE's shape, value range and finiteness as UI text, so
  large results need not be written to PNG files.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from PIL import Image

FILLS = ("random", "nan", "inf", "zeros", "ones", "half_nan")
_CHECKPOINTS: dict[str, tuple] = {}


class ProbeImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        big = 1 << 15
        return {"required": {
            "batch": ("INT", {"default": 1, "min": 0, "max": 64}),
            "height": ("INT", {"default": 64, "min": 1, "max": big}),
            "width": ("INT", {"default": 64, "min": 1, "max": big}),
            "channels": ("INT", {"default": 3, "min": 1, "max": 8}),
            "fill": (list(FILLS), {"default": "random"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, batch: int, height: int, width: int, channels: int, fill: str, seed: int) -> tuple:
        shape = (batch, height, width, channels)
        if fill == "random":
            images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        elif fill == "zeros":
            images = torch.zeros(shape)
        elif fill == "ones":
            images = torch.ones(shape)
        elif fill == "half_nan":
            images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
            images[:, : height // 2 + 1] = float("nan")
        else:
            images = torch.full(shape, float(fill))
        return (images,)


class ProbeRows:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "count": ("INT", {"default": 2, "min": 0, "max": 1000}),
            "input_caption": ("STRING", {"default": "a photo of a house"}),
            "instruction": ("STRING", {"default": "make it winter"}),
            "output_caption": ("STRING", {"default": "a photo of a house in winter"}),
            "image_size": ("INT", {"default": 32, "min": 0, "max": 4096,
                                   "tooltip": "0 gives rows without images (as the LLM node makes)."}),
            "channels": ("INT", {"default": 3, "min": 1, "max": 4}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1}),
        }}

    RETURN_TYPES = ("IP2P_EDIT_ROWS",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, count: int, input_caption: str, instruction: str, output_caption: str, image_size: int,
             channels: int, seed: int) -> tuple:
        from ..dataset.records import EditRow

        rng = np.random.default_rng(seed)
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        rows = []
        for n in range(count):
            images: list[Any] = [None, None]
            if image_size:
                shape = (image_size, image_size) if channels == 1 else (image_size, image_size, channels)
                images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(2)]
            rows.append(EditRow(input_caption, instruction, output_caption, images[0], images[1], seed=seed + n))
        return (rows,)


class ProbeCheckpoint:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name: str) -> tuple:
        import comfy.sd
        import folder_paths

        if ckpt_name not in _CHECKPOINTS:
            path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
            _CHECKPOINTS[ckpt_name] = tuple(comfy.sd.load_checkpoint_guess_config(path, output_vae=True,
                                                                                  output_clip=True)[:3])
        return _CHECKPOINTS[ckpt_name]


def describe(images: torch.Tensor) -> dict:
    finite = bool(torch.isfinite(images).all()) if images.numel() else True
    return {"shape": list(images.shape), "dtype": str(images.dtype), "finite": finite,
            "min": float(images.min()) if images.numel() and finite else None,
            "max": float(images.max()) if images.numel() and finite else None}


class ProbeInspect:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def inspect(self, images: torch.Tensor) -> dict:
        return {"ui": {"text": [json.dumps(describe(images))]}}


PROBES = {"IP2PProbeImage": ProbeImage, "IP2PProbeRows": ProbeRows, "IP2PProbeCheckpoint": ProbeCheckpoint,
          "IP2PProbeInspect": ProbeInspect}


def forget_checkpoints() -> None:
    """Releases the checkpoints IP2PProbeCheckpoint keeps, so ComfyUI can free them."""
    _CHECKPOINTS.clear()


def register() -> dict[str, type]:
    """Adds the probe nodes to ComfyUI's node table (after `headless.runtime.load_nodes()`)."""
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(PROBES)
    return nodes.NODE_CLASS_MAPPINGS


def inspected(result, node_id: str) -> dict:
    """The IP2PProbeInspect report of `node_id` from a RunResult."""
    return json.loads(result.outputs[node_id]["text"][0])
