"""InstructEdit's `detail` (full-resolution detail transfer) and `framing` (stretch / the reference's crop) on
the tiny model: the wiring, the sizes, and how both combine with masks, batches, RGBA, grayscale and odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked
from PIL import Image, ImageOps

SETTINGS = {"image_guidance": 1.5, "text_guidance": 7.5, "steps": 2, "seed": 5, "sampler_name": "euler",
            "scheduler": "normal"}


@pytest.fixture(scope="module")
def loaded(comfy_nodes, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    return load_ip2p(tiny_ip2p_ckpt)


def edit(comfy_nodes, loaded, image, **extra):
    model, clip, vae = loaded
    inputs = {"resolution": 64, "keep_input_size": True, **SETTINGS, **extra}
    return comfy_nodes["InstructEdit"].execute(model, clip, vae, image, "make it winter", **inputs).result


def rand(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_detail_off_is_todays_output_bit_for_bit(comfy_nodes, loaded):
    from comfyui_ip2p.pipeline.edit import decode

    image = rand((2, 150, 110, 3), 1)
    edited, latent = edit(comfy_nodes, loaded, image, detail=False)
    # today's path: decode, then one Lanczos resize to the input's size
    assert torch.equal(edited, decode(loaded[2], latent["samples"], (110, 150)))


@pytest.mark.parametrize("shape", [(1, 200, 150, 3), (1, 129, 97, 4), (3, 101, 77, 3), (2, 90, 130, 1)],
                         ids=["rgb", "rgba-odd", "batch-odd", "gray-batch"])
def test_detail_is_the_input_plus_the_edits_change(comfy_nodes, loaded, shape):
    from comfyui_ip2p.algorithms.detail import transfer_detail
    from comfyui_ip2p.pipeline.edit import decode, prepare_pixels
    from comfyui_ip2p.pipeline.images import to_rgb

    image = rand(shape, sum(shape))
    edited, latent = edit(comfy_nodes, loaded, image, variations=2)  # detail is on by default
    count, height, width = shape[:3]
    assert edited.shape == (2 * count, height, width, 3)
    assert latent["samples"].shape[0] == 2 * count
    original = to_rgb(image).repeat_interleave(2, dim=0)
    low = prepare_pixels(image, 64).repeat_interleave(2, dim=0)
    expected = transfer_detail(original, decode(loaded[2], latent["samples"]), low)
    assert torch.equal(edited, expected)
    soft, _ = edit(comfy_nodes, loaded, image, variations=2, detail=False)
    # the input's fine detail (its pixel noise here) survives only with detail on
    assert (edited - original).abs().mean() < (soft - original).abs().mean()


def test_detail_at_the_edit_size_changes_nothing(comfy_nodes, loaded):
    image = rand((1, 64, 64, 3), 3)
    on, _ = edit(comfy_nodes, loaded, image, detail=True)
    off, _ = edit(comfy_nodes, loaded, image, detail=False)
    assert torch.equal(on, off)


@pytest.mark.parametrize("framing", ["stretch", "crop"])
def test_detail_with_a_mask_keeps_the_outside_exactly(comfy_nodes, loaded, framing):
    image = rand((2, 97, 180, 4), 4)
    mask = torch.zeros(2, 97, 180)
    mask[:, :, 90:] = 1.0
    edited, _ = edit(comfy_nodes, loaded, image, mask=mask, mask_feather=6, framing=framing)
    assert edited.shape == (2, 97, 180, 3)
    assert torch.equal(edited[:, :, :90], image[:, :, :90, :3])
    assert (edited[:, :, 100:] - image[:, :, 100:, :3]).abs().mean() > 0.02


@pytest.mark.parametrize("w,h", [(160, 90), (90, 160), (101, 67), (64, 64), (300, 40)])
def test_crop_sends_the_references_imageops_fit_to_the_vae(comfy_nodes, loaded, monkeypatch, w, h):
    """The pixels the VAE encodes are ImageOps.fit(image, reference size, LANCZOS) of the 8-bit input, within
    1.5/255: Pillow's 8-bit filter rounds after each of its two passes (tests/unit/test_images.py measures it)."""
    from comfyui_ip2p.pipeline.images import reference_size

    seen = []
    vae = loaded[2]
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: seen.append(pixels.clone()) or encode(pixels))
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    array = np.stack([128 + 80 * np.sin(7 * x + c) * np.cos(4 * y) for c in range(3)], -1).round().astype(np.uint8)
    image = torch.from_numpy(array).float()[None] / 255
    for keep in (True, False):
        edited, _ = edit(comfy_nodes, loaded, image, framing="crop", keep_input_size=keep, steps=1)
        size = reference_size(w, h, 64)
        reference = np.asarray(ImageOps.fit(Image.fromarray(array), size, method=Image.Resampling.LANCZOS))
        assert seen[-1].shape == (1, size[1], size[0], 3)
        assert float((seen[-1][0] * 255 - torch.from_numpy(reference.astype(np.float32))).abs().max()) <= 1.5
        assert edited.shape[1:3] == ((h, w) if keep else (size[1], size[0]))


def test_crop_puts_the_edit_back_in_place_and_keeps_the_cut_off_border(comfy_nodes, loaded):
    from comfyui_ip2p.pipeline.images import box_pixels, fit_box, reference_size

    image = rand((2, 90, 200, 3), 6)  # edit size 128x64 at 64: a 180x90 centre crop, 10 px cut off each side
    size = reference_size(200, 90, 64)
    x0, y0, x1, y1 = box_pixels(fit_box(200, 90, *size), 200, 90)
    assert (x0, y0, x1, y1) == (10, 0, 190, 90)
    for detail in (True, False):
        edited, latent = edit(comfy_nodes, loaded, image, framing="crop", detail=detail)
        assert edited.shape == (2, 90, 200, 3)
        assert latent["samples"].shape[2:] == (size[1] // 8, size[0] // 8)
        assert torch.equal(edited[:, :, :x0], image[:, :, :x0]) and torch.equal(edited[:, :, x1:], image[:, :, x1:])
        assert (edited[:, :, x0:x1] - image[:, :, x0:x1]).abs().mean() > 0.02


def test_detail_and_framing_through_the_executor(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    y, x = np.mgrid[0:75, 0:203]
    photo = ((x * 7 + y * 3) % 256).astype(np.uint8)[..., None].repeat(4, axis=-1)  # odd size, an RGBA file
    Image.fromarray(photo, "RGBA").save(comfy_base / "input" / "detail_rgba.png")
    graph = {
        "1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_ip2p_ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "detail_rgba.png"}},
        "3": {"class_type": "InstructEdit", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "instruction": "make it winter",
            **SETTINGS, "resolution": 64, "keep_input_size": True, "detail": True, "framing": "crop"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "detail"}},
        "5": {"class_type": "IP2PReferenceResize", "inputs": {"image": ["2", 0], "resolution": 64,
                                                              "framing": "crop"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "fitted"}},
    }
    from comfyui_ip2p.pipeline.images import reference_size

    result = checked(run_prompt(graph))
    width, height = reference_size(203, 75, 64)
    for node, shape in (("4", (75, 203, 3)), ("6", (height, width, 3))):
        info = result.outputs[node]["images"][0]
        saved = np.asarray(Image.open(comfy_base / "output" / info["subfolder"] / info["filename"]))
        assert saved.shape == shape
