"""InstructPix2Pix models in the diffusers folder layout, through LoadIP2PModel (issue 14).

Each folder is written by diffusers' own save_pretrained from random weights; its single-file twin holds the same
weights, so an edit from either must agree. SD1.5: testing/tiny_models.write_diffusers_folder. SDXL-IP2P and CosXL
Edit: testing/sdxl_folder.write_sdxl_ip2p_folder, a small SDXL-IP2P UNet that ComfyUI's diffusers detector does not
know; its text encoders are small, which ComfyUI cannot load (it builds SDXL's only at full size), so those tests
replace ComfyUI's text encoder loader with a recorder and edit with an SDXL-shaped stand-in CLIP.
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
    from comfyui_ip2p.pipeline.diffusers_folder import Prediction, check_heads, comfy_unet_state_dict, sdxl_ip2p_config
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        diffusers_state = UNet2DConditionModel(**SDXL_IP2P_DIFFUSERS).state_dict()
    known = comfy.model_detection.unet_config_from_diffusers_unet(diffusers_state)
    assert known is not None and known["in_channels"] == 8
    converted = comfy_unet_state_dict(dict(diffusers_state), SDXL_IP2P_DIFFUSERS)
    config = comfy.model_detection.model_config_from_unet(converted, "")
    assert isinstance(config, comfy.supported_models.SDXL_instructpix2pix)
    check_heads(config.unet_config, SDXL_IP2P_DIFFUSERS)
    # The pack's own SDXL path (taken by smaller layouts and by v-prediction schedulers) builds the same model
    # config from config.json as ComfyUI's diffusers detector builds from the weights.
    comfys = comfy.model_detection.model_config_from_diffusers_unet(diffusers_state).unet_config
    ours = sdxl_ip2p_config(SDXL_IP2P_DIFFUSERS, Prediction()).unet_config
    model_keys = set(comfys) - {"dtype", "use_checkpoint"}
    assert {k: ours[k] for k in model_keys} == {k: comfys[k] for k in model_keys}


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


# --- SDXL-IP2P and CosXL Edit folders in a layout ComfyUI's diffusers detector does not know ------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["sdxl-ip2p", "cosxl-edit"])
def sdxl_folder_and_twin(request, comfy_base) -> tuple[str, str, bool]:
    from comfyui_ip2p.testing.sdxl_folder import write_sdxl_ip2p_folder

    name = "tiny_cosxl_edit_folder" if request.param else "tiny_sdxl_ip2p_folder"
    twin = comfy_base / "models/checkpoints" / f"{name}_twin.safetensors"
    write_sdxl_ip2p_folder(comfy_base / "models/diffusers" / name, single_file=twin, seed=11, edm_vpred=request.param)
    return name, str(twin), request.param


class TextEncoderRecorder:
    """Stands in for ComfyUI's text encoder loader: keeps what it was given, returns an SDXL-shaped CLIP."""

    def __init__(self):
        self.state_dicts: list[dict] = []

    def __call__(self, state_dicts, embedding_directory=None, **kwargs):
        from comfyui_ip2p.testing.tiny_models import StubSDXLClip

        self.state_dicts = list(state_dicts)
        return StubSDXLClip()


def test_sdxl_folder_comfyui_does_not_know_edits_like_its_single_file_twin(comfy_nodes, comfy_base, monkeypatch,
                                                                           sdxl_folder_and_twin, record_property):
    import comfy.model_base
    import comfy.model_detection
    import comfy.sd
    from comfyui_ip2p.pipeline.loading import checkpoint_choices
    from comfyui_ip2p.testing.sdxl_folder import load_single_file
    from comfyui_ip2p.testing.tiny_models import StubSDXLClip
    from safetensors.torch import load_file

    name, twin, edm_vpred = sdxl_folder_and_twin
    folder = f"diffusers/{name}"
    assert folder in checkpoint_choices()
    unet_file = comfy_base / "models/diffusers" / name / "unet/diffusion_pytorch_model.safetensors"
    assert comfy.model_detection.unet_config_from_diffusers_unet(load_file(unet_file)) is None  # ComfyUI: unknown
    recorder = TextEncoderRecorder()
    monkeypatch.setattr(comfy.sd, "load_text_encoder_state_dicts", recorder)
    model, clip, vae = comfy_nodes["LoadIP2PModel"].execute(folder).result
    reference, reference_vae = load_single_file(twin)

    assert type(model.model) is comfy.model_base.SDXL_instructpix2pix and isinstance(clip, StubSDXLClip)
    expected = comfy.model_base.ModelType.V_PREDICTION_EDM if edm_vpred else comfy.model_base.ModelType.EPS
    assert model.model.model_type == reference.model.model_type == expected
    if edm_vpred:  # CosXL Edit's sampling, from the folder's EDMEulerScheduler config
        sampling = model.model.model_sampling
        assert (sampling.sigma_min.item(), sampling.sigma_max.item(), sampling.sigma_data) == pytest.approx(
            (0.002, 120.0, 1.0))
    folder_unet = model.model.diffusion_model.state_dict()
    file_unet = reference.model.diffusion_model.state_dict()
    assert folder_unet.keys() == file_unet.keys()
    assert all(torch.equal(folder_unet[k], file_unet[k]) for k in file_unet)
    # Both text encoders went to ComfyUI's loader, first CLIP-L then the projected one, under names it detects.
    assert len(recorder.state_dicts) == 2 and "text_projection.weight" in recorder.state_dicts[1]
    assert all(comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.CLIP_L for sd in recorder.state_dicts)

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    edit = comfy_nodes["InstructEdit"]
    loaded = ((model, clip, vae), (reference, StubSDXLClip(), reference_vae))
    results = [edit.execute(*parts, image, "make it winter", resolution=64, keep_input_size=True, **SETTINGS).result
               for parts in loaded]
    (folder_image, folder_latent), (file_image, file_latent) = results
    assert torch.isfinite(folder_latent["samples"]).all() and folder_latent["samples"].std() > 0
    latent_error = relative_error(folder_latent["samples"], file_latent["samples"])
    image_error = relative_error(folder_image, file_image)
    record_property("latent_relative_error", latent_error)
    record_property("image_relative_error", image_error)
    assert latent_error < 1e-4 and image_error < 1e-4



