"""The edit and model nodes through ComfyUI's executor (in-process), on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked
from PIL import Image

SETTINGS = {"steps": 3, "seed": 7, "sampler_name": "euler_ancestral", "scheduler": "normal"}


def saved_image(comfy_base, result, node_id) -> np.ndarray:
    info = result.outputs[node_id]["images"][0]
    return np.asarray(Image.open(comfy_base / "output" / info["subfolder"] / info["filename"]))


def edit_graph(ckpt, image_name, **overrides):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0],
              "instruction": "make it winter", "image_guidance": 1.5, "text_guidance": 7.5, **SETTINGS,
              "resolution": 64, "keep_input_size": True}
    inputs.update(overrides)
    return {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "3": {"class_type": "InstructEdit", "inputs": inputs},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ours"}},
    }


def core_graph(ckpt, image_name):
    """The hand-wired ComfyUI core graph for the same edit (RUNTIME_NOTES.md), on pre-resized pixels."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "InstructPixToPixConditioning",
              "inputs": {"positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["2", 0]}},
        "6": {"class_type": "DualCFGGuider",
              "inputs": {"model": ["1", 0], "cond1": ["5", 0], "cond2": ["5", 1], "negative": ["4", 0],
                         "cfg_conds": 7.5, "cfg_cond2_negative": 1.5, "style": "regular"}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": SETTINGS["sampler_name"]}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": SETTINGS["scheduler"],
                                                         "steps": SETTINGS["steps"], "denoise": 1.0}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": SETTINGS["seed"]}},
        "10": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["9", 0], "guider": ["6", 0], "sampler": ["7", 0], "sigmas": ["8", 0],
                          "latent_image": ["5", 2]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "core"}},
    }


def write_input(comfy_base, name, array):
    Image.fromarray(array).save(comfy_base / "input" / name)
    return name


