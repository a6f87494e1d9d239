"""Prompt-to-Prompt self-attention sharing: the shipped kernel (algorithms/p2p_attention.shared_attention, what
pipeline/p2p.py runs in every self-attention layer) against the explicit softmax, pairing and schedule."""

from __future__ import annotations

import pytest
import torch
from comfyui_ip2p.algorithms import p2p_attention as p2p
from comfyui_ip2p.testing import attention as ref

TOKENS = 12
HEAD_DIM = 8


def shared(q, k, v, heads: int, src_index: torch.Tensor | None) -> torch.Tensor:
    """The shipped kernel on torch's fused attention."""
    return p2p.shared_attention(q, k, v, heads, src_index, ref.sdpa_attention)


def sharing_schedule(num_steps: int, p: float) -> list[bool]:
    return [p2p.sharing_on(i, num_steps, p) for i in range(num_steps)]


def random_qkv(batch: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, TOKENS, heads * HEAD_DIM)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))


def test_explicit_attention_matches_a_hand_computed_case():
    # One head, one query over two keys with logits 0 and ln 3 after the 1/sqrt(d) scale: weights 1/4, 3/4.
    dim = 4
    scale = dim**0.5
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    k = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [torch.log(torch.tensor(3.0)).item() * scale, 0.0, 0.0, 0.0]]])
    v = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]]])
    out = ref.explicit_attention(q, k, v, heads=1)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 6.0, 0.0, 0.0]]]))
    torch.testing.assert_close(ref.sdpa_attention(q, k, v, heads=1), out)


@pytest.mark.parametrize("heads", [1, 2, 5])
def test_fused_sharing_equals_explicit_reference_for_halves(heads):
    q, k, v = random_qkv(batch=6, heads=heads, seed=heads)
    src_index = p2p.blocks_src_index(6, 1)
    assert src_index.tolist() == [0, 1, 2, 0, 1, 2]
    fused = shared(q, k, v, heads, src_index)
    reference = ref.explicit_shared_attention(q, k, v, heads, src_index)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 5])
def test_fused_sharing_equals_explicit_reference_for_a_cfg_batch(heads):
    # [cond_src, cond_edit, uncond_src, uncond_edit], two samples per chunk.
    q, k, v = random_qkv(batch=8, heads=heads, seed=10 + heads)
    src_index = p2p.blocks_src_index(8, blocks=2)
    assert src_index.tolist() == [0, 1, 0, 1, 4, 5, 4, 5]
    fused = shared(q, k, v, heads, src_index)
    reference = ref.explicit_shared_attention(q, k, v, heads, src_index)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_edited_rows_are_the_source_map_applied_to_their_own_values():
    heads = 2
    q, k, v = random_qkv(batch=2, heads=heads, seed=3)
    out = shared(q, k, v, heads, p2p.blocks_src_index(2, 1))
    source_map = torch.softmax(
        ref.split_heads(q[:1], heads) @ ref.split_heads(k[:1], heads).transpose(-1, -2) / HEAD_DIM**0.5,
        dim=-1,
    )
    expected_edit = ref.merge_heads(source_map @ ref.split_heads(v[1:], heads))
    torch.testing.assert_close(out[1:], expected_edit, rtol=1e-5, atol=1e-5)
    # The edited row's own q and k play no part.
    other_q, other_k, _ = random_qkv(batch=2, heads=heads, seed=4)
    q2, k2 = q.clone(), k.clone()
    q2[1], k2[1] = other_q[1], other_k[1]
    torch.testing.assert_close(shared(q2, k2, v, heads, p2p.blocks_src_index(2, 1)), out)


def test_rows_that_do_not_share_are_plain_attention():
    heads = 4
    q, k, v = random_qkv(batch=5, heads=heads, seed=5)
    src_index = p2p.share_indices(5, [(0, 3)])
    assert src_index.tolist() == [0, 1, 2, 0, 4]
    out = shared(q, k, v, heads, src_index)
    plain = ref.sdpa_attention(q, k, v, heads)
    untouched = [0, 1, 2, 4]
    torch.testing.assert_close(out[untouched], plain[untouched], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[3], plain[3], atol=1e-3)


def test_identity_index_is_plain_attention():
    heads = 2
    q, k, v = random_qkv(batch=4, heads=heads, seed=6)
    plain = ref.sdpa_attention(q, k, v, heads)
    assert torch.equal(shared(q, k, v, heads, torch.arange(4)), plain)
    assert torch.equal(shared(q, k, v, heads, None), plain)
    torch.testing.assert_close(plain, ref.explicit_attention(q, k, v, heads), rtol=1e-5, atol=1e-5)


