"""InstructPix2Pix models saved in the diffusers folder layout, loaded with ComfyUI's own loaders.

A diffusers folder holds `model_index.json` and one sub-folder per component (unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, scheduler/). ComfyUI 0.3.75's diffusers loader recognises a UNet only when its
weights match one of a fixed list of full-size layouts (model_detection.unet_config_from_diffusers_unet), and
that list has the full-size SDXL InstructPix2Pix UNet but no 8-channel SD1.5 one and no smaller SDXL one. So:

- a UNet that list recognises (full-size SDXL-IP2P, epsilon) goes through ComfyUI's own diffusers path unchanged;
- any other UNet2DConditionModel is renamed to ComfyUI's keys with ComfyUI's own table (comfy.utils.
  unet_to_diffusers, built from the folder's unet/config.json). An SD1.5-family UNet is then handed to ComfyUI's
  UNet loader, which detects it from the weights exactly as it detects the UNet of a single-file checkpoint. An
  SDXL-family UNet (addition_embed_type "text_time") is built as ComfyUI's own SDXL_instructpix2pix class from the
  UNet config read from config.json: ComfyUI's detection knows SDXL-IP2P only at full size;
- the prediction type comes from scheduler/scheduler_config.json. ComfyUI's diffusers loader does not read that
  file (a diffusers CosXL Edit folder would load as epsilon there), so an SDXL-family folder whose scheduler is
  v-prediction or EDM v-prediction (CosXL Edit: EDMEulerScheduler, sigma 0.002..120, sigma_data 1) always takes
  the pack's path, which hands ComfyUI the same markers a CosXL single file carries (`edm_vpred.sigma_max`...);
- the VAE and the text encoders go through comfy.sd.VAE and ComfyUI's text encoder loader, as
  comfy.diffusers_load does (both read diffusers/transformers key names themselves; text encoders saved by
  transformers 5, which drops the `text_model.` prefix, get it back first); the tokenizer folders are not read:
  ComfyUI uses its own tokenizer for each model family.

Only safetensors weights are read. Pickled `.bin` weights are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch

UNET_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")
TEXT_ENCODER_FILES = ("model.fp16.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What ComfyUI's SDXL model feeds its UNet: CLIP-L + OpenCLIP-G hidden states (768 + 1280 = 2048 wide) and, for the
# size embedding, CLIP-G's pooled output (1280) + six size values embedded at 256 each (1536) = 2816.
SDXL_CONDITIONING = {"cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                     "projection_class_embeddings_input_dim": 2816}


class DiffusersFolderError(ValueError):
    pass


def _component_files(folder: Path, names: tuple[str, ...], what: str, required: bool = True) -> list[str]:
    """The safetensors weights of one component (a single file, or the shards its index names)."""
    for name in names:
        if (folder / name).is_file():
            return [str(folder / name)]
        index = folder / (name + ".index.json")
        if index.is_file():
            # Large UNets (SDXL in fp32) are saved as shards listed in an index.
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if any(Path(shard).name != shard for shard in shards):
                raise DiffusersFolderError(f"{index} names shards outside its folder; refusing to read it")
            return [str(folder / shard) for shard in shards]
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise DiffusersFolderError(
            f"its {what} ({folder.name}/{pickled[0]}) is stored as pickle weights, which are not loaded: "
            "unpickling can run arbitrary code. Re-save the model as safetensors (diffusers' "
            "save_pretrained(..., safe_serialization=True)) or use a .safetensors single-file checkpoint.")
    if required:
        raise DiffusersFolderError(f"it has no {what} weights ({folder.name}/{names[-1]})")
    return []


def _load(files: list[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(comfy.utils.load_torch_file(file, safe_load=True))
    return state


TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def text_encoder_state(file: str) -> dict[str, torch.Tensor]:
    """A text encoder's weights with transformers' `text_model.` names, which ComfyUI's CLIP loader detects.

    transformers 5 saves CLIPTextModel without that prefix (embeddings.*, encoder.*); older versions, and the
    folders on the Hugging Face hub, with it. Without the prefix ComfyUI would load an uninitialised encoder.
    """
    state = _load([file])
    if any(k.startswith("text_model.") for k in state):
        return state
    return {("text_model." + k if k.startswith(TEXT_MODEL_PARTS) else k): v for k, v in state.items()}


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_config_from_diffusers_config(config: dict) -> dict:
    """ComfyUI's UNetModel arguments for a diffusers UNet2DConditionModel config.json.

    Only what decides the weight names and shapes is derived here. For SD1.x ComfyUI re-detects the model
    (attention heads, model family) from the converted weights, as it does for a single-file checkpoint; for SDXL
    this config builds ComfyUI's SDXL_instructpix2pix class, which sets the heads itself (check_heads compares).
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    if any(c % channels[0] for c in channels):
        raise DiffusersFolderError(f"its UNet widths {channels} are not multiples of the first level's")
    blocks = _per_level(config.get("layers_per_block", 2), levels)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    transformer_depth = [depth[i] if "CrossAttn" in down_types[i] else 0
                         for i in range(levels) for _ in range(blocks[i])]
    # ComfyUI's output list runs from the shallowest level to the deepest; diffusers' up blocks run deepest first.
    transformer_depth_output = [depth[i] if "CrossAttn" in up_types[levels - 1 - i] else 0
                                for i in range(levels) for _ in range(blocks[i] + 1)]
    middle = {"UNetMidBlock2DCrossAttn": depth[-1], "UNetMidBlock2D": -1, None: -2}
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in middle:
        raise DiffusersFolderError(f"its UNet has a {mid_type} middle block, which ComfyUI's UNet does not build")
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time") or config.get("class_embed_type") is not None:
        raise DiffusersFolderError("its UNet has an extra class/addition embedding that no Stable Diffusion "
                                   "InstructPix2Pix model uses")
    return {
        "image_size": 32,
        "in_channels": config["in_channels"],
        "out_channels": config.get("out_channels", 4),
        "model_channels": channels[0],
        "num_res_blocks": blocks,
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": middle[mid_type],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "context_dim": config["cross_attention_dim"],
        # Heads do not change any weight's shape; ComfyUI's detection sets them again from the weights.
        "num_heads": 8,
        "num_head_channels": -1,
        "legacy": False,
        "num_classes": "sequential" if addition == "text_time" else None,
        "adm_in_channels": config.get("projection_class_embeddings_input_dim") if addition == "text_time" else None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def comfy_unet_state_dict(diffusers_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The UNet weights renamed to ComfyUI's keys; every weight must land and every ComfyUI weight be present."""
    unet_config = unet_config_from_diffusers_config(config)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    # ComfyUI's table also names resamplers a level may not have: only weights that exist are renamed.
    state = {comfy_key: diffusers_state[key] for key, comfy_key in mapping.items() if key in diffusers_state}
    left_over = sorted(set(diffusers_state) - set(mapping))
    with torch.device("meta"):
        expected = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **unet_config, operations=comfy.ops.disable_weight_init).state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
    if left_over or missing or wrong:
        raise DiffusersFolderError(
            "its UNet weights do not match its unet/config.json as a Stable Diffusion UNet "
            f"(unknown: {left_over[:3]}, missing: {missing[:3]}, wrong shape: {wrong[:3]})")
    return state


def check_heads(comfy_config: dict, config: dict) -> None:
    """ComfyUI sets attention heads by its detection rules, not from config.json: refuse a disagreement, which
    would load without error and compute something else."""
    channels = list(config["block_out_channels"])
    # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the number of heads.
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), len(channels))
    for level, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" not in kind:
            continue
        head_channels = comfy_config.get("num_head_channels", -1)
        if head_channels == -1:
            head_channels = channels[level] // comfy_config.get("num_heads", 8)
        if channels[level] // heads[level] != head_channels:
            raise DiffusersFolderError(
                f"its UNet has {heads[level]} attention heads at level {level}, where ComfyUI's model of this "
                f"family uses {channels[level] // head_channels}; it would compute something else")