def write_config_only_folder(comfy_base, name: str, unet_config: dict, scheduler: dict | None = None) -> str:
    """A folder with model_index.json and unet/config.json (and a scheduler config): enough for the checks that
    refuse a folder before any weight is read."""
    target = comfy_base / "models/diffusers" / name
    (target / "unet").mkdir(parents=True, exist_ok=True)
    (target / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLInstructPix2PixPipeline"}))
    (target / "unet/config.json").write_text(json.dumps(unet_config))
    if scheduler is not None:
        (target / "scheduler").mkdir(exist_ok=True)
        (target / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler))
    return f"diffusers/{name}"


def test_sdxl_family_folder_without_sdxl_conditioning_is_refused(comfy_nodes, comfy_base):
    """An 8-channel UNet with the text_time embedding but the refiner's sizes (OpenCLIP-G only): ComfyUI's SDXL
    conditioning could not feed it, so it is refused by name before any weight is read."""
    refiner_like = {**SDXL_IP2P_DIFFUSERS, "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560}
    message = load_node_error(write_config_only_folder(comfy_base, "tiny_refiner_like_folder", refiner_like))
    assert "2048" in message and "cross_attention_dim" in message


def test_sdxl_folder_with_heads_comfyui_would_not_use_is_refused(comfy_nodes):
    from comfyui_ip2p.pipeline.diffusers_folder import DiffusersFolderError, Prediction, sdxl_ip2p_config
    from comfyui_ip2p.testing.sdxl_folder import DIFFUSERS_UNET

    with pytest.raises(DiffusersFolderError, match="attention heads"):
        sdxl_ip2p_config({**DIFFUSERS_UNET, "attention_head_dim": [2, 4, 4]}, Prediction())  # 32-channel heads


@pytest.mark.parametrize(("scheduler", "model_type", "sigma_data"), [
    (None, "EPS", None),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}, "EPS", None),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, "V_PREDICTION", None),
    ({"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction", "sigma_min": 0.002, "sigma_max": 120.0,
      "sigma_data": 1.0}, "V_PREDICTION_EDM", 1.0),
    ({"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction", "sigma_min": 0.002, "sigma_max": 80.0,
      "sigma_data": 0.5}, "V_PREDICTION_EDM", 0.5),
], ids=["no-scheduler", "epsilon", "v-prediction", "cosxl-edm", "edm-other-range"])
def test_scheduler_config_picks_comfyuis_model_type(comfy_nodes, tmp_path, scheduler, model_type, sigma_data):
    """What ComfyUI's SDXL config class makes of the markers the pack reads from scheduler_config.json."""
    import comfy.model_base
    from comfyui_ip2p.pipeline.diffusers_folder import scheduler_prediction, sdxl_ip2p_config
    from comfyui_ip2p.testing.sdxl_folder import DIFFUSERS_UNET

    if scheduler is not None:
        (tmp_path / "scheduler").mkdir()
        (tmp_path / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler))
    prediction = scheduler_prediction(tmp_path)
    config = sdxl_ip2p_config(DIFFUSERS_UNET, prediction)
    assert config.model_type(prediction.markers) == comfy.model_base.ModelType[model_type]
    if sigma_data is not None:
        assert config.sampling_settings["sigma_max"] == scheduler["sigma_max"]
        assert config.sampling_settings["sigma_min"] == scheduler["sigma_min"]
        assert config.sampling_settings["sigma_data"] == sigma_data


@pytest.mark.parametrize(("unet", "scheduler", "words"), [
    ("sdxl", {"_class_name": "DDPMScheduler", "prediction_type": "sample"}, ["'sample'", "epsilon"]),
    ("sdxl", {"_class_name": "EDMEulerScheduler", "prediction_type": "epsilon", "sigma_data": 0.5},
     ["continuous sigmas", "EDM v-prediction"]),
    ("sd15", {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, ["SD1.5", "epsilon"]),
], ids=["sdxl-sample-prediction", "sdxl-edm-epsilon", "sd15-v-prediction"])
def test_scheduler_comfyui_would_sample_wrongly_is_refused(comfy_nodes, comfy_base, unet, scheduler, words):
    """Without these refusals ComfyUI would load the UNet and sample it with another prediction type, no error.
    They come before any weight is read, so config files are enough."""
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, diffusers_unet_config

    config = SDXL_IP2P_DIFFUSERS if unet == "sdxl" else diffusers_unet_config(LAYOUTS["tiny"], 8)
    name = f"tiny_{unet}_{scheduler['prediction_type']}_scheduler_folder"
    message = load_node_error(write_config_only_folder(comfy_base, name, config, scheduler))
    assert all(word in message for word in words), message
