"""Random models for tests and benchmarks, around the product's own builder (pipeline/random_model.py).

No weights can be downloaded, so tests, benchmarks and the main command's embedded default build models
at run time. The shapes are real (ComfyUI instantiates its own modules from them); only the values are
random. `tiny` keeps the fixed SD1.5 widths that detection requires (320 channels, context 768) but drops
levels and blocks; `full` is the real SD1.5 layout.

The same UNet weights can be loaded into a diffusers `UNet2DConditionModel` (`diffusers_twin`), so our
sampler can be compared with diffusers' pipeline on identical weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..pipeline.random_model import (  # noqa: F401 (re-exported for tests and benchmarks)
    LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    UNetLayout,
    _fill_random,
    _meta_shapes,
    checkpoint_state_dict,
    clip_l_state_dict,
    kl_vae_state_dict,
    taesd_state_dict,
    unet_state_dict,
    write_checkpoint,
)
from ..training.files import save_safetensors


def diffusers_unet_config(layout: UNetLayout, in_channels: int) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout.attention_levels)]
    return {
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "block_out_channels": [320 * m for m in layout.channel_mult],
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if layout.middle_block else None,
        "layers_per_block": layout.num_res_blocks,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def diffusers_twin(unet_sd: dict, layout: UNetLayout, in_channels: int, dtype=torch.float32):
    """The same UNet weights as a diffusers UNet2DConditionModel (ComfyUI keys mapped with ComfyUI's table)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    mapping = comfy.utils.unet_to_diffusers(layout.comfy_config(in_channels))
    # ComfyUI's table also names resamplers that a level does not have; only map weights that exist.
    weights = {
        diffusers_key: unet_sd[UNET_PREFIX + comfy_key].to(dtype)
        for diffusers_key, comfy_key in mapping.items()
        if UNET_PREFIX + comfy_key in unet_sd
    }
    model = UNet2DConditionModel(**diffusers_unet_config(layout, in_channels))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"diffusers twin mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.to(dtype).eval()


# --- a tiny SDXL-family text-to-image checkpoint ------------------------------------------------------------
# ComfyUI's KOALA_700M matcher (an SDXL distillation) pins SDXL's widths (320 channels, context 2048, adm 2816,
# linear transformer projections) and transformer depths [0, 2, 5] per level, but not the channel multipliers:
# three levels of one res block at width 320 is an SDXL-family model (model_base.SDXL) of ~90M parameters.
# It has no text encoder keys, so ComfyUI's checkpoint loader returns CLIP None for it.

SDXL_TINY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 1], "transformer_depth": [0, 2, 5], "transformer_depth_output": [0, 0, 2, 2, 5, 5],
    "transformer_depth_middle": -2, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 2816, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def sdxl_state_dict(seed: int = 0, dtype=torch.float16) -> dict:
    """UNet (KOALA-shaped, SDXL family) + TAESD-shaped VAE, no text encoders."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes = _meta_shapes(lambda: UNetModel(**SDXL_TINY_UNET, operations=comfy.ops.disable_weight_init))
    sd = {UNET_PREFIX + k: v for k, v in _fill_random(shapes, seed, dtype).items()}
    sd.update(taesd_state_dict(seed + 2, dtype))
    return sd


def write_sdxl_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny SDXL-family checkpoint (atomically) and returns its path."""
    metadata = {"comfyui_ip2p.random_model": json.dumps({"kind": "sdxl", "seed": seed})}
    return save_safetensors(sdxl_state_dict(seed), path, metadata)


# --- SDXL-InstructPix2Pix (diffusers' SDXL IP2P, CosXL Edit) ----------------------------------------------------
# ComfyUI detects SDXL_instructpix2pix only in SDXL's full layout (transformer depths [0, 0, 2, 2, 10, 10]): a
# full-size state dict is built on the meta device (shapes, no memory) for detection, and the small model that
# runs is built from ComfyUI's own SDXL_instructpix2pix config class with the tiny layout above, 8 channels wide.

SDXL_FULL_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# What CosXL Edit carries next to its UNet: EDM v-prediction and its sigma range.
COSXL_KEYS = {"edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002}


def cosxl_keys() -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in COSXL_KEYS.items()}


def sdxl_ip2p_meta_state_dict(edm_vpred: bool = False) -> dict:
    """A full-size SDXL-IP2P checkpoint's UNet keys (8 input channels) as meta tensors: shapes only."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**{**SDXL_FULL_UNET, "in_channels": 8}, operations=comfy.ops.disable_weight_init)
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    if edm_vpred:
        sd.update(cosxl_keys())
    return sd


def tiny_sdxl_ip2p(seed: int = 0, edm_vpred: bool = False, dtype=torch.float32):
    """A small SDXL-IP2P MODEL: ComfyUI's SDXL_instructpix2pix class (model_base and supported_models) on the
    tiny SDXL layout with 8 input channels, random weights, in a ModelPatcher as ComfyUI's loaders return it.

    With `edm_vpred` the state dict carries CosXL Edit's keys, so ComfyUI picks EDM v-prediction and scales the
    image latent by SDXL's factor itself, as it does for the real file.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_config = {**SDXL_TINY_UNET, "in_channels": 8}
    shapes = _meta_shapes(lambda: UNetModel(**unet_config, operations=comfy.ops.disable_weight_init))
    sd = _fill_random(shapes, seed, dtype)
    if edm_vpred:
        sd.update(cosxl_keys())
    config = comfy.supported_models.SDXL_instructpix2pix(unet_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


class StubSDXLClip:
    """Stands in for SDXL's two text encoders (CLIP-L + OpenCLIP-G, ~800M parameters, too big to build in a test):
    the same interface as ComfyUI's CLIP for `tokenize` / `encode_from_tokens_scheduled`, giving conditioning of
    SDXL's shapes (77 x 2048 context, 1280 pooled), seeded by the text so equal texts give equal embeddings."""

    def tokenize(self, text: str) -> dict:
        return {"g": [[(text, 1.0)]], "l": [[(text, 1.0)]]}

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        context, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[context, {"pooled_output": pooled}]]

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False):
        text = tokens["g"][0][0][0]
        gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)) % (2**31))
        context = torch.randn(1, 77, 2048, generator=gen)
        pooled = torch.randn(1, 1280, generator=gen)
        return (context, pooled) if return_pooled else context

    def load_model(self) -> None:
        """No weights to load (ComfyUI's CLIP returns its ModelPatcher here)."""
        return None

    def get_sd(self) -> dict:
        """No weights to save: a checkpoint trained with the stand-in has no text encoders."""
        return {}