def is_sdxl_family(config: dict) -> bool:
    """SDXL's UNets (base, refiner, SDXL-IP2P, CosXL Edit) are the ones with the text_time size embedding."""
    return config.get("addition_embed_type") == "text_time"


def check_sdxl_conditioning(config: dict) -> None:
    wrong = {key: config.get(key) for key, value in SDXL_CONDITIONING.items() if config.get(key) != value}
    if wrong:
        raise DiffusersFolderError(
            f"its UNet has SDXL's size embedding but conditioning sizes {wrong}, where ComfyUI's SDXL models give "
            f"{SDXL_CONDITIONING} (CLIP-L + OpenCLIP-G); ComfyUI could not condition it")


@dataclass(frozen=True)
class Prediction:
    """What the folder's scheduler says the UNet predicts, as ComfyUI's SDXL config reads it from a checkpoint:
    `markers` are the state-dict keys that pick the model type (none: epsilon)."""

    markers: dict[str, torch.Tensor] = field(default_factory=dict)
    sigma_data: float | None = None

    @property
    def epsilon(self) -> bool:
        return not self.markers


def scheduler_prediction(path: Path) -> Prediction:
    """The prediction type from scheduler/scheduler_config.json; no scheduler folder means epsilon."""
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return Prediction()
    try:
        config = json.loads(file.read_text())
    except ValueError as error:
        raise DiffusersFolderError(f"its scheduler/scheduler_config.json is not valid JSON ({error})") from error
    kind = config.get("prediction_type", "epsilon")
    # diffusers' continuous-sigma schedulers (EDMEuler, EDMDPMSolver, CosineDPMSolver) are the ones with sigma_data.
    continuous = "sigma_data" in config
    if kind == "epsilon" and not continuous:
        return Prediction()
    if kind == "v_prediction" and continuous:
        # float64, so ComfyUI's float(marker.item()) gives back the config's numbers exactly.
        markers = {f"edm_vpred.{key}": torch.tensor(float(config.get(key, default)), dtype=torch.float64)
                   for key, default in (("sigma_max", 120.0), ("sigma_min", 0.002))}
        return Prediction(markers, float(config["sigma_data"]))
    if kind == "v_prediction":
        markers = {"v_pred": torch.tensor([])}
        if config.get("rescale_betas_zero_snr"):
            markers["ztsnr"] = torch.tensor([])
        return Prediction(markers)
    raise DiffusersFolderError(
        f"its scheduler ({config.get('_class_name', 'unnamed')}, prediction_type {kind!r}"
        f"{', continuous sigmas' if continuous else ''}) is not one ComfyUI's InstructPix2Pix models sample with: "
        "epsilon, v-prediction or EDM v-prediction (CosXL Edit)")