def test_a_caller_attention_function_gets_one_call_for_the_whole_batch():
    calls = []

    def counting_attention(q, k, v, heads):
        calls.append(q.shape[0])
        return ref.explicit_attention(q, k, v, heads)

    q, k, v = random_qkv(batch=4, heads=2, seed=7)
    src_index = p2p.blocks_src_index(4, 1)
    out = p2p.shared_attention(q, k, v, 2, src_index, attn_fn=counting_attention)
    assert calls == [4]
    torch.testing.assert_close(out, shared(q, k, v, 2, src_index), rtol=1e-5, atol=1e-5)


def test_half_precision_runs_close_to_fp32():
    q, k, v = random_qkv(batch=4, heads=2, seed=8)
    src_index = p2p.blocks_src_index(4, 1)
    fp32 = shared(q, k, v, 2, src_index)
    fp16 = shared(q.half(), k.half(), v.half(), 2, src_index)
    assert fp16.dtype == torch.float16
    torch.testing.assert_close(fp16.float(), fp32, rtol=2e-2, atol=2e-2)


def test_bad_pairings_are_refused():
    q, k, v = random_qkv(batch=4, heads=2, seed=9)
    with pytest.raises(ValueError, match="shape"):
        shared(q, k, v, 2, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        shared(q, k, v, 2, torch.arange(3))
    with pytest.raises(ValueError, match="lie in"):
        shared(q, k, v, 2, torch.tensor([0, 1, 0, 4]))
    with pytest.raises(ValueError, match="more than one pair"):
        p2p.share_indices(4, [(0, 2), (1, 2)])
    with pytest.raises(ValueError, match="outside"):
        p2p.share_indices(4, [(0, 4)])
    with pytest.raises(ValueError, match="does not split"):
        p2p.blocks_src_index(6, blocks=2)
    with pytest.raises(ValueError, match="heads"):
        ref.sdpa_attention(q, k, v, heads=3)


# --- schedule ------------------------------------------------------------------------------------------


def test_schedule_boundaries():
    # p = 0 never shares; p = 1 shares at every step except the last, where i / (N - 1) = 1 is not < 1.
    assert sharing_schedule(5, 0.0) == [False] * 5
    assert sharing_schedule(5, 1.0) == [True, True, True, True, False]
    # p = 0.5 over 5 steps: i / 4 = 0, 0.25 share; 0.5 is not strictly below p.
    assert sharing_schedule(5, 0.5) == [True, True, False, False, False]
    assert sharing_schedule(5, 0.51) == [True, True, True, False, False]


def test_schedule_with_one_step_treats_progress_as_zero():
    assert p2p.sharing_on(0, 1, 0.1) is True
    assert p2p.sharing_on(0, 1, 0.0) is False


def test_schedule_counts_match_the_paper_setting():
    # 100 steps: sharing runs for the steps with i < 99 p, i.e. ceil(99 p) steps.
    assert sum(sharing_schedule(100, 0.1)) == 10
    assert sum(sharing_schedule(100, 0.9)) == 90


def test_schedule_refuses_steps_outside_the_run():
    with pytest.raises(ValueError):
        p2p.sharing_on(5, 5, 0.5)
    with pytest.raises(ValueError):
        p2p.sharing_on(0, 0, 0.5)


# --- per-sample parameters -----------------------------------------------------------------------------


def test_sampled_parameters_lie_in_the_papers_ranges():
    params = p2p.sample_p2p_params(2000, torch.Generator().manual_seed(0))
    assert params.p.shape == params.cfg.shape == (2000,)
    assert params.p.min() >= 0.1 and params.p.max() < 0.9
    assert params.cfg.min() >= 7.5 and params.cfg.max() < 15.0
    # Uniform over the range: the mean sits near the midpoint (std of the mean ~0.005 and ~0.05).
    assert params.p.mean().item() == pytest.approx(0.5, abs=0.03)
    assert params.cfg.mean().item() == pytest.approx(11.25, abs=0.3)


def test_sampling_is_deterministic_per_seed_and_prefix_stable():
    first = p2p.sample_p2p_params(10, torch.Generator().manual_seed(42))
    again = p2p.sample_p2p_params(10, torch.Generator().manual_seed(42))
    longer = p2p.sample_p2p_params(25, torch.Generator().manual_seed(42))
    other = p2p.sample_p2p_params(10, torch.Generator().manual_seed(43))
    assert torch.equal(first.p, again.p) and torch.equal(first.cfg, again.cfg)
    assert torch.equal(longer.p[:10], first.p) and torch.equal(longer.cfg[:10], first.cfg)
    assert not torch.equal(first.p, other.p)


def test_custom_ranges_and_a_degenerate_range():
    params = p2p.sample_p2p_params(50, torch.Generator().manual_seed(1), p_range=(0.3, 0.3), cfg_range=(2, 4))
    assert bool((params.p == 0.3).all())
    assert params.cfg.min() >= 2 and params.cfg.max() < 4
    with pytest.raises(ValueError, match="reversed"):
        p2p.sample_p2p_params(1, torch.Generator(), p_range=(0.9, 0.1))
