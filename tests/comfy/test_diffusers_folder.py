"""InstructPix2Pix models in the diffusers folder layout, through LoadIP2PModel (issue 14).

The folder is written by diffusers' own save_pretrained from random weights; its single-file twin holds the same
weights, so an edit from either must agree.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt

SETTINGS = {"image_guidance": 1.5, "text_guidance": 7.5, "steps": 3, "seed": 7,
            "sampler_name": "euler_ancestral", "scheduler": "normal"}


@pytest.fixture(scope="module")
def folder_and_twin(comfy_base) -> tuple[str, str]:
    from comfyui_ip2p.testing.tiny_models import write_diffusers_folder

    write_diffusers_folder(comfy_base / "models/diffusers/tiny_ip2p_folder",
                           single_file=comfy_base / "models/checkpoints/tiny_ip2p_twin.safetensors", seed=3)
    return "diffusers/tiny_ip2p_folder", "tiny_ip2p_twin.safetensors"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_node_error(name: str) -> str:
    result = run_prompt({"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": name}},
                         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("LoadIP2PModel:") and name in message
    return message


def test_folder_edits_like_its_single_file_twin(comfy_nodes, folder_and_twin, record_property):
    import comfy.model_base
    from comfyui_ip2p.pipeline.loading import checkpoint_choices

    folder, twin = folder_and_twin
    assert folder in checkpoint_choices()
    load, edit = comfy_nodes["LoadIP2PModel"], comfy_nodes["InstructEdit"]
    from_folder = load.execute(folder).result
    from_file = load.execute(twin).result
    assert type(from_folder[0].model) is type(from_file[0].model)
    assert isinstance(from_folder[0].model, comfy.model_base.IP2P)
    folder_unet = from_folder[0].model.diffusion_model.state_dict()
    file_unet = from_file[0].model.diffusion_model.state_dict()
    assert folder_unet.keys() == file_unet.keys()
    assert all(torch.equal(folder_unet[k], file_unet[k]) for k in file_unet)

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    results = [edit.execute(*loaded, image, "make it winter", resolution=64, keep_input_size=True,
                            **SETTINGS).result for loaded in (from_folder, from_file)]
    (folder_image, folder_latent), (file_image, file_latent) = results
    latent_error = relative_error(folder_latent["samples"], file_latent["samples"])
    image_error = relative_error(folder_image, file_image)
    record_property("latent_relative_error", latent_error)
    record_property("image_relative_error", image_error)
    assert latent_error < 1e-4 and image_error < 1e-4


def test_text_to_image_folder_is_refused_naming_the_loaders(comfy_nodes, comfy_base, folder_and_twin):
    source = comfy_base / "models/diffusers/tiny_ip2p_folder"
    target = comfy_base / "models/diffusers/tiny_t2i_folder"
    (target / "unet").mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "model_index.json", target)
    config = json.loads((source / "unet/config.json").read_text())
    (target / "unet/config.json").write_text(json.dumps({**config, "in_channels": 4}))
    message = load_node_error("diffusers/tiny_t2i_folder")
    assert "4 input channels" in message and "DiffusersLoader" in message and "ConvertToIP2P" in message


def test_pickle_weights_are_refused(comfy_nodes, comfy_base, folder_and_twin):
    source = comfy_base / "models/diffusers/tiny_ip2p_folder"
    target = comfy_base / "models/diffusers/tiny_pickle_folder"
    (target / "unet").mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "model_index.json", target)
    shutil.copy(source / "unet/config.json", target / "unet")
    torch.save({"conv_in.weight": torch.zeros(1)}, target / "unet/diffusion_pytorch_model.bin")
    message = load_node_error("diffusers/tiny_pickle_folder")
    assert "pickle" in message and "safetensors" in message


def test_other_diffusers_pipeline_is_named(comfy_nodes, comfy_base):
    target = comfy_base / "models/diffusers/tiny_flux_folder"
    (target / "transformer").mkdir(parents=True, exist_ok=True)
    (target / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    message = load_node_error("diffusers/tiny_flux_folder")
    assert "FluxPipeline" in message and "DiffusersLoader" in message


SDXL_IP2P_DIFFUSERS = {
    "in_channels": 8, "out_channels": 4, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
}


def test_sdxl_ip2p_folder_goes_through_comfyuis_own_diffusers_path(comfy_nodes):
    """Full SDXL-IP2P layout on meta tensors (shapes only): ComfyUI's diffusers detector knows it, so it is loaded
    by ComfyUI's own path; the pack's config.json conversion would give the same model class too."""
    import comfy.model_detection
    import comfy.supported_models
    from comfyui_ip2p.pipeline.diffusers_folder import check_heads, comfy_unet_state_dict
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        diffusers_state = UNet2DConditionModel(**SDXL_IP2P_DIFFUSERS).state_dict()
    known = comfy.model_detection.unet_config_from_diffusers_unet(diffusers_state)
    assert known is not None and known["in_channels"] == 8
    converted = comfy_unet_state_dict(dict(diffusers_state), SDXL_IP2P_DIFFUSERS)
    config = comfy.model_detection.model_config_from_unet(converted, "")
    assert isinstance(config, comfy.supported_models.SDXL_instructpix2pix)
    check_heads(config.unet_config, SDXL_IP2P_DIFFUSERS)


def test_full_sd15_ip2p_folder_layout_converts_to_comfyuis_sd15_ip2p(comfy_nodes):
    """The real SD1.5-IP2P folder's UNet layout (timbrooks/instruct-pix2pix), on meta tensors: ComfyUI's diffusers
    detector does not know it, and the pack's conversion lands every weight where ComfyUI's SD15_instructpix2pix
    expects it."""
    import comfy.model_detection
    import comfy.supported_models
    from comfyui_ip2p.pipeline.diffusers_folder import check_heads, comfy_unet_state_dict
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, diffusers_unet_config
    from diffusers import UNet2DConditionModel

    config = diffusers_unet_config(LAYOUTS["full"], 8)
    with torch.device("meta"):
        diffusers_state = UNet2DConditionModel(**config).state_dict()
    assert comfy.model_detection.unet_config_from_diffusers_unet(diffusers_state) is None
    converted = comfy_unet_state_dict(dict(diffusers_state), config)
    detected = comfy.model_detection.model_config_from_unet(converted, "")
    assert isinstance(detected, comfy.supported_models.SD15_instructpix2pix)
    check_heads(detected.unet_config, config)
