import math

import pytest
import torch
from comfyui_ip2p.algorithms.dual_cfg import branches_needed, combine


def reference(uncond, image, full, s_i, s_t):
    return uncond + s_i * (image - uncond) + s_t * (full - image)


@pytest.mark.parametrize("s_i,s_t", [(1.5, 7.5), (1.0, 7.5), (1.0, 1.0), (2.5, 1.0), (0.0, 0.0), (0.0, 3.0),
                                     (1.2, 0.5), (30.0, 80.0)])
def test_combine_is_the_paper_formula(s_i, s_t):
    gen = torch.Generator().manual_seed(0)
    uncond, image, full = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    expected = reference(uncond, image, full, s_i, s_t)
    needed = branches_needed(s_i, s_t)
    # a skipped branch reaches combine as zeros, as ComfyUI's batch evaluation returns it
    zeros = torch.zeros_like(full)
    got = combine(uncond if needed.uncond else zeros, image if needed.image else zeros, full, s_i, s_t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fast_paths_drop_exactly_the_unused_branches():
    assert branches_needed(1.5, 7.5) == (True, True, True)
    assert branches_needed(1.0, 7.5) == (False, True, True)
    assert branches_needed(1.0, 1.0) == (False, False, True)
    # s_T == 1 alone does not cancel anything: e = e0 + s_I (e_img - e0) + (e_full - e_img)
    assert branches_needed(1.5, 1.0) == (True, True, True)


def test_keep_all_runs_every_branch():
    """ComfyUI's disable_cfg1_optimization (set by SAG and friends) must keep the branches they read."""
    assert branches_needed(1.0, 1.0, keep_all=True) == (True, True, True)
    assert branches_needed(1.0, 7.5, keep_all=True) == (True, True, True)


def test_cfg_hook_sees_the_image_pair_and_the_text_term_stays_exact():
    """The image-guidance pair goes through the given cfg (ComfyUI's cfg_function in the guider)."""
    gen = torch.Generator().manual_seed(1)
    uncond, image, full = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3))
    seen = []

    def cfg(cond, unc, scale):
        seen.append((cond, unc, scale))
        return torch.full_like(cond, 3.0)

    got = combine(uncond, image, full, 1.7, 6.0, cfg=cfg)
    assert len(seen) == 1 and seen[0][0] is image and seen[0][1] is uncond and seen[0][2] == 1.7
    torch.testing.assert_close(got, 3.0 + 6.0 * (full - image))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ValueError, match="image_guidance"):
        branches_needed(bad, 7.5)
    with pytest.raises(ValueError, match="text_guidance"):
        branches_needed(1.5, bad)