def test_instruct_edit_equals_hand_wired_core_graph(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    # A 64x64 input is already at the reference size for resolution 64, so both graphs see the same pixels.
    rng = np.random.default_rng(0)
    name = write_input(comfy_base, "square64.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ours = checked(run_prompt(edit_graph(tiny_ip2p_ckpt, name)))
    core = checked(run_prompt(core_graph(tiny_ip2p_ckpt, name)))
    a, b = saved_image(comfy_base, ours, "4"), saved_image(comfy_base, core, "12")
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, "InstructEdit must equal the core graph"
    other_seed = checked(run_prompt(edit_graph(tiny_ip2p_ckpt, name, seed=8)))
    assert np.abs(saved_image(comfy_base, other_seed, "4").astype(int) - a.astype(int)).max() > 5


@pytest.mark.parametrize("shape", [(48, 80, 3), (13, 7, 3), (40, 30, 4), (33, 65)])
def test_instruct_edit_returns_input_size_for_odd_rgba_and_gray(comfy_nodes, comfy_base, tiny_ip2p_ckpt, shape):
    rng = np.random.default_rng(1)
    name = write_input(comfy_base, f"odd_{'x'.join(map(str, shape))}.png",
                       rng.integers(0, 256, shape, dtype=np.uint8))
    result = checked(run_prompt(edit_graph(tiny_ip2p_ckpt, name)))
    out = saved_image(comfy_base, result, "4")
    assert out.shape[:2] == shape[:2]


def test_instruct_edit_batches_images_and_variations(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    nodes_map = comfy_nodes
    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    out = nodes_map["InstructEdit"].execute(model, clip, vae, images, "make it winter", image_guidance=1.5,
                                            text_guidance=7.5, resolution=64, keep_input_size=False,
                                            variations=3, **SETTINGS)
    edited, latent = out.result
    assert edited.shape == (6, 64, 64, 3)
    assert latent["samples"].shape == (6, 4, 8, 8)
    # variations of one image differ from each other
    assert (edited[0] - edited[1]).abs().max() > 0.01


def test_dual_cfg_sampler_from_image_or_latent_agree(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = encode_text(clip, "make it winter"), encode_text(clip, "")
    node = comfy_nodes["DualCFGSampler"]
    kwargs = {"image_guidance": 1.5, "text_guidance": 7.5, "denoise": 1.0, **SETTINGS}
    from_image = node.execute(model, positive, negative, image=images, vae=vae, **kwargs).result
    from_latent = node.execute(model, positive, negative, image_latent={"samples": encode_image(vae, images)},
                               **kwargs).result
    torch.testing.assert_close(from_image[0]["samples"], from_latent[0]["samples"])
    assert len(from_image) == 1, "DualCFGSampler returns only its LATENT; the guider is the IP2PGuider node"
    with pytest.raises(ValueError, match="DualCFGSampler: connect either"):
        node.execute(model, positive, negative, **kwargs)


def test_guider_output_runs_in_sampler_custom_advanced(comfy_nodes, comfy_base, tiny_ip2p_ckpt, input_image):
    prompt = {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_ip2p_ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": input_image}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "IP2PGuider",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "image": ["2", 0],
                         "vae": ["1", 2], "image_guidance": 1.5, "text_guidance": 7.5}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                         "denoise": 1.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 80, "height": 48, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["8", 0], "guider": ["5", 0], "sampler": ["6", 0], "sigmas": ["7", 0],
                          "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "guider"}},
    }
    result = checked(run_prompt(prompt))
    assert saved_image(comfy_base, result, "12").shape == (48, 80, 3)


def test_guidance_grid_is_labelled_rows_by_columns(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    grid, cells = comfy_nodes["IP2PGuidanceGrid"].execute(
        model, clip, vae, image, "make it winter", "1.0, 2.0", "3, 7.5, 12", resolution=64,
        **{**SETTINGS, "steps": 2}).result
    assert cells.shape == (6, 64, 64, 3)
    assert grid.shape == (1, 28 + 2 * 64, 84 + 3 * 64, 3)
    assert (cells[0] - cells[5]).abs().max() > 0.01, "different scales must give different edits"


def test_load_refuses_text_to_image_checkpoint_and_names_the_fix(comfy_nodes, tiny_t2i_ckpt):
    result = run_prompt({"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_t2i_ckpt}},
                         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert not result.ok
    message = result.error["exception_message"]
    assert "LoadIP2PModel" in message and "ConvertToIP2P" in message and "4 input channels" in message


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_load_refuses_corrupt_files_clearly(comfy_nodes, comfy_base, content):
    name = f"broken_{len(content)}.safetensors"
    (comfy_base / "models/checkpoints" / name).write_bytes(content)
    result = run_prompt({"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": name}},
                         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("LoadIP2PModel:") and name in message


def test_instruct_edit_refuses_text_to_image_model(comfy_nodes, tiny_t2i_ckpt, input_image):
    prompt = edit_graph(tiny_t2i_ckpt, input_image)
    prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_t2i_ckpt}}
    result = run_prompt(prompt)
    assert not result.ok and "ConvertToIP2P" in result.error["exception_message"]


def test_convert_to_ip2p_is_exact_with_zero_image_latent(comfy_nodes, comfy_base, tiny_t2i_ckpt):
    import comfy.sd
    from comfyui_ip2p.pipeline.loading import CONV_IN, convert_to_ip2p, is_ip2p

    path = str(comfy_base / "models/checkpoints" / tiny_t2i_ckpt)
    t2i = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    before = {k: v.clone() for k, v in t2i.model.diffusion_model.state_dict().items()}
    converted = convert_to_ip2p(t2i)
    assert is_ip2p(converted) and not is_ip2p(t2i)
    after = t2i.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original model must be untouched"
    weight = converted.model.diffusion_model.state_dict()[CONV_IN]
    assert weight.shape[1] == 8 and torch.count_nonzero(weight[:, 4:]) == 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    sigma = torch.tensor([3.0])
    context = torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        original = t2i.model.apply_model(x, sigma, c_crossattn=context)
        widened = converted.model.apply_model(x, sigma, c_crossattn=context, c_concat=torch.zeros_like(x))
    torch.testing.assert_close(widened, original, rtol=1e-5, atol=1e-5)


def test_cancel_stops_the_edit_within_a_step(comfy_nodes, comfy_base, tiny_ip2p_ckpt, input_image):
    import comfy.model_management

    steps_seen: list[int] = []

    def on_event(event, data):
        if event == "progress":
            steps_seen.append(data["value"])
            if data["value"] == 2:
                comfy.model_management.interrupt_current_processing(True)

    prompt = edit_graph(tiny_ip2p_ckpt, input_image, steps=50)
    result = run_prompt(prompt, on_event=on_event)
    assert not result.ok
    assert any(event == "execution_interrupted" for event, _ in result.events)
    assert max(steps_seen) <= 3, f"sampling went on after the cancel: {steps_seen}"
    # the next prompt runs normally: the interrupt flag does not leak
    assert run_prompt(edit_graph(tiny_ip2p_ckpt, input_image, steps=1)).ok


def test_instruct_edit_resolution_defaults_to_the_models_native_size(comfy_nodes, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.edit import NATIVE_RESOLUTION
    from comfyui_ip2p.pipeline.loading import load_ip2p

    schema = comfy_nodes["InstructEdit"].define_schema()
    widget = next(i for i in schema.inputs if i.id == "resolution")
    assert widget.default == NATIVE_RESOLUTION
    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    images = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(4))
    node = comfy_nodes["InstructEdit"]
    run = {"image_guidance": 1.0, "text_guidance": 1.0, **SETTINGS, "steps": 1, "keep_input_size": False}
    # SD1.5: native 512 -> the reference size of a 96x64 image at 512 is 576x384
    native = node.execute(model, clip, vae, images, "make it winter", resolution=widget.default, **run).result
    assert native[1]["samples"].shape[-2:] == (384 // 8, 576 // 8)
    explicit = node.execute(model, clip, vae, images, "make it winter", resolution=128, **run).result
    assert explicit[1]["samples"].shape[-2:] == (128 // 8, 192 // 8)
    own_size = node.execute(model, clip, vae, images, "make it winter", resolution=0, **run).result
    assert own_size[1]["samples"].shape[-2:] == (64 // 8, 96 // 8)
