"""IP2PAutoGuidance end to end through ComfyUI's executor: tiny IP2P checkpoint, tiny random CLIP scorer."""

from __future__ import annotations

import pytest
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked


@pytest.fixture(scope="module")
def tiny_clip(comfy_base, comfy_nodes) -> str:
    from comfyui_ip2p.testing.tiny_clip import write_tiny_clip

    return write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip", seed=0)


def auto_graph(ckpt: str, image_name: str, clip_weights: str, **overrides) -> dict:
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0],
              "instruction": "make it winter", "image_guidance_values": "1.0, 1.5",
              "text_guidance_values": "3, 7.5, 12", "steps": 2, "seed": 3, "sampler_name": "euler_ancestral",
              "scheduler": "normal", "resolution": 64, "clip_weights": clip_weights, "min_image_similarity": -1.0,
              **overrides}
    return {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "3": {"class_type": "IP2PAutoGuidance", "inputs": inputs},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_auto_guidance_runs_end_to_end_and_plots_the_grid(comfy_nodes, comfy_base, tiny_ip2p_ckpt, input_image,
                                                          tiny_clip):
    from PIL import Image

    result = checked(run_prompt(auto_graph(tiny_ip2p_ckpt, input_image, tiny_clip)))
    s_i, s_t = float(result.outputs["5"]["text"][0]), float(result.outputs["6"]["text"][0])
    assert s_i in (1.0, 1.5) and s_t in (3.0, 7.5, 12.0)
    plot_info = result.outputs["4"]["images"][0]
    plot = Image.open(comfy_base / "temp" / plot_info["subfolder"] / plot_info["filename"])
    # 2 rows x 3 columns of 72 px cells under the labels (pipeline/auto_guidance.py's layout).
    assert plot.size == (84 + 3 * 72, 40 + 2 * 72) and plot.mode == "RGB"
    edit_info = result.outputs["7"]["images"][0]  # the 80x48 input resized like the reference, at 64
    assert Image.open(comfy_base / "temp" / edit_info["subfolder"] / edit_info["filename"]).size == (64, 64)


def test_auto_guidance_choice_matches_its_scores(comfy_nodes, tiny_ip2p_ckpt, tiny_clip):
    """The chosen cell is the rule's choice on the cells' own CLIP scores, and its edit is that cell's."""
    import torch
    from comfyui_ip2p.algorithms.guidance_choice import choose_cell
    from comfyui_ip2p.pipeline.auto_guidance import auto_guidance
    from comfyui_ip2p.pipeline.edit import SamplingSettings
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    result = auto_guidance(model, clip, vae, image, "make it winter", [1.0, 2.0], [5.0, 9.0], 64,
                           SamplingSettings(steps=2, seed=1, sampler_name="euler"), tiny_clip, 0.0,
                           input_caption="a photo", output_caption="a photo in winter")
    assert result.cells.shape == (4, 64, 64, 3) and result.plot.shape[0] == 1 and result.plot.shape[-1] == 3
    expected = choose_cell(result.scores.sim_dir.tolist(), result.scores.sim_image.tolist(), 0.0)
    assert result.choice == expected
    assert result.scales == [(1.0, 5.0), (1.0, 9.0), (2.0, 5.0), (2.0, 9.0)][expected.index]
    assert torch.equal(result.edit[0], result.cells[expected.index])


def test_one_caption_alone_is_refused_with_the_fix(comfy_nodes, tiny_ip2p_ckpt, input_image, tiny_clip):
    result = run_prompt(auto_graph(tiny_ip2p_ckpt, input_image, tiny_clip, input_caption="a house"))
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("IP2PAutoGuidance: ") and "output_caption" in message
