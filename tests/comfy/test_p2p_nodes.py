"""P2PPairGenerator and its ComfyUI glue (pipeline/p2p.py) on a tiny random text-to-image checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked
from PIL import Image

SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 11, "p_min": 0.1, "p_max": 0.9, "cfg_min": 7.5,
         "cfg_max": 15.0, "sampler_name": "euler_ancestral", "scheduler": "normal", "batch_size": 2}


@pytest.fixture(scope="module")
def t2i(comfy_nodes, comfy_base, tiny_t2i_ckpt):
    """(MODEL, CLIP, VAE) of the tiny text-to-image checkpoint, loaded for this module only."""
    import comfy.sd

    path = str(comfy_base / "models/checkpoints" / tiny_t2i_ckpt)
    return tuple(comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3])


@pytest.fixture(scope="module")
def sharp_t2i(t2i, comfy_base, tiny_t2i_ckpt):
    """The same checkpoint with self-attention logits scaled up 6x.

    Random weights give near-uniform self-attention maps (normalised entropy ~0.9), so whose map the edit
    uses hardly matters; trained models have peaked maps. Sharpening them makes the sharing measurable.
    """
    import comfy.sd

    path = str(comfy_base / "models/checkpoints" / tiny_t2i_ckpt)
    model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    with torch.no_grad():
        for name, weight in model.model.diffusion_model.named_parameters():
            if "attn1.to_q" in name:
                weight.mul_(6.0)
    return model, t2i[1], t2i[2]


def generate(node, model_clip_vae, caption_pairs, samples_per_pair=2, **overrides):
    kwargs = {**SMALL, **overrides}
    return node.execute(*model_clip_vae, caption_pairs=caption_pairs, samples_per_pair=samples_per_pair,
                        **kwargs).result


def saved_image(comfy_base, result, node_id) -> np.ndarray:
    info = result.outputs[node_id]["images"][0]
    return np.asarray(Image.open(comfy_base / "output" / info["subfolder"] / info["filename"]))


def test_parse_caption_pairs_and_refuse_malformed_lines(comfy_base):
    from comfyui_ip2p.pipeline.p2p import CaptionPair, parse_caption_pairs

    text = "a cat || a dog || make it a dog\n\n  a house ||a house in winter  \n"
    assert parse_caption_pairs(text) == [CaptionPair("a cat", "a dog", "make it a dog"),
                                         CaptionPair("a house", "a house in winter", "")]
    for bad in ("only one caption", "a || ", "a || b || c || d"):
        with pytest.raises(ValueError, match="line 1"):
            parse_caption_pairs(bad)


def test_step_index_maps_every_model_call_to_its_step(comfy_base):
    from comfyui_ip2p.pipeline.p2p import step_index

    schedule = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])
    assert [step_index(float(s), schedule) for s in schedule[:-1]] == [0, 1, 2, 3]
    # second-order samplers also evaluate between two sigmas: that call belongs to the step in progress
    assert step_index(4.0, schedule) == 1 and step_index(0.2, schedule) == 3 and step_index(20.0, schedule) == 0


def test_starting_noise_is_comfyui_noise_for_each_sample_seed_and_repeated_for_the_edit(comfy_base):
    import comfy.sample
    from comfyui_ip2p.pipeline.noise import SharedNoise

    noise = SharedNoise([5, 9], (4, 8, 8))
    start = noise.draw()
    assert start.shape == (4, 4, 8, 8)
    for row, seed in enumerate([5, 9]):
        expected = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed)
        torch.testing.assert_close(start[row:row + 1], expected, rtol=0, atol=0)
    torch.testing.assert_close(start[:2], start[2:], rtol=0, atol=0)
    step_noise = noise.sampler("euler_ancestral", torch.tensor([3.0, 1.0, 0.0]))(torch.tensor(3.0), torch.tensor(1.0))
    assert not torch.equal(step_noise[:2], start[:2]), "ancestral noise continues the sample's stream"
    torch.testing.assert_close(step_noise[:2], step_noise[2:], rtol=0, atol=0)


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_identical_captions_give_identical_images(comfy_nodes, t2i, sampler_name):
    from comfyui_ip2p.dataset.records import caption_group

    rows, inputs, edits = generate(comfy_nodes["P2PPairGenerator"], t2i, "a red barn || a red barn || keep it",
                                   sampler_name=sampler_name)
    assert inputs.shape == edits.shape == (2, 64, 64, 3)
    assert torch.equal(inputs, edits), "same captions, same noise: the pair must be identical"
    assert (inputs[0] - inputs[1]).abs().max() > 0.01, "samples have their own seeds"
    assert [row.seed for row in rows] == [11, 12]
    for row in rows:
        assert 0.1 <= row.p <= 0.9 and 7.5 <= row.cfg <= 15.0
        assert row.group == caption_group("a red barn", "keep it", "a red barn")
        assert row.input_image.size == row.edited_image.size == (64, 64)
        assert np.array_equal(np.asarray(row.input_image), np.asarray(row.edited_image))


def test_edit_gets_closer_to_the_source_as_p_rises(comfy_nodes, sharp_t2i):
    node = comfy_nodes["P2PPairGenerator"]
    pair = "a photo of a cat on a sofa || a watercolor painting of a dog on a sofa || make it a dog painting"
    runs = {p: generate(node, sharp_t2i, pair, samples_per_pair=2, steps=3, p_min=p, p_max=p) for p in (0.0, 1.0)}
    (rows0, src0, edit0), (rows1, src1, edit1) = runs[0.0], runs[1.0]
    assert [r.p for r in rows0] == [0.0] * 2 and [r.p for r in rows1] == [1.0] * 2
    torch.testing.assert_close(src0, src1, rtol=0, atol=1e-6, msg="sharing must never change the source image")
    far, near = (src0 - edit0).abs().mean(dim=(1, 2, 3)), (src1 - edit1).abs().mean(dim=(1, 2, 3))
    assert (near < far).all() and near.mean() < 0.9 * far.mean(), (far, near)


def test_results_do_not_depend_on_the_batch_size(comfy_nodes, t2i):
    node = comfy_nodes["P2PPairGenerator"]
    one = generate(node, t2i, "a cat || a dog", samples_per_pair=3, steps=2, batch_size=1)
    three = generate(node, t2i, "a cat || a dog", samples_per_pair=3, steps=2, batch_size=3)
    assert [(r.seed, r.p, r.cfg) for r in one[0]] == [(r.seed, r.p, r.cfg) for r in three[0]]
    assert len({r.cfg for r in one[0]}) == 3, "each sample draws its own cfg"
    torch.testing.assert_close(one[1], three[1], rtol=0, atol=2e-3)
    torch.testing.assert_close(one[2], three[2], rtol=0, atol=2e-3)


def test_rows_and_typed_pairs_are_both_used_in_order(comfy_nodes, t2i):
    from comfyui_ip2p.dataset.records import EditRow

    row = EditRow("a house", "make it a castle", "a castle", None, None, group="g-house")
    rows, inputs, _ = comfy_nodes["P2PPairGenerator"].execute(
        *t2i, rows=[row], caption_pairs="a cat || a dog", samples_per_pair=1, **{**SMALL, "steps": 1}).result
    assert [(r.input_caption, r.instruction, r.output_caption) for r in rows] == \
        [("a house", "make it a castle", "a castle"), ("a cat", "", "a dog")]
    assert rows[0].group == "g-house" and [r.seed for r in rows] == [11, 12]
    assert inputs.shape == (2, 64, 64, 3)


def forward(model, x, sigma, context, extra: dict | None = None) -> torch.Tensor:
    """One UNet forward with the model's transformer_options, as ComfyUI's sampler would pass them."""
    options = {**copy.copy(model.model_options.get("transformer_options", {})), **(extra or {})}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


def forward_inputs(batch: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    sigma = torch.full((batch,), 6.0)
    context = torch.randn(batch, 77, 768, generator=gen)
    return x, sigma, context


def test_patched_attention_equals_the_explicit_softmax_reference(sharp_t2i):
    from comfyui_ip2p.pipeline.p2p import patch_sharing, self_attention_keys, sharing_model
    from comfyui_ip2p.testing.attention import explicit_attention, explicit_shared_attention

    model = sharp_t2i[0]
    # Two samples, CFG batch [cond_src, cond_edit, uncond_src, uncond_edit] with 2 rows per part; at step 0
    # of 3, sample 0 (p=1) shares and sample 1 (p=0) does not.
    x, sigma, context = forward_inputs(8)
    step = {"sigmas": sigma, "sample_sigmas": torch.tensor([6.0, 3.0, 1.0, 0.0]), "cond_or_uncond": [0, 1]}
    expected_index = torch.tensor([0, 1, 0, 3, 4, 5, 4, 7])

    def reference_patch(q, k, v, extra_options):
        return explicit_shared_attention(q, k, v, extra_options["n_heads"], expected_index)

    reference = model.clone()
    for key in self_attention_keys(model.model.diffusion_model):
        reference.set_model_attn1_replace(reference_patch, *key)

    import comfy.ldm.modules.attention as attention

    shared = sharing_model(model, [1.0, 0.0])
    if attention.optimized_attention is not attention.attention_pytorch:  # CPU: sub-quadratic by default
        assert "optimized_attention_override" in shared.model_options["transformer_options"], "must run fused"
    fused = forward(shared, x, sigma, context, step)
    explicit = forward(patch_sharing(model, [1.0, 0.0], attn_fn=explicit_attention), x, sigma, context, step)
    wanted = forward(reference, x, sigma, context, step)
    plain = forward(model, x, sigma, context, step)
    torch.testing.assert_close(fused, wanted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(explicit, wanted, rtol=1e-4, atol=1e-4)
    sharing_rows, own_rows = [2, 6], [0, 1, 3, 4, 5, 7]
    torch.testing.assert_close(fused[own_rows], plain[own_rows], rtol=1e-4, atol=1e-4)
    assert (fused[sharing_rows] - plain[sharing_rows]).abs().max() > 1e-2, "the shared rows must change"
    # at the last step nothing shares: the patched model is the plain model
    last = {**step, "sigmas": torch.full((8,), 1.0)}
    torch.testing.assert_close(forward(sharing_model(model, [1.0, 0.0]), x, last["sigmas"], context, last),
                               forward(model, x, last["sigmas"], context, last), rtol=1e-5, atol=1e-5)


def test_an_earlier_attn1_replace_patch_still_runs_with_the_shared_queries(t2i):
    from comfyui_ip2p.pipeline.p2p import patch_sharing, self_attention_keys
    from comfyui_ip2p.testing.attention import sdpa_attention

    model = t2i[0]
    seen: list[torch.Tensor] = []

    def earlier(q, k, v, extra_options):
        seen.append(q)
        return sdpa_attention(q, k, v, extra_options["n_heads"])

    base = model.clone()
    key = self_attention_keys(model.model.diffusion_model)[0]
    base.set_model_attn1_replace(earlier, key[0], key[1])
    x, sigma, context = forward_inputs(2)
    step = {"sigmas": sigma, "sample_sigmas": torch.tensor([6.0, 0.0]), "cond_or_uncond": [0]}
    forward(patch_sharing(base, [1.0]), x, sigma, context, step)
    assert len(seen) == 1, "the earlier patch runs once, inside ours"
    torch.testing.assert_close(seen[0][1], seen[0][0], rtol=0, atol=0)


def test_the_connected_model_is_untouched(comfy_nodes, t2i):
    model = t2i[0]
    options_before = copy.deepcopy(model.model_options)
    x, sigma, context = forward_inputs(2)
    out_before = forward(model, x, sigma, context)
    generate(comfy_nodes["P2PPairGenerator"], t2i, "a cat || a dog", samples_per_pair=1, steps=2, p_min=1.0,
             p_max=1.0)
    assert model.model_options == options_before
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    torch.testing.assert_close(forward(model, x, sigma, context), out_before, rtol=0, atol=0)


def test_progress_covers_all_batches_with_side_by_side_previews(comfy_nodes, t2i):
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod

    updates: list[tuple[int, int, object]] = []
    previous_hook, previous_method = comfy.utils.PROGRESS_BAR_HOOK, latent_preview.args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **_: updates.append((value, total,
                                                                                              preview)))
    latent_preview.args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        generate(comfy_nodes["P2PPairGenerator"], t2i, "a cat || a dog", samples_per_pair=3, steps=2,
                 batch_size=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        latent_preview.args.preview_method = previous_method
    assert [(value, total) for value, total, _ in updates] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    preview = updates[0][2][1]
    assert preview.width == 2 * preview.height, "source and edit side by side"


def p2p_graph(ckpt, **overrides):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "samples_per_pair": 1, **SMALL,
              "caption_pairs": "a cat || a dog || make it a dog"}
    inputs.update(overrides)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "P2PPairGenerator", "inputs": inputs},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": "p2p_input"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": "p2p_edit"}},
    }


def test_node_runs_in_a_graph(comfy_nodes, comfy_base, tiny_t2i_ckpt):
    result = checked(run_prompt(p2p_graph(tiny_t2i_ckpt, steps=2)))
    assert saved_image(comfy_base, result, "3").shape == saved_image(comfy_base, result, "4").shape == (64, 64, 3)


def test_refusals_name_the_node_and_the_fix(comfy_nodes, t2i):
    from comfyui_ip2p.pipeline.loading import convert_to_ip2p

    node = comfy_nodes["P2PPairGenerator"]
    model, clip, vae = t2i
    with pytest.raises(ValueError, match=r"^P2PPairGenerator: .*InstructPix2Pix model.*Load Checkpoint"):
        generate(node, (convert_to_ip2p(model), clip, vae), "a cat || a dog")
    with pytest.raises(ValueError, match=r"^P2PPairGenerator: no caption pairs.*caption_pairs"):
        generate(node, t2i, "  \n")
    with pytest.raises(ValueError, match=r"^P2PPairGenerator: p_min \(0.8\) is larger than p_max"):
        generate(node, t2i, "a cat || a dog", p_min=0.8, p_max=0.2)
    with pytest.raises(ValueError, match=r"^P2PPairGenerator: caption_pairs line 2"):
        generate(node, t2i, "a cat || a dog\njust one caption")


def test_cancel_stops_generation_within_a_step(comfy_nodes, tiny_t2i_ckpt):
    import comfy.model_management

    steps_seen: list[int] = []

    def on_event(event, data):
        if event == "progress":
            steps_seen.append(data["value"])
            if data["value"] == 2:
                comfy.model_management.interrupt_current_processing(True)

    result = run_prompt(p2p_graph(tiny_t2i_ckpt, steps=50), on_event=on_event)
    assert not result.ok
    assert any(event == "execution_interrupted" for event, _ in result.events)
    assert max(steps_seen) <= 3, f"sampling went on after the cancel: {steps_seen}"
