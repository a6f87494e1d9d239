"""Loading InstructPix2Pix models with ComfyUI's loaders, and the paper's 8-channel initialisation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import folder_paths
import torch

from .diffusers_folder import DiffusersFolderError, load_ip2p_folder

CONV_IN = "input_blocks.0.0.weight"


class ModelKindError(ValueError):
    pass


def _is_model_folder(folder: Path) -> bool:
    # A folder with model_index.json but no UNet is listed too, so picking it says which loader fits.
    return (folder / "unet").is_dir() or (folder / "model_index.json").is_file()


def checkpoint_choices() -> list[str]:
    """Single-file checkpoints, then diffusers folders (as `diffusers/<name>`)."""
    files = folder_paths.get_filename_list("checkpoints")
    folders = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            folders += sorted(d for d in os.listdir(root) if _is_model_folder(Path(root) / d))
    return files + [f"diffusers/{name}" for name in folders]


def resolve_checkpoint(name: str) -> tuple[str, bool]:
    """(path, is_diffusers_folder) for a name from `checkpoint_choices`; refuses anything else."""
    if name.startswith("diffusers/"):
        folder = name.removeprefix("diffusers/")
        for root in folder_paths.get_folder_paths("diffusers"):
            candidate = Path(root) / folder
            if "/" not in folder and ".." not in folder and _is_model_folder(candidate):
                return str(candidate), True
        raise FileNotFoundError(f"no diffusers folder {folder!r} under models/diffusers")
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise FileNotFoundError(f"checkpoint {name!r} is not in models/checkpoints")
    return path, False


def safetensors_in_channels(path: str) -> int | None:
    """Reads the UNet input width from the file header only, so a wrong model fails in milliseconds."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith("diffusion_model." + CONV_IN) or key == "model.diffusion_model." + CONV_IN:
                    return handle.get_slice(key).get_shape()[1]
    except Exception as error:
        raise ModelKindError(f"{Path(path).name} is not a readable safetensors file ({error}); "
                             "re-download it or pick another checkpoint") from error
    return None


def t2i_message(name: str, channels: int) -> str:
    return (f"{name} is a text-to-image model ({channels} input channels), not an InstructPix2Pix model "
            "(8 channels). Load it with Load Checkpoint and use ConvertToIP2P to start an InstructPix2Pix "
            "fine-tune, or pick an InstructPix2Pix checkpoint (e.g. instruct-pix2pix-00-22000.safetensors).")


def load_ip2p(name: str) -> tuple:
    """Returns (MODEL, CLIP, VAE) for an IP2P checkpoint; anything else raises a message saying what to do."""
    path, is_folder = resolve_checkpoint(name)
    channels = None if is_folder else safetensors_in_channels(path)
    if channels is not None and channels != 8:
        raise ModelKindError(t2i_message(name, channels))
    try:
        if is_folder:
            model, clip, vae = load_ip2p_folder(Path(path), folder_paths.get_folder_paths("embeddings"))
        else:
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    except DiffusersFolderError as error:
        raise ModelKindError(f"{name}: {error}") from error
    except pickle.UnpicklingError as error:
        # ComfyUI loads .ckpt/.pt files with torch's weights-only unpickler; a file that needs more than plain
        # tensors is refused. Its own message suggests turning safe loading off, which must not be followed.
        raise ModelKindError(f"{name} is a pickle checkpoint holding more than plain weights, so it was not "
                             "loaded: unpickling it could run arbitrary code. Use a .safetensors version of "
                             "the model.") from error
    except Exception as error:
        raise ModelKindError(f"could not load {name}: {error}. The file may be truncated or not a Stable "
                             "Diffusion checkpoint; re-download it or pick another.") from error
    if model is not None and needs_sdxl_ip2p_class(model):
        model = as_sdxl_ip2p(model, model.model.diffusion_model.state_dict())
    check_is_ip2p(model, name)
    return model, clip, vae