def _describe_other(path: Path) -> str:
    index = path / "model_index.json"
    if index.is_file():
        try:
            pipeline = json.loads(index.read_text()).get("_class_name", "an unnamed pipeline")
        except ValueError:
            pipeline = "an unreadable model_index.json"
        return f"a diffusers {pipeline} folder without a Stable Diffusion UNet (unet/config.json)"
    return "not a diffusers model folder (no model_index.json or unet/config.json)"


def check_ip2p_folder(path: Path) -> dict:
    """The UNet config of an InstructPix2Pix diffusers folder; anything else raises saying what it is."""
    config_file = path / "unet" / "config.json"
    if not config_file.is_file():
        raise DiffusersFolderError(
            f"it is {_describe_other(path)}. Load other model families with ComfyUI's own loaders "
            "(Load Diffusion Model, DiffusersLoader).")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise DiffusersFolderError(f"its unet/config.json is not valid JSON ({error})") from error
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise DiffusersFolderError(
            f"its UNet is a {config['_class_name']}, not a Stable Diffusion UNet2DConditionModel. Load it with "
            "ComfyUI's DiffusersLoader or Load Diffusion Model.")
    channels = config.get("in_channels")
    if channels == 4:
        raise DiffusersFolderError(
            "it is a text-to-image model (4 input channels), not an InstructPix2Pix model (8 channels). "
            "Load it with ComfyUI's DiffusersLoader and use ConvertToIP2P to start an InstructPix2Pix "
            "fine-tune, or pick an InstructPix2Pix model.")
    if channels != 8:
        raise DiffusersFolderError(
            f"its UNet has {channels} input channels (9 is an inpainting model), not InstructPix2Pix's 8. "
            "Load it with ComfyUI's DiffusersLoader.")
    if is_sdxl_family(config):
        check_sdxl_conditioning(config)
    return config


