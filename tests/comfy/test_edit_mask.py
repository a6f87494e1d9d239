"""InstructEdit with a MASK: only the masked region changes, every pixel outside it is the input's own."""

from __future__ import annotations

import pytest
import torch

SETTINGS = {"image_guidance": 1.5, "text_guidance": 7.5, "steps": 2, "seed": 3, "sampler_name": "euler",
            "scheduler": "normal"}


@pytest.fixture(scope="module")
def loaded(comfy_nodes, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    calls: list[int] = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(
        lambda apply_model, args: calls.append(1) or apply_model(args["input"], args["timestep"], **args["c"]))
    return counted, clip, vae, calls


def edit(comfy_nodes, loaded, image, mask, **extra):
    model, clip, vae, _ = loaded
    inputs = {"resolution": 64, "keep_input_size": True, **SETTINGS, **extra}
    return comfy_nodes["InstructEdit"].execute(model, clip, vae, image, "make it winter", mask=mask,
                                               **inputs).result


def right_half(height: int, width: int, count: int = 1) -> torch.Tensor:
    mask = torch.zeros(count, height, width)
    mask[:, :, width // 2:] = 1.0
    return mask


@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (1, 45, 71, 3), (1, 40, 30, 4), (3, 37, 53, 3), (2, 50, 66, 4)],
                         ids=["rgb", "odd", "rgba", "batch", "rgba-batch"])
def test_pixels_outside_the_mask_are_the_input_exactly(comfy_nodes, loaded, shape):
    count, height, width, _ = shape
    image = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    mask = right_half(height, width, count)
    edited, _ = edit(comfy_nodes, loaded, image, mask)
    assert edited.shape == (count, height, width, 3)
    outside = mask[..., None].expand(count, height, width, 3) == 0
    assert torch.equal(edited[outside], image[..., :3][outside]), "a pixel outside the mask changed"
    inside = ~outside
    assert (edited[inside] - image[..., :3][inside]).abs().mean() > 0.02, "the masked region was not edited"


def test_one_mask_serves_a_batch_and_a_mask_of_another_size_is_resized(comfy_nodes, loaded):
    image = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(1))
    small = right_half(12, 20)  # a quarter of the size: resized to 48x80
    edited, _ = edit(comfy_nodes, loaded, image, small)
    # the bilinear resize softens the step over a few pixels left of column 40
    assert torch.equal(edited[:, :, :36], image[:, :, :36])
    assert (edited[:, :, 40:] - image[:, :, 40:]).abs().mean() > 0.02


def test_variations_keep_the_outside_too(comfy_nodes, loaded):
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    edited, latent = edit(comfy_nodes, loaded, image, right_half(64, 64, 2), variations=2)
    assert edited.shape[0] == 4 and latent["samples"].shape[0] == 4
    for index in range(4):
        assert torch.equal(edited[index, :, :32], image[index // 2, :, :32])
    assert (edited[0] - edited[1]).abs().max() > 0.01, "variations of one image must differ inside the mask"


def test_an_all_black_mask_returns_the_input_without_sampling(comfy_nodes, loaded):
    calls = loaded[3]
    image = torch.rand(1, 40, 30, 4, generator=torch.Generator().manual_seed(3))
    calls.clear()
    edited, latent = edit(comfy_nodes, loaded, image, torch.zeros(1, 40, 30))
    assert not calls, "an empty mask must not sample"
    assert torch.equal(edited, image[..., :3])
    assert latent["samples"].shape == (1, 4, 8, 8)


def test_feather_softens_inside_the_mask_only(comfy_nodes, loaded):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    sharp, _ = edit(comfy_nodes, loaded, image, right_half(64, 64))
    soft, _ = edit(comfy_nodes, loaded, image, right_half(64, 64), mask_feather=8)
    assert torch.equal(soft[:, :, :32], image[:, :, :32])
    # at the mask's edge the feathered edit stays close to the input; deep inside it is the full edit
    assert (soft[:, :, 32] - image[:, :, 32]).abs().mean() < 0.5 * (sharp[:, :, 32] - image[:, :, 32]).abs().mean()
    torch.testing.assert_close(soft[:, :, 56:], sharp[:, :, 56:])


def test_mask_batch_that_does_not_pair_is_refused(comfy_nodes, loaded):
    image = torch.rand(3, 32, 32, 3)
    with pytest.raises(ValueError, match="InstructEdit: got 2 masks for 3 images"):
        edit(comfy_nodes, loaded, image, torch.ones(2, 32, 32))


def test_feather_math_never_reaches_outside():
    from comfyui_ip2p.pipeline.masks import feather_inward

    mask = torch.zeros(1, 40, 40)
    mask[:, 10:30, 10:30] = 1.0
    soft = feather_inward(mask, 5)
    assert torch.equal(soft[mask == 0], torch.zeros_like(soft[mask == 0]))
    assert soft[0, 20, 20] == 1.0 and 0 < soft[0, 10, 20] < 0.5
    assert torch.all(soft <= mask)
