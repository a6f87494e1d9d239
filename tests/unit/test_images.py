import math

import pytest
import torch
from comfyui_ip2p.pipeline.images import guidance_grid, parse_scales, reference_size, resize_lanczos, to_rgb


def reference_formula(w, h, r):
    f = r / max(w, h)
    f = math.ceil(min(w, h) * f / 64) * 64 / min(w, h)
    return int(w * f / 64) * 64, int(h * f / 64) * 64


@pytest.mark.parametrize("w,h", [(512, 512), (640, 480), (480, 640), (1920, 1080), (333, 777), (700, 64),
                                 (100, 100), (1024, 1000)])
def test_reference_size_matches_the_reference_formula(w, h):
    got = reference_size(w, h, 512)
    assert got == reference_formula(w, h, 512)
    assert got[0] % 64 == 0 and got[1] % 64 == 0


def test_reference_size_known_values():
    assert reference_size(512, 512, 512) == (512, 512)
    assert reference_size(640, 480, 512) == (512, 384)
    assert reference_size(1920, 1080, 512) == (512, 320)


def test_reference_size_never_collapses_to_zero():
    assert reference_size(8192, 1, 512) == (max(reference_formula(8192, 1, 512)[0], 64), 64)
    with pytest.raises(ValueError):
        reference_size(0, 10, 512)


def test_lanczos_resize_keeps_range_and_constant_images():
    img = torch.full((2, 13, 7, 3), 0.25)
    out = resize_lanczos(img, 64, 128)
    assert out.shape == (2, 128, 64, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-4, rtol=0)


def test_to_rgb_handles_gray_and_rgba():
    gray = torch.rand(1, 5, 6, 1)
    assert torch.equal(to_rgb(gray)[..., 2], gray[..., 0])
    rgba = torch.rand(1, 5, 6, 4)
    assert torch.equal(to_rgb(rgba), rgba[..., :3])
    with pytest.raises(ValueError):
        to_rgb(torch.rand(1, 5, 6, 2))


def test_parse_scales():
    assert parse_scales("1.0, 1.5;2", "x") == [1.0, 1.5, 2.0]
    for bad in ["", "a", "-1", "nan"]:
        with pytest.raises(ValueError, match="x"):
            parse_scales(bad, "x")


def test_guidance_grid_places_cells_in_rows_and_columns():
    cells = torch.stack([torch.full((16, 16, 3), v) for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)])
    grid = guidance_grid(cells, [1.0, 2.0], [5.0, 7.5, 10.0])
    assert grid.shape == (1, 28 + 2 * 16, 84 + 3 * 16, 3)
    # second row, third column holds the sixth cell
    assert abs(grid[0, 28 + 16 + 8, 84 + 32 + 8, 0].item() - 1.0) < 1e-6
    assert abs(grid[0, 28 + 8, 84 + 16 + 8, 0].item() - 51 / 255) < 1e-6


def photo_like(w: int, h: int):
    """8-bit RGB with smooth shapes and mild grain: no Lanczos overshoot past 0 or 255 (see below)."""
    import numpy as np

    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    scene = np.stack([128 + 60 * np.sin(6 * x + c) * np.cos(5 * y - c) for c in range(3)], axis=-1)
    grain = np.random.default_rng(w * h).normal(0, 12, (h, w, 3))
    return np.clip(scene + grain, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (1920, 1080), (333, 777), (700, 90), (517, 389),
                                 (512, 512), (1000, 999)])
def test_crop_framing_is_the_references_imageops_fit(w, h):
    """resize_lanczos over fit_box is the reference's ImageOps.fit(image, size, LANCZOS).

    Same box and filter: equal to ImageOps.fit run by Pillow in float (mode F) to float precision. Against the
    reference's own 8-bit run the tolerance is 1.5/255, not 1/255: Pillow's 8-bit filter rounds to 8 bits after
    its horizontal pass (<= 0.5 level, then weighted by the vertical Lanczos taps, whose absolute sum is ~1.3)
    and again at the end (<= 0.5); measured at most 1.19/255 over this table. (On pure noise Pillow also clips
    the intermediate overshoot to 0..255, which no float pipeline reproduces: hence photo-like content.)
    """
    import numpy as np
    from comfyui_ip2p.pipeline.images import fit_box
    from PIL import Image, ImageOps

    array = photo_like(w, h)
    size = reference_size(w, h, 512)
    ours = resize_lanczos(torch.from_numpy(array).float()[None] / 255, *size, box=fit_box(w, h, *size))
    assert ours.shape == (1, size[1], size[0], 3)
    for c in range(3):
        channel = Image.fromarray(array[..., c].astype(np.float32) / 255, mode="F")
        in_float = np.asarray(ImageOps.fit(channel, size, method=Image.Resampling.LANCZOS)).clip(0, 1)
        torch.testing.assert_close(ours[0, ..., c], torch.from_numpy(in_float.copy()), atol=1e-6, rtol=0)
    reference = np.asarray(ImageOps.fit(Image.fromarray(array), size, method=Image.Resampling.LANCZOS))
    assert float((ours[0] * 255 - torch.from_numpy(reference.astype(np.float32))).abs().max()) <= 1.5


def test_fit_box_is_centred_and_has_the_output_aspect():
    from comfyui_ip2p.pipeline.images import box_pixels, fit_box

    assert fit_box(1920, 1080, 512, 320) == (96.0, 0.0, 1824.0, 1080.0)
    left, top, right, bottom = fit_box(333, 777, 192, 448)
    assert left == 0 and right == 333 and math.isclose((bottom - top) * 192 / 448, 333)
    assert math.isclose(top, 777 - bottom)
    assert fit_box(640, 480, 512, 384) == (0.0, 0.0, 640.0, 480.0)
    assert box_pixels((0.4, 10.5, 99.6, 20.49), 100, 30) == (0, 11, 100, 20)
