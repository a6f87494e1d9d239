"""A small SDXL-InstructPix2Pix model saved by diffusers' own `save_pretrained` as a pipeline folder, and its
single-file twin (the same weights under ComfyUI's checkpoint key names).

ComfyUI's diffusers detector knows SDXL-IP2P only in its full layout. This UNet is SDXL's where SDXL's conditioning
fixes it (2048-wide text context, the text_time size embedding of 2816 inputs, linear transformer projections,
64-channel attention heads) and small everywhere else (64..128 channels, one res block a level), so loading it takes
the pack's own path for SDXL-IP2P folders ComfyUI does not recognise (pipeline/diffusers_folder.py).

The weights start on ComfyUI's side (random values for ComfyUI's UNetModel) and are renamed to diffusers' names
with ComfyUI's table; the diffusers config is written out by hand and must take them strictly. So the folder's
config.json is not derived by the code under test, which has to rebuild ComfyUI's layout from it.

Text encoders: the folder holds small random CLIPTextModel / CLIPTextModelWithProjection and tokenizers built
offline from ComfyUI's own CLIP vocabulary, so it is the complete layout diffusers writes. ComfyUI builds SDXL's
text encoders only at their real size (CLIP-L + OpenCLIP-G, ~820M parameters, CLIP-G recognised by its 32 layers):
small ones cannot load through it and real ones are too big to build here, so the tests replace ComfyUI's text
encoder loader and edit with testing/tiny_models.StubSDXLClip (SDXL-shaped conditioning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..pipeline.random_model import UNET_PREFIX, VAE_PREFIX, _fill_random, _meta_shapes
from ..training.files import save_safetensors
from .sdxl_twin import mapped_weights
from .tiny_models import SD15_VAE_CONFIG, cosxl_keys

# ComfyUI's UNetModel arguments; BASE config classes force num_head_channels 64 for SDXL, so heads are 64 wide.
COMFY_UNET = {
    "image_size": 32, "in_channels": 8, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth": [0, 1, 2], "transformer_depth_output": [0, 0, 1, 1, 2, 2],
    "transformer_depth_middle": 2, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 2816, "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The same layout as diffusers describes it (attention_head_dim is the number of heads: diffusers' naming quirk).
DIFFUSERS_UNET = {
    "sample_size": 128, "in_channels": 8, "out_channels": 4, "block_out_channels": [64, 128, 128],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [1, 2, 2], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}

# SDXL's VAE is SD1.5's KL layout with another latent scale.
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}
# Small random text encoders: widths are free, ComfyUI never loads them (see the module docstring).
SMALL_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "projection_dim": 32, "max_position_embeddings": 77}
# What the CosXL Edit demo gives diffusers' pipeline: EDM v-prediction, CosXL's sigma range and sigma_data.
COSXL_SCHEDULER = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0, "prediction_type": "v_prediction"}


def comfy_unet_weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's UNetModel in COMFY_UNET's layout (ComfyUI's names, no prefix)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes = _meta_shapes(lambda: UNetModel(**COMFY_UNET, operations=comfy.ops.disable_weight_init))
    return _fill_random(shapes, seed, dtype)


def diffusers_unet(weights: dict[str, torch.Tensor]):
    """The same weights in diffusers' UNet2DConditionModel built from DIFFUSERS_UNET; every weight must land."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**DIFFUSERS_UNET)
    unet.load_state_dict(mapped_weights(weights, COMFY_UNET, unet.state_dict().keys()), strict=True)
    return unet.eval()


def text_encoders_and_tokenizers(seed: int) -> dict:
    import comfy.clip_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPTextConfig(**SMALL_TEXT)
    vocabulary = Path(comfy.clip_model.__file__).parent / "sd1_tokenizer"
    return {
        "text_encoder": CLIPTextModel(config).eval(),
        "text_encoder_2": CLIPTextModelWithProjection(config).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(vocabulary),
        # SDXL's second tokenizer is the same vocabulary padding with "!" (OpenCLIP's convention).
        "tokenizer_2": CLIPTokenizer.from_pretrained(vocabulary, pad_token="!"),
    }


def write_sdxl_ip2p_folder(folder: str | os.PathLike, single_file: str | os.PathLike | None = None,
                           seed: int = 0, edm_vpred: bool = False) -> Path:
    """Saves the small SDXL-IP2P model as a StableDiffusionXLInstructPix2PixPipeline folder (safetensors); with
    `edm_vpred`, CosXL Edit's scheduler. With `single_file`, also writes the same UNet and VAE (and, with
    `edm_vpred`, CosXL's markers) as a single-file checkpoint without text encoders."""
    import comfy.diffusers_convert
    from diffusers import (
        AutoencoderKL,
        EDMEulerScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLInstructPix2PixPipeline,
    )

    weights = comfy_unet_weights(seed)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval()
    scheduler = EDMEulerScheduler(**COSXL_SCHEDULER) if edm_vpred else EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = StableDiffusionXLInstructPix2PixPipeline(
        vae=vae, unet=diffusers_unet(weights), scheduler=scheduler, add_watermarker=False,
        is_cosxl_edit=edm_vpred, **text_encoders_and_tokenizers(seed + 1))
    pipeline.save_pretrained(folder, safe_serialization=True)
    if single_file is not None:
        vae_sd = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
        tensors = {**{UNET_PREFIX + k: v for k, v in weights.items()},
                   **{VAE_PREFIX + k: v for k, v in vae_sd.items()}, **(cosxl_keys() if edm_vpred else {})}
        metadata = {"comfyui_ip2p.random_model": json.dumps({"kind": "sdxl_ip2p", "seed": seed})}
        save_safetensors(tensors, single_file, metadata)
    return Path(folder)


def load_single_file(path: str | os.PathLike) -> tuple:
    """(MODEL, VAE) of a twin written above, as ComfyUI builds a checkpoint whose layout it knows: its own
    SDXL_instructpix2pix class on COMFY_UNET, the model type read from the file (CosXL's markers), fp32 as on CPU.

    ComfyUI's checkpoint detection has no entry for this small layout, so this is the reference the folder is
    compared with (the way testing/tiny_models.tiny_sdxl_ip2p builds its model)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    markers = {k: v for k, v in state.items() if k.startswith("edm_vpred.")}
    config = comfy.supported_models.SDXL_instructpix2pix(COMFY_UNET)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({**unet, **markers}, "")
    model.load_model_weights(unet, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    vae = comfy.sd.VAE(sd={k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)})
    return patcher, vae
