"""Seeded random Stable Diffusion 1.x checkpoints that ComfyUI's own model detection accepts: the edit command's
embedded default when no real checkpoint is present (and the tests' and benchmarks' models).

The shapes are real (ComfyUI instantiates its own modules from them); only the values are random. `tiny` keeps
the fixed SD1.5 widths that detection requires (320 channels, context 768) but drops levels and blocks; `full`
is the real SD1.5 layout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.files import save_safetensors

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class UNetLayout:
    """Level-wise layout; widths stay at SD1.5's because detection matches on them."""

    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    middle_block: bool = True

    def comfy_config(self, in_channels: int) -> dict:
        levels = len(self.channel_mult)
        down = [int(self.attention_levels[i]) for i in range(levels) for _ in range(self.num_res_blocks)]
        # ComfyUI pops transformer_depth_output from the end while building output blocks deepest-first,
        # so the list runs from the shallowest level's blocks to the deepest's.
        up = [int(self.attention_levels[i]) for i in range(levels) for _ in range(self.num_res_blocks + 1)]
        return {
            "image_size": 32,
            "in_channels": in_channels,
            "out_channels": 4,
            "model_channels": 320,
            "num_res_blocks": [self.num_res_blocks] * levels,
            "channel_mult": list(self.channel_mult),
            "transformer_depth": down,
            "transformer_depth_output": up,
            "transformer_depth_middle": 1 if self.middle_block else -2,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": False,
            "context_dim": 768,
            "num_heads": 8,
            "num_head_channels": -1,
            "legacy": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
            "use_temporal_resblock": False,
        }


LAYOUTS = {
    "tiny": UNetLayout(channel_mult=(1,), num_res_blocks=1, attention_levels=(True,)),
    # Two levels: output blocks 640 wide, which FreeU needs (it scales 1280- and 640-channel blocks only).
    "two_level": UNetLayout(channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, True)),
    "full": UNetLayout(channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(True, True, True, False)),
}


def _fill_random(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fan-in scaled normal weights, unit norms, small biases: activations stay O(1) through deep stacks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 0:
            value = torch.tensor(0.0 if "shift" in name else 1.0)
        elif len(shape) == 1:
            value = torch.ones(shape) if name.endswith("weight") else torch.randn(shape, generator=gen) * 0.02
        elif "embedding" in name:
            value = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = value.to(dtype)
    return out


def _meta_shapes(build) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = build()
    return {k: v.shape for k, v in module.state_dict().items() if v.is_floating_point()}


def unet_state_dict(layout: UNetLayout, in_channels: int, seed: int, dtype=torch.float16) -> dict:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = layout.comfy_config(in_channels)
    shapes = _meta_shapes(lambda: UNetModel(**config, operations=comfy.ops.disable_weight_init))
    return {UNET_PREFIX + k: v for k, v in _fill_random(shapes, seed, dtype).items()}


def clip_l_state_dict(seed: int, dtype=torch.float16) -> dict:
    import comfy.clip_model
    import comfy.ops

    config_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    shapes = _meta_shapes(
        lambda: comfy.clip_model.CLIPTextModel(config, torch.float32, None, comfy.ops.disable_weight_init)
    )
    shapes = {k: v for k, v in shapes.items() if k.startswith("text_model.")}
    return {CLIP_PREFIX + k: v for k, v in _fill_random(shapes, seed, dtype).items()}


def taesd_state_dict(seed: int, dtype=torch.float16) -> dict:
    import comfy.taesd.taesd

    shapes = _meta_shapes(lambda: comfy.taesd.taesd.TAESD(latent_channels=4))
    return {VAE_PREFIX + k: v for k, v in _fill_random(shapes, seed, dtype).items()}


def kl_vae_state_dict(seed: int, dtype=torch.float16) -> dict:
    """The real SD1.5 AutoencoderKL layout (83M parameters), random."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }
    shapes = _meta_shapes(lambda: AutoencoderKL(ddconfig=ddconfig, embed_dim=4))
    return {VAE_PREFIX + k: v for k, v in _fill_random(shapes, seed, dtype).items()}


def checkpoint_state_dict(kind: str = "ip2p", size: str = "tiny", seed: int = 0, dtype=torch.float16) -> dict:
    """A whole single-file checkpoint: UNet + CLIP-L + VAE, keyed like an SD1.5 .ckpt/.safetensors."""
    if kind not in ("ip2p", "t2i"):
        raise ValueError(f"kind must be 'ip2p' or 't2i', not {kind!r}")
    if size not in LAYOUTS:
        raise ValueError(f"size must be one of {sorted(LAYOUTS)}, not {size!r}")
    in_channels = 8 if kind == "ip2p" else 4
    sd = unet_state_dict(LAYOUTS[size], in_channels, seed, dtype)
    sd.update(clip_l_state_dict(seed + 1, dtype))
    vae = taesd_state_dict if size == "tiny" else kl_vae_state_dict
    sd.update(vae(seed + 2, dtype))
    return sd


def write_checkpoint(path: str | os.PathLike, kind: str = "ip2p", size: str = "tiny", seed: int = 0) -> Path:
    """Writes the checkpoint atomically (temp file + rename) and returns its path."""
    metadata = {"comfyui_ip2p.random_model": json.dumps({"kind": kind, "size": size, "seed": seed})}
    return save_safetensors(checkpoint_state_dict(kind, size, seed), path, metadata)
