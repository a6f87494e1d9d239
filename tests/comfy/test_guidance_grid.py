"""The guidance grid in one batched sampling run: each cell equals the single edit with its scales and seed,
one model call per step covers the whole grid, and model patches act on the grid as on single edits."""

from __future__ import annotations

import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked

IMAGE_SCALES = [1.0, 1.5, 2.0]
TEXT_SCALES = [1.0, 7.5]
# Batched and single model calls differ only by float rounding (the kernels block a larger batch differently).
EQUAL = 1e-5
CHANGED = 100 * EQUAL  # a patch acts when it moves the grid far beyond the rounding


@pytest.fixture(scope="module")
def edit_inputs(comfy_nodes, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text, prepare_pixels
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(4))
    image_latent = encode_image(vae, prepare_pixels(image, 64))
    return model, encode_text(clip, "make it winter"), encode_text(clip, ""), image_latent


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def per_cell_and_grid(model, positive, negative, image_latent, sampler_name: str, seed: int = 7):
    from comfyui_ip2p.pipeline.edit import SamplingSettings, edit_latents
    from comfyui_ip2p.pipeline.grid import grid_cells, grid_latents

    cells = grid_cells(IMAGE_SCALES, TEXT_SCALES)
    base = SamplingSettings(steps=3, seed=seed, sampler_name=sampler_name)
    singles = torch.cat([edit_latents(model, positive, negative, image_latent,
                                      SamplingSettings(**{**base.__dict__, "image_scale": s_i, "text_scale": s_t}))
                         for s_i, s_t in cells])
    return singles, grid_latents(model, positive, negative, image_latent, cells, base)


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpmpp_sde", "euler"])
def test_batched_grid_equals_the_single_edits(edit_inputs, sampler_name):
    """Ancestral (Gaussian), SDE (Brownian tree) and deterministic samplers: every cell gets a single edit's
    starting and extra noise for the seed."""
    singles, grid = per_cell_and_grid(*edit_inputs, sampler_name)
    assert grid.shape == singles.shape
    error = relative(grid, singles)
    print(f"{sampler_name}: max relative error batched vs per-cell {error:.2e}")
    assert error < EQUAL, error
    assert relative(grid[0], grid[-1]) > 0.01, "different scales must give different edits"


def counting(model):
    """A clone of `model` whose UNet calls are recorded (batch size of each call)."""
    calls: list[int] = []
    counted = model.clone()

    def wrapper(apply_model, args):
        calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


def test_one_model_call_per_step_for_the_whole_grid(edit_inputs):
    from comfyui_ip2p.pipeline.edit import SamplingSettings
    from comfyui_ip2p.pipeline.grid import grid_cells, grid_latents

    model, positive, negative, image_latent = edit_inputs
    counted, calls = counting(model)
    cells = grid_cells(IMAGE_SCALES, TEXT_SCALES)
    grid_latents(counted, positive, negative, image_latent, cells, SamplingSettings(steps=4, seed=3))
    print(f"model calls for a {len(cells)}-cell grid in 4 steps: {calls}")
    assert calls == [3 * len(cells)] * 4, calls


def test_a_grid_that_does_not_fit_is_split_and_gives_the_same_cells(edit_inputs, monkeypatch):
    """Too little memory for even one branch of all cells: ComfyUI splits the branches, the grid the cells."""
    import comfy.model_management
    from comfyui_ip2p.pipeline.edit import SamplingSettings
    from comfyui_ip2p.pipeline.grid import grid_cells, grid_latents

    model, positive, negative, image_latent = edit_inputs
    cells = grid_cells(IMAGE_SCALES, TEXT_SCALES)
    settings = SamplingSettings(steps=2, seed=5)
    whole = grid_latents(model, positive, negative, image_latent, cells, settings)
    shape = [2, *image_latent.shape[1:]]
    room = model.model.memory_required(shape) * 1.5 + 1  # two rows of one branch per call
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: room)
    counted, calls = counting(model)
    split = grid_latents(counted, positive, negative, image_latent, cells, settings)
    assert max(calls) <= 2 and sum(calls) == 2 * 3 * len(cells), calls
    assert relative(split, whole) < EQUAL


def test_a_cfg_patch_changes_the_grid_as_it_changes_single_edits(edit_inputs):
    from comfy_extras.nodes_model_advanced import RescaleCFG
    from comfyui_ip2p.pipeline.edit import SamplingSettings
    from comfyui_ip2p.pipeline.grid import grid_cells, grid_latents

    model, positive, negative, image_latent = edit_inputs
    rescaled = RescaleCFG().patch(model, 1.0)[0]
    singles, grid = per_cell_and_grid(rescaled, positive, negative, image_latent, "euler_ancestral")
    plain = grid_latents(model, positive, negative, image_latent, grid_cells(IMAGE_SCALES, TEXT_SCALES),
                         SamplingSettings(steps=3, seed=7))
    print(f"RescaleCFG: grid vs single edits {relative(grid, singles):.2e}, vs the unpatched grid "
          f"{relative(grid, plain):.2e}")
    assert relative(grid, singles) < EQUAL
    assert relative(grid, plain) > CHANGED, "RescaleCFG must change the grid"


def test_grid_node_cells_equal_instruct_edit_through_the_executor(comfy_nodes, comfy_base, tiny_ip2p_ckpt,
                                                                  input_image):
    """The node through ComfyUI's executor: its images batch equals InstructEdit's edits at the same scales."""
    import numpy as np
    from PIL import Image

    settings = {"steps": 2, "seed": 9, "sampler_name": "euler_ancestral", "scheduler": "normal"}
    graph = {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_ip2p_ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": input_image}},
        "3": {"class_type": "IP2PGuidanceGrid",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0],
                         "instruction": "make it winter", "image_guidance_values": "1.0, 2.0",
                         "text_guidance_values": "7.5", "resolution": 64, **settings}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "grid_cells"}},
    }
    for index, s_i in enumerate([1.0, 2.0]):
        graph[f"e{index}"] = {"class_type": "InstructEdit", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "instruction": "make it winter",
            "image_guidance": s_i, "text_guidance": 7.5, **settings, "resolution": 64, "keep_input_size": False}}
        graph[f"s{index}"] = {"class_type": "SaveImage",
                              "inputs": {"images": [f"e{index}", 0], "filename_prefix": f"grid_single{index}"}}
    result = checked(run_prompt(graph))

    def saved(node_id: str) -> list[np.ndarray]:
        return [np.asarray(Image.open(comfy_base / "output" / info["subfolder"] / info["filename"])).astype(int)
                for info in result.outputs[node_id]["images"]]

    cells = saved("4")
    assert len(cells) == 2
    for index in range(2):
        assert np.abs(cells[index] - saved(f"s{index}")[0]).max() <= 1, index
