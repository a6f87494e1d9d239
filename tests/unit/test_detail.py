"""Full-resolution detail transfer (algorithms/detail.py) on a synthetic 2048x1536 photo with fine texture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from comfyui_ip2p.algorithms.detail import transfer_detail, upsample_change
from comfyui_ip2p.pipeline.images import resize_lanczos

HEIGHT, WIDTH, LOW_H, LOW_W = 1536, 2048, 384, 512  # reference_size(2048, 1536, 512) == (512, 384)
REGION = (100, 250, 150, 350)  # rows, columns of the recoloured region, in edit pixels


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def photo():
    """A smooth scene with pixel-level texture (noise + a near-Nyquist grating), its edit-size copy, and an
    edit that recolours one rectangle of it."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, HEIGHT), torch.linspace(0, 1, WIDTH), indexing="ij")
    scene = torch.stack([0.45 + 0.15 * torch.sin(3 * xx + 1), 0.5 + 0.1 * torch.cos(4 * yy), 0.4 + 0.1 * xx * yy],
                        dim=-1)
    texture = 0.08 * (torch.rand(HEIGHT, WIDTH, 1, generator=torch.Generator().manual_seed(0)) - 0.5)
    texture = texture + 0.05 * torch.sin(xx * WIDTH * 0.9)[..., None]
    original = (scene + texture).clamp(0, 1)[None]
    low = resize_lanczos(original, LOW_W, LOW_H)
    edited = low.clone()
    r0, r1, c0, c1 = REGION
    edited[:, r0:r1, c0:c1, 0] += 0.25
    edited[:, r0:r1, c0:c1, 2] -= 0.15
    return original, low, edited.clamp(0, 1)


def region_mask(scale: int) -> torch.Tensor:
    r0, r1, c0, c1 = REGION
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    mask[r0 * scale:r1 * scale, c0 * scale:c1 * scale] = True
    return mask


def test_untouched_pixels_keep_the_photo_and_the_region_gets_the_edit(photo):
    original, low, edited = photo
    out = transfer_detail(original, edited, low)
    assert out.shape == original.shape and out.dtype == original.dtype
    outside = ~region_mask(4)
    ours = psnr(out[0][outside], original[0][outside])
    upscaled = psnr(resize_lanczos(edited, WIDTH, HEIGHT)[0][outside], original[0][outside])
    # measured: ours 53.3 dB over every pixel outside (only a 2-pixel bilinear ramp at the region's edge
    # differs; beyond it the pixels are the input's, bit for bit); plain upscaling of the edit 27.8 dB
    assert ours >= 45.0, (ours, upscaled)
    assert upscaled < 35.0, upscaled
    far = ~F.max_pool2d(region_mask(4)[None, None].float(), 5, 1, 2)[0, 0].bool()
    assert torch.equal(out[0][far], original[0][far]), "pixels 2+ px from the edit must be the input's own"
    # inside: the output brought back to the edit's size is the edit. The Lanczos downscale used to compare
    # reaches 3 edit pixels, so the first 2 edit pixels inside the border mix in the outside (measured 0.8/255).
    down = resize_lanczos(out, LOW_W, LOW_H)
    r0, r1, c0, c1 = REGION
    inner = (slice(None), slice(r0 + 2, r1 - 2), slice(c0 + 2, c1 - 2))
    assert float((down[inner] - edited[inner]).abs().max()) <= 2 / 255
    # and the fine texture is still there inside the recoloured region (the edit alone has none of it)
    full_inner = out[0, (r0 + 2) * 4:(r1 - 2) * 4, (c0 + 2) * 4:(c1 - 2) * 4]
    texture = full_inner - original[0, (r0 + 2) * 4:(r1 - 2) * 4, (c0 + 2) * 4:(c1 - 2) * 4]
    assert float(texture.std(dim=(0, 1)).max()) < 1e-3, "inside, the change is a smooth shift of the original"


def test_no_change_gives_the_original_bit_for_bit():
    original = torch.rand(2, 45, 71, 3, generator=torch.Generator().manual_seed(1))
    low = resize_lanczos(original, 32, 16)
    assert torch.equal(transfer_detail(original, low, low), original)


@pytest.mark.parametrize("shape,low", [((1, 37, 53, 3), (16, 24)), ((3, 100, 61, 1), (64, 32)),
                                       ((2, 20, 30, 3), (64, 64))], ids=["odd", "gray-batch", "smaller-input"])
def test_shapes_batches_and_channels(shape, low):
    original = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    original_low = resize_lanczos(original, low[1], low[0])
    edited = (original_low + 0.1).clamp(0, 1)
    out = transfer_detail(original, edited, original_low)
    assert out.shape == original.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_a_uniform_change_is_applied_everywhere_exactly():
    original = torch.full((1, 50, 70, 3), 0.3) + 0.01 * torch.rand(1, 50, 70, 3)
    low = torch.full((1, 10, 14, 3), 0.3)
    out = transfer_detail(original, low + 0.2, low)
    torch.testing.assert_close(out, original + 0.2, atol=1e-6, rtol=0)


def test_upsample_change_is_bilinear_and_has_no_overshoot():
    step = torch.zeros(1, 4, 8, 1)
    step[:, :, 4:] = 1.0
    up = upsample_change(step, 16, 32)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0  # a Lanczos/bicubic filter rings here


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="transfer_detail"):
        transfer_detail(torch.rand(1, 8, 8, 3), torch.rand(1, 4, 4, 3), torch.rand(1, 4, 5, 3))
    with pytest.raises(ValueError, match="transfer_detail"):
        transfer_detail(torch.rand(2, 8, 8, 3), torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 3))
