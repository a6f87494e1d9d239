"""The UNet that training trains, built from a ComfyUI MODEL: a float32 copy of its diffusion model from the same
model config with the MODEL's patches (e.g. a LoRA loaded before training) merged in (the input MODEL is
untouched), called as the trainer's `unet(x, t, context)`; and the text and image encoders the trainer uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
from .loading import convert_to_ip2p, is_ip2p, is_sdxl_family

log = logging.getLogger("comfyui_ip2p.training")

# --- the model ---------------------------------------------------------------------------------------------

def check_trainable(model) -> None:
    """Refuses what the trainer cannot train, before anything is copied or estimated."""
    if model is None:
        raise ValueError("no MODEL: connect the MODEL output of LoadIP2PModel, a checkpoint loader or ConvertToIP2P")
    base = model.model
    if not isinstance(base.diffusion_model, UNetModel) or (base.adm_channels and not is_sdxl_family(model)):
        raise ValueError(f"training supports SD1.x, SD2.x and SDXL-family UNets; this {type(base).__name__} model "
                         "takes another kind of conditioning. Pick an SD1.5 or SDXL InstructPix2Pix or "
                         "text-to-image checkpoint")


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


# SDXL's size conditioning: six sizes (original h/w, crop top/left, target h/w), 256 Fourier features each,
# after the pooled text embedding in the `y` vector (model_base.SDXL.encode_adm).
SDXL_SIZE_FEATURES = 6 * 256

SizeConditioning = Callable[[torch.Tensor, int, int], torch.Tensor]


def sdxl_size_conditioning(base) -> SizeConditioning:
    """(pooled text [B, P], height, width) -> SDXL's `y`, built by the model's own encode_adm with the training
    image's size as original and target size and no crop (as diffusers' SDXL InstructPix2Pix training does)."""
    pooled_width = int(base.adm_channels) - SDXL_SIZE_FEATURES

    def size_y(pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return base.encode_adm(pooled_output=pooled[:, :pooled_width], width=width, height=height,
                               target_width=width, target_height=height)

    return size_y


class ComfyUNet(torch.nn.Module):
    """ComfyUI's UNet as the trainer's `unet(x, t, context)`.

    For SDXL-family models the context carries the pooled text embedding as one extra last token
    (`encode_texts(..., pooled=True)`), so the trainer's text dropout replaces both together, as classifier-free
    guidance at edit time does; the UNet gets the tokens as context and `y` from the pooled one and the size.
    """

    def __init__(self, diffusion_model: UNetModel, size_y: SizeConditioning | None = None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.size_y = size_y

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        options = {"optimized_attention_override": _sdpa}
        if self.size_y is None:
            return self.diffusion_model(x, timesteps=t, context=context, transformer_options=options)
        y = self.size_y(context[:, -1], x.shape[-2] * 8, x.shape[-1] * 8).to(x)
        return self.diffusion_model(x, timesteps=t, context=context[:, :-1], y=y, transformer_options=options)


def trainee_unet(base) -> ComfyUNet:
    """The training copy's UNet as the trainer calls it, with SDXL's extra conditioning where the model has it."""
    return ComfyUNet(base.diffusion_model, sdxl_size_conditioning(base) if base.adm_channels else None)


def checkpoint_blocks(unet: UNetModel) -> list[torch.nn.Module]:
    """The layers the UNet calls one by one (res blocks, transformers, resamplers)."""
    stages = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return [layer for stage in stages if stage is not None for layer in stage if len(list(layer.parameters()))]


# --- text and images ---------------------------------------------------------------------------------------

def encode_texts(clip, texts: list[str], pooled: bool = False) -> torch.Tensor:
    """[B, 77, D] in one text-encoder call: each text's first 77-token chunk (longer texts are cut, like
    diffusers' training script does). With `pooled` (SDXL), [B, 78, D]: the pooled embedding, zero-padded to D,
    as a last token (see ComfyUNet)."""
    if clip is None:
        raise ValueError("no CLIP: connect the CLIP output of the checkpoint loader")
    if pooled:
        return torch.cat([text_with_pooled(clip, text) for text in texts])
    with torch.no_grad():
        tokens = [clip.tokenize(text) for text in texts]
        batched = {key: [t[key][0] for t in tokens] for key in tokens[0]}
        cond = clip.encode_from_tokens(batched)
    return cond.reshape(len(texts), -1, cond.shape[-1]).float()


def text_with_pooled(clip, text: str) -> torch.Tensor:
    # ComfyUI returns one pooled embedding per call (the first chunk's), so each text is its own call.
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    cond = cond[:1, :77].float()
    token = cond.new_zeros(1, 1, cond.shape[-1])
    token[..., :pooled.shape[-1]] = pooled.reshape(1, -1).float()
    return torch.cat([cond, token], dim=1)


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the raw VAE latent (posterior mode, no scale factor)."""
    if vae is None:
        raise ValueError("no VAE: connect the VAE output of the checkpoint loader")
    with torch.no_grad():
        return vae.encode(pixels.movedim(1, -1)).float()


def encoders(clip, vae, pooled: bool = False) -> Encoders:
    return Encoders(encode_images=lambda pixels: encode_images(vae, pixels),
                    encode_texts=lambda texts: encode_texts(clip, texts, pooled))