def folder_prediction(path: Path, config: dict) -> Prediction:
    prediction = scheduler_prediction(path)
    if not prediction.epsilon and not is_sdxl_family(config):
        # ComfyUI's SD1.x model type is always epsilon: it would sample a v-prediction UNet wrongly, without error.
        raise DiffusersFolderError("its scheduler is v-prediction, but ComfyUI's SD1.5 InstructPix2Pix model "
                                   "predicts noise (epsilon) only")
    return prediction


def sdxl_ip2p_config(config: dict, prediction: Prediction) -> comfy.supported_models.SDXL_instructpix2pix:
    """ComfyUI's own SDXL-IP2P config class for the UNet described by config.json (any SDXL-family layout)."""
    model_config = comfy.supported_models.SDXL_instructpix2pix(unet_config_from_diffusers_config(config))
    if prediction.sigma_data is not None:
        # ComfyUI's EDM sampling reads sigma_data from here (default 1.0, CosXL's); the range comes from the markers.
        model_config.sampling_settings["sigma_data"] = prediction.sigma_data
    check_heads(model_config.unet_config, config)
    return model_config


def load_sdxl_ip2p_unet(comfy_state: dict[str, torch.Tensor], model_config, prediction: Prediction):
    """The UNet as ComfyUI's UNet loader builds a model whose config it knows: same dtype choice, same class."""
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtypes = list(model_config.supported_inference_dtypes)
    dtype = comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(comfy_state), supported_dtypes=dtypes,
        weight_dtype=comfy.utils.weight_dtype(comfy_state))
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, load_device, dtypes))
    # The model type (epsilon, v, EDM v with CosXL's image-latent scaling) is read from the markers, as ComfyUI
    # reads it from a CosXL single file; the markers are not weights, so only the UNet's weights are loaded.
    model = model_config.get_model({**comfy_state, **prediction.markers}, "").to(offload_device)
    model.load_model_weights(comfy_state, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_unet(unet_state: dict[str, torch.Tensor], config: dict, prediction: Prediction):
    """ComfyUI's MODEL for the folder's UNet, or None when ComfyUI has no model for it."""
    if prediction.epsilon and comfy.model_detection.unet_config_from_diffusers_unet(unet_state) is not None:
        # A layout ComfyUI's diffusers loader knows (full-size SDXL-IP2P): its own conversion, as load_diffusers does.
        return comfy.sd.load_diffusion_model_state_dict(unet_state)
    if is_sdxl_family(config):
        model_config = sdxl_ip2p_config(config, prediction)
        return load_sdxl_ip2p_unet(comfy_unet_state_dict(unet_state, config), model_config, prediction)
    model = comfy.sd.load_diffusion_model_state_dict(comfy_unet_state_dict(unet_state, config))
    if model is not None:
        check_heads(model.model.model_config.unet_config, config)
    return model


def load_ip2p_folder(path: Path, embedding_directory: list[str] | None = None) -> tuple:
    """(MODEL, CLIP, VAE) from an InstructPix2Pix diffusers folder."""
    config = check_ip2p_folder(path)
    prediction = folder_prediction(path, config)
    unet_files = _component_files(path / "unet", UNET_FILES, "UNet")
    vae_files = _component_files(path / "vae", UNET_FILES, "VAE")
    text_files = _component_files(path / "text_encoder", TEXT_ENCODER_FILES, "text encoder")
    text_files += _component_files(path / "text_encoder_2", TEXT_ENCODER_FILES, "second text encoder",
                                   required=False)
    model = load_unet(_load(unet_files), config, prediction)
    if model is None:
        raise DiffusersFolderError("ComfyUI does not recognise its UNet as a model it can run")
    clip = comfy.sd.load_text_encoder_state_dicts([text_encoder_state(file) for file in text_files],
                                                 embedding_directory=embedding_directory)
    vae = comfy.sd.VAE(sd=_load(vae_files))
    return model, clip, vae