def check_is_ip2p(model, name: str = "the model") -> None:
    if model is None:
        raise ModelKindError(f"{name} contains no diffusion model")
    if not isinstance(model.model, comfy.model_base.IP2P):
        channels = model.model.model_config.unet_config.get("in_channels", "?")
        raise ModelKindError(t2i_message(name, channels))


def is_ip2p(model) -> bool:
    return isinstance(model.model, comfy.model_base.IP2P)


def is_sdxl_family(model) -> bool:
    """SDXL and its distillations (SSD-1B, Vega, KOALA): ComfyUI builds them all as model_base.SDXL."""
    return isinstance(model.model, comfy.model_base.SDXL)


def needs_sdxl_ip2p_class(model) -> bool:
    """An 8-channel SDXL-family UNet that ComfyUI's matchers built as text-to-image.

    ComfyUI recognises SDXL_instructpix2pix only in SDXL's full layout, so an SDXL distillation made into an
    InstructPix2Pix model (ConvertToIP2P, then TrainIP2P) would load back as a text-to-image SDXL.
    """
    return (is_sdxl_family(model) and not is_ip2p(model)
            and model.model.model_config.unet_config.get("in_channels") == 8)


def sdxl_ip2p_config_like(source_config) -> comfy.supported_models.SDXL_instructpix2pix:
    """ComfyUI's SDXL_instructpix2pix config with everything else of `source_config` (its layout, dtypes,
    latent format and the sampling settings its checkpoint keys chose, e.g. CosXL's EDM sigmas), 8 channels."""
    config = comfy.supported_models.SDXL_instructpix2pix.__new__(comfy.supported_models.SDXL_instructpix2pix)
    config.__dict__.update(source_config.__dict__)
    config.unet_config = {**source_config.unet_config, "in_channels": 8}
    config.sampling_settings = dict(source_config.sampling_settings)
    config.optimizations = dict(source_config.optimizations)
    return config


def as_sdxl_ip2p(model, unet_state: dict[str, torch.Tensor]):
    """A new ModelPatcher holding ComfyUI's SDXL_instructpix2pix model with `unet_state` (8 input channels),
    keeping the source MODEL's prediction type and devices; the source is untouched."""
    base = model.model
    ip2p = comfy.model_base.SDXL_instructpix2pix(sdxl_ip2p_config_like(base.model_config), model_type=base.model_type,
                                                 device=model.offload_device)
    ip2p.diffusion_model.load_state_dict(unet_state)
    return comfy.model_patcher.ModelPatcher(ip2p, load_device=model.load_device,
                                            offload_device=model.offload_device)


def widen_conv_in(unet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's init: conv_in gets 4 more input channels, zero-initialised; everything else is kept."""
    weight = unet_state[CONV_IN]
    if weight.shape[1] != 4:
        raise ModelKindError(f"expected a 4-channel text-to-image UNet, got {weight.shape[1]} input channels")
    extra = torch.zeros(weight.shape[0], 4, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    return {**unet_state, CONV_IN: torch.cat([weight, extra], dim=1)}


def convert_to_ip2p(model):
    """A new 8-channel InstructPix2Pix MODEL built from a text-to-image MODEL; the original is untouched.

    With a zero image latent the result predicts exactly what the original predicts.
    """
    if is_ip2p(model):
        return model.clone()
    state = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    if is_sdxl_family(model):
        # ComfyUI's matcher knows only the full SDXL layout as IP2P; the class fits every SDXL-family layout.
        return as_sdxl_ip2p(model, widen_conv_in(state))
    converted = comfy.sd.load_diffusion_model_state_dict(widen_conv_in(state),
                                                         model_options={"dtype": model.model.get_dtype()})
    if converted is None or not is_ip2p(converted):
        raise ModelKindError("ComfyUI has no InstructPix2Pix variant of this model family "
                             "(supported: SD1.x and SDXL)")
    return converted