# --- a ControlNet and a LoRA that fit a given SD1.5 layout -----------------------------------------------------


def controlnet_state_dict(layout: UNetLayout, seed: int = 0, dtype=torch.float16) -> dict:
    """A random SD1.5 ControlNet (.pth layout, `control_model.` keys) for `layout`'s UNet.

    ComfyUI's ControlNetLoader detects its config from the keys, as for a real one. The zero convolutions are
    random rather than zero, so the control visibly changes a sample.
    """
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    config = layout.comfy_config(in_channels=4)
    config.pop("out_channels")
    shapes = _meta_shapes(lambda: ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init))
    return {"control_model." + k: v for k, v in _fill_random(shapes, seed, dtype).items()}


def write_controlnet(path: str | os.PathLike, layout_name: str = "tiny", seed: int = 0) -> Path:
    sd = controlnet_state_dict(LAYOUTS[layout_name], seed)
    return save_safetensors(sd, path, {"comfyui_ip2p.random_model": json.dumps({"kind": "controlnet"})})


def lora_state_dict(unet_sd: dict, rank: int = 4, seed: int = 0, scale: float = 0.5) -> dict:
    """A random LoRA on every attention projection of a UNet, keyed as ComfyUI's LoRA loader reads it
    (`diffusion_model.<module>.lora_up/lora_down.weight`)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in sorted(unet_sd.items()):
        if weight.ndim != 2 or ".attn" not in key or not key.endswith(".weight"):
            continue
        module = "diffusion_model." + key[len(UNET_PREFIX):-len(".weight")]
        out_features, in_features = weight.shape
        lora[module + ".lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * scale / math.sqrt(rank)
        lora[module + ".lora_down.weight"] = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
    return {k: v.to(torch.float16) for k, v in lora.items()}


def write_lora(path: str | os.PathLike, checkpoint: str | os.PathLike, seed: int = 0) -> Path:
    """A random LoRA for the UNet of the checkpoint file at `checkpoint`."""
    import safetensors.torch

    return save_safetensors(lora_state_dict(safetensors.torch.load_file(str(checkpoint)), seed=seed), path,
                            {"comfyui_ip2p.random_model": json.dumps({"kind": "lora"})})


# --- the tiny SD1.5-IP2P model as a diffusers folder --------------------------------------------------------------
# The tiny checkpoint's VAE is TAESD-shaped, which diffusers' AutoencoderKL cannot hold, so the folder and its
# single-file twin share a random AutoencoderKL in SD1.5's layout (the only KL layout ComfyUI's VAE loader builds:
# 128 base channels). The UNet and CLIP-L weights are the tiny checkpoint's.

SD15_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
}


def write_diffusers_folder(folder: str | os.PathLike, single_file: str | os.PathLike | None = None,
                           seed: int = 0, in_channels: int = 8) -> Path:
    """Saves a tiny SD1.5 model with diffusers' own `save_pretrained` (safetensors) as an InstructPix2Pix
    pipeline folder; with `single_file`, also writes the same weights as a single-file checkpoint there."""
    import comfy.clip_model
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..pipeline.random_model import CLIP_PREFIX

    layout = LAYOUTS["tiny"]
    unet_sd = unet_state_dict(layout, in_channels, seed)
    clip_sd = clip_l_state_dict(seed + 1)
    unet = diffusers_twin(unet_sd, layout, in_channels)
    comfy_dir = Path(comfy.clip_model.__file__).parent
    text_config = CLIPTextConfig(**json.loads((comfy_dir / "sd1_clip_config.json").read_text()))
    text_encoder = CLIPTextModel(text_config)
    weights = {k.removeprefix(CLIP_PREFIX): v.float() for k, v in clip_sd.items()}
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        # Newer transformers keep the text model's weights at the top level (save_pretrained writes them so).
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = text_encoder.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise RuntimeError(f"CLIP text model mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(comfy_dir / "sd1_tokenizer"),
        unet=unet, scheduler=EulerAncestralDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    if single_file is not None:
        vae_sd = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
        tensors = {**unet_sd, **clip_sd, **{VAE_PREFIX + k: v for k, v in vae_sd.items()}}
        save_safetensors(tensors, single_file)
    return Path(folder)
