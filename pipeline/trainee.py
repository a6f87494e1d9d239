"""The UNet that training trains, built from a ComfyUI MODEL: a float32 copy of its diffusion model from the same
model config with the MODEL's patches (e.g. a LoRA loaded before training) merged in (the input MODEL is
untouched), called as the trainer's `unet(x, t, context)`; and the text and image encoders the trainer uses.
"""

from __future__ import annotations

import logging

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..training.data import Encoders
from ..training.objective import NoiseSchedule
from .loading import convert_to_ip2p, is_ip2p

log = logging.getLogger("comfyui_ip2p.training")

# --- the model ---------------------------------------------------------------------------------------------

def check_trainable(model) -> None:
    """Refuses what the trainer cannot train, before anything is copied or estimated."""
    if model is None:
        raise ValueError("no MODEL: connect the MODEL output of LoadIP2PModel, a checkpoint loader or ConvertToIP2P")
    base = model.model
    if not isinstance(base.diffusion_model, UNetModel) or base.adm_channels:
        raise ValueError("training supports SD1.x/SD2.x-style models (no SDXL, no extra conditioning) for now; "
                         "pick an SD1.5 InstructPix2Pix or text-to-image checkpoint")


def trainable_ip2p(model):
    """An 8-channel MODEL to train: IP2P as given, text-to-image through the paper's init (ConvertToIP2P)."""
    check_trainable(model)
    if not is_ip2p(model):
        log.info("text-to-image model: starting from the paper's init (conv_in widened, new channels zero)")
        model = convert_to_ip2p(model)
    return model


def noise_schedule(model) -> NoiseSchedule:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = "v"
    elif isinstance(sampling, comfy.model_sampling.EPS) and not isinstance(sampling, comfy.model_sampling.CONST):
        prediction = "eps"
    else:
        raise ValueError(f"cannot train a {type(sampling).__name__} model: only eps and v prediction are supported")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError("training needs a discrete (DDPM) noise schedule, like SD1.x and SD2.x models have")
    return NoiseSchedule(1.0 / (1.0 + sampling.sigmas.double() ** 2), prediction)


def patched_unet_state(model) -> dict[str, torch.Tensor]:
    """The MODEL's UNet weights with its patches applied, as float32 CPU copies."""
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    state = model.model.diffusion_model.state_dict()
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}


def float32_config(base):
    """A copy of a BaseModel's model config that builds float32 weights (the original config is untouched)."""
    config = type(base.model_config).__new__(type(base.model_config))
    config.__dict__.update(base.model_config.__dict__)
    config.unet_config = dict(base.model_config.unet_config)
    config.set_inference_dtype(torch.float32, None)
    return config


def training_base(model, device: torch.device):
    """A float32 BaseModel of the same kind as the MODEL's, holding its patched weights."""
    base = model.model
    copy = type(base)(float32_config(base), model_type=base.model_type, device=device)
    copy.diffusion_model.load_state_dict(patched_unet_state(model))
    return copy.to(device)


def _sdpa(func, *args, **kwargs):  # noqa: ARG001 (ComfyUI's callback signature)
    # PyTorch's fused attention has a backward pass on every device; sub-quadratic/sage/flash may not.
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


class ComfyUNet(torch.nn.Module):
    """ComfyUI's UNet as the trainer's `unet(x, t, context)`."""

    def __init__(self, diffusion_model: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        options = {"optimized_attention_override": _sdpa}
        return self.diffusion_model(x, timesteps=t, context=context, transformer_options=options)


def checkpoint_blocks(unet: UNetModel) -> list[torch.nn.Module]:
    """The layers the UNet calls one by one (res blocks, transformers, resamplers)."""
    stages = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return [layer for stage in stages if stage is not None for layer in stage if len(list(layer.parameters()))]


# --- text and images ---------------------------------------------------------------------------------------

def encode_texts(clip, texts: list[str]) -> torch.Tensor:
    """[B, 77, D] in one text-encoder call: each text's first 77-token chunk (longer texts are cut, like
    diffusers' training script does)."""
    if clip is None:
        raise ValueError("no CLIP: connect the CLIP output of the checkpoint loader")
    with torch.no_grad():
        tokens = [clip.tokenize(text) for text in texts]
        batched = {key: [t[key][0] for t in tokens] for key in tokens[0]}
        cond = clip.encode_from_tokens(batched)
    return cond.reshape(len(texts), -1, cond.shape[-1]).float()


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the raw VAE latent (posterior mode, no scale factor)."""
    if vae is None:
        raise ValueError("no VAE: connect the VAE output of the checkpoint loader")
    with torch.no_grad():
        return vae.encode(pixels.movedim(1, -1)).float()


def encoders(clip, vae) -> Encoders:
    return Encoders(encode_images=lambda pixels: encode_images(vae, pixels),
                    encode_texts=lambda texts: encode_texts(clip, texts))
