"""The diffusers twin of an SDXL-InstructPix2Pix UNet: the same weights in a diffusers `UNet2DConditionModel`.

ComfyUI's SDXL_instructpix2pix UNet (testing/tiny_models.tiny_sdxl_ip2p, or a full-size one) and diffusers'
SDXL UNet are the same network under two key layouts; ComfyUI's own table (comfy.utils.unet_to_diffusers) names
the pairs. With the twin, our sampler can be compared with diffusers' StableDiffusionXLInstructPix2PixPipeline on
identical weights (tests/comfy/test_sdxl_diffusers.py) and timed next to it (bench/sdxl.py).

The mapping is checked both ways: every diffusers weight gets a ComfyUI tensor and every ComfyUI tensor is used,
so a layout mismatch fails here, not as a quietly different model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# SDXL's size conditioning: each of (height, width, crop top, crop left, target height, target width) becomes a
# 256-wide sinusoidal embedding, concatenated after the 1280-wide pooled text embedding (6 * 256 + 1280 = 2816).
SIZE_EMBED_DIM = 256


def per_level(depths: list[int], blocks_per_level: list[int]) -> list[int]:
    """ComfyUI lists transformer depths per res block; diffusers per level. Levels must be uniform."""
    out, start = [], 0
    for count in blocks_per_level:
        level = depths[start:start + count]
        if len(set(level)) != 1:
            raise ValueError(f"a level with mixed transformer depths {level} has no diffusers equivalent")
        out.append(level[0])
        start += count
    return out


def output_depths(comfy_config: dict) -> list[int]:
    """The up path's depth per diffusers up block (deepest level first).

    ComfyUI pops `transformer_depth_output` from the end: its last entries are the deepest level's output
    blocks, which are diffusers' up block 0.
    """
    blocks = [n + 1 for n in reversed(comfy_config["num_res_blocks"])]
    return per_level(list(reversed(comfy_config["transformer_depth_output"])), blocks)


def middle_block_type(comfy_config: dict, deepest_depth: int) -> str | None:
    """ComfyUI: depth -2 means no middle block at all (KOALA-style), >= 0 a res-attention-res block."""
    middle = comfy_config.get("transformer_depth_middle", deepest_depth)
    if middle == -2:
        return None
    if middle != deepest_depth:
        # diffusers gives its middle block the deepest level's transformer depth; anything else cannot be mirrored
        raise ValueError(f"middle block depth {middle} differs from the deepest level's {deepest_depth}")
    return "UNetMidBlock2DCrossAttn"


def diffusers_sdxl_unet_config(comfy_config: dict) -> dict:
    """diffusers' UNet2DConditionModel config for a ComfyUI SDXL-family unet_config (any levels and depths)."""
    levels = len(comfy_config["channel_mult"])
    blocks = comfy_config["num_res_blocks"]
    blocks = blocks if isinstance(blocks, list) else [blocks] * levels
    if len(set(blocks)) != 1:
        raise ValueError(f"res blocks per level {blocks}: diffusers needs the same count at every level")
    down_depths = per_level(comfy_config["transformer_depth"], blocks)
    if output_depths(comfy_config) != list(reversed(down_depths)):
        raise ValueError("the up path's transformer depths do not mirror the down path's")
    channels = [comfy_config["model_channels"] * m for m in comfy_config["channel_mult"]]
    return {
        "sample_size": 128,  # SDXL's 1024 px / 8; the pipeline's default size, which the callers override
        "in_channels": comfy_config["in_channels"],
        "out_channels": comfy_config.get("out_channels", 4),
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(down_depths)],
        "mid_block_type": middle_block_type(comfy_config, down_depths[-1]),
        "layers_per_block": blocks[0],
        # A depth-0 level gets 1: diffusers' plain blocks ignore it, and 0 would be read as "no transformer".
        "transformer_layers_per_block": [max(d, 1) for d in down_depths],
        # diffusers' SDXL configs put the head COUNT here (a historical misnomer): channels / 64-wide heads.
        "attention_head_dim": [c // comfy_config["num_head_channels"] for c in channels],
        "cross_attention_dim": comfy_config["context_dim"],
        "use_linear_projection": bool(comfy_config["use_linear_in_transformer"]),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SIZE_EMBED_DIM,
        "projection_class_embeddings_input_dim": comfy_config["adm_in_channels"],
        "norm_num_groups": 32,
        "upcast_attention": False,
    }


def mapped_weights(comfy_sd: dict[str, torch.Tensor], comfy_config: dict,
                   twin_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """ComfyUI's tensors under diffusers' names (`comfy_sd` keyed as in the diffusion model, no prefix).

    Raises when a diffusers weight has no source or a ComfyUI tensor finds no place: either means the two
    layouts differ. (ComfyUI's table also lists names a given layout lacks, e.g. `class_embedding`; only the
    twin's own keys are looked up.)
    """
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(comfy_config)
    keys = list(twin_keys)
    weights = {key: comfy_sd[table[key]] for key in keys if table.get(key) in comfy_sd}
    missing = [key for key in keys if key not in weights]
    unused = sorted(set(comfy_sd) - {table[key] for key in weights})
    if missing or unused:
        raise RuntimeError(f"SDXL twin mismatch: {len(missing)} diffusers weights without a source "
                           f"{missing[:5]}, {len(unused)} ComfyUI tensors unused {unused[:5]}")
    return weights


def sdxl_twin(comfy_sd: dict[str, torch.Tensor], comfy_config: dict, dtype: torch.dtype = torch.float32):
    """A diffusers UNet2DConditionModel holding copies of `comfy_sd`'s weights (an SDXL-family ComfyUI diffusion
    model, keys without prefix) in `dtype`."""
    from diffusers import UNet2DConditionModel

    # Built on the meta device: a random initialisation of weights about to be replaced takes many seconds and
    # twice the memory at SDXL's full size.
    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_sdxl_unet_config(comfy_config))
    weights = mapped_weights(comfy_sd, comfy_config, model.state_dict().keys())
    # Copies, so the twin never shares storage with the ComfyUI model (which patches its weights in place).
    # strict=True adds diffusers' own shape check to the key check above.
    model.load_state_dict({k: v.to(dtype, copy=True) for k, v in weights.items()}, strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"SDXL twin: tensors without a value {left[:5]}")
    return model.eval()


def twin_of(model, dtype: torch.dtype | None = None):
    """The twin of a loaded ComfyUI SDXL-IP2P MODEL (ModelPatcher), in its weights' dtype unless given."""
    diffusion_model = model.model.diffusion_model
    comfy_sd = {k: v.detach() for k, v in diffusion_model.state_dict().items()}
    dtype = dtype or next(iter(comfy_sd.values())).dtype
    return sdxl_twin(comfy_sd, model.model.model_config.unet_config, dtype)


def meta_twin_check(comfy_config: dict) -> int:
    """Builds both UNets of `comfy_config` on the meta device (shapes, no memory), maps every weight and compares
    shapes; returns the parameter count. Proves a full-size layout's mapping without allocating it."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNetModel(**comfy_config, operations=comfy.ops.disable_weight_init).state_dict()
        twin = UNet2DConditionModel(**diffusers_sdxl_unet_config(comfy_config)).state_dict()
    weights = mapped_weights(ours, comfy_config, twin.keys())
    wrong = [k for k, v in weights.items() if v.shape != twin[k].shape]
    if wrong:
        raise RuntimeError(f"SDXL twin shape mismatch at {wrong[:5]}")
    return sum(v.numel() for v in twin.values())
