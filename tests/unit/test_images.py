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
