"""The guider on real ComfyUI sampling: exact formula, branch batching, conditioning, and diffusers parity."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def loaded(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    import comfy.sd

    path = str(comfy_base / "models/checkpoints" / tiny_ip2p_ckpt)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    return model, clip, vae


def capture_denoised_sampler(store: list):
    """A one-call sampler: records the guided x0 prediction at the first sigma and returns it."""
    import comfy.samplers

    def one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
        sigma = sigmas[0] * x.new_ones([x.shape[0]])
        denoised = model(x, sigma, **(extra_args or {}))
        store.append((x.clone(), sigmas[0].item(), denoised.clone()))
        return denoised

    return comfy.samplers.KSAMPLER(one_step)


class Probe:
    """Replaces the UNet: each row's output encodes which conditioning it saw, and calls are recorded."""

    def __init__(self, empty_embedding: torch.Tensor):
        self.empty = empty_embedding
        self.calls: list[dict] = []

    def __call__(self, apply_model, args):
        c = args["c"]
        concat, context = c["c_concat"], c["c_crossattn"]
        self.calls.append({"batch": args["input"].shape[0], "concat": concat.clone(), "context": context.clone()})
        has_image = (concat.flatten(1).abs().sum(1) > 0).float()
        has_text = (~torch.isclose(context, self.empty.to(context)).flatten(1).all(1)).float()
        value = 1.0 + 100.0 * has_image + 10.0 * has_text
        return value.view(-1, 1, 1, 1).expand_as(args["input"]).to(args["input"])


def run_probe(loaded, s_i, s_t, pixels):
    import comfy.sample
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text
    from comfyui_ip2p.pipeline.guider import make_guider

    model, clip, vae = loaded
    empty = encode_text(clip, "")
    probe = Probe(empty[0][0])
    patched = model.clone()
    # a plain function: ModelPatcher.clone() may copy option objects, and the probe's record must survive
    patched.set_model_unet_function_wrapper(lambda apply_model, args: probe(apply_model, args))
    image_latent = encode_image(vae, pixels)
    guider = make_guider(patched, encode_text(clip, "make it winter"), empty, image_latent, s_i, s_t)
    store: list = []
    latent = torch.zeros_like(image_latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    guider.sample(noise, latent, capture_denoised_sampler(store), torch.tensor([5.0, 0.0]), seed=0)
    # The wrapper stands in for apply_model, which returns x0; the formula's weights sum to one, so
    # combining x0 predictions is the same as combining noise predictions.
    return store[0][2], probe, image_latent


@pytest.mark.parametrize("s_i,s_t,branches", [(1.5, 7.5, 3), (1.0, 7.5, 2), (1.0, 1.0, 1), (2.0, 1.0, 3),
                                               (0.0, 0.0, 3), (1.3, 12.0, 3)])
def test_guided_prediction_is_the_formula_in_one_batched_call(loaded, s_i, s_t, branches):
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    guided, probe, _ = run_probe(loaded, s_i, s_t, pixels)
    uncond, image, full = 1.0, 101.0, 111.0
    expected = uncond + s_i * (image - uncond) + s_t * (full - image)
    torch.testing.assert_close(guided, torch.full_like(guided, expected), rtol=1e-5, atol=1e-4)
    assert len(probe.calls) == 1, "all branches must go through one model call"
    assert probe.calls[0]["batch"] == branches


def test_branches_get_the_right_image_latent_and_text(loaded):
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    _, probe, image_latent = run_probe(loaded, 1.5, 7.5, pixels)
    call = probe.calls[0]
    concat = call["concat"]
    image_rows = [i for i in range(3) if concat[i].abs().sum() > 0]
    zero_rows = [i for i in range(3) if concat[i].abs().sum() == 0]
    assert len(image_rows) == 2 and len(zero_rows) == 1
    for row in image_rows:
        # SD1.5 IP2P: the raw VAE latent, NOT multiplied by the 0.18215 scaling factor
        torch.testing.assert_close(concat[row], image_latent[0].to(concat), rtol=1e-5, atol=1e-5)
    empty = probe.empty.to(call["context"])
    text_rows = [i for i in range(3) if not torch.isclose(call["context"][i], empty).all()]
    assert len(text_rows) == 1 and text_rows[0] in image_rows, "only the full branch sees the instruction"
    assert torch.isclose(call["context"][zero_rows[0]], empty).all(), "uncond gets the empty-prompt embedding"


def test_one_step_and_short_run_match_diffusers_pipeline(loaded, comfy_base, tiny_ip2p_ckpt):
    """Identical weights, noise, sigmas and embeddings: ComfyUI + our guider vs diffusers' IP2P pipeline."""
    import comfy.samplers
    import comfy.utils
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text
    from comfyui_ip2p.pipeline.guider import make_guider
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, diffusers_twin
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    model, clip, vae = loaded
    sd = comfy.utils.load_torch_file(str(comfy_base / "models/checkpoints" / tiny_ip2p_ckpt))
    twin = diffusers_twin(sd, LAYOUTS["tiny"], 8)
    # fp32 on both sides so the comparison measures the algorithm, not rounding
    model = model.clone()
    model.model.diffusion_model.float()
    model.model.manual_cast_dtype = None
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    image_latent = encode_image(vae, pixels).float()
    positive, empty = encode_text(clip, "make it winter"), encode_text(clip, "")
    steps, s_i, s_t = 4, 1.5, 7.5

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    # The pipeline reads only the VAE's config (latent channels, scale factor): image and output are latents.
    shape_only_vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1)
    pipe = StableDiffusionInstructPix2PixPipeline(vae=shape_only_vae, text_encoder=None, tokenizer=None, unet=twin,
                                                  scheduler=scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs_steps: list[torch.Tensor] = []

    def keep(pipeline, i, t, kwargs):
        theirs_steps.append(kwargs["latents"].clone())
        return kwargs

    scheduler.set_timesteps(steps)
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32)
    # Both start from the same x: ComfyUI scales full-denoise noise by sqrt(sigma^2 + 1), diffusers' Euler with
    # linspace spacing by sigma (its init_noise_sigma), so the pipeline gets the noise pre-scaled.
    start_scale = float((sigmas[0] ** 2 + 1) ** 0.5 / scheduler.init_noise_sigma)
    theirs = pipe(prompt_embeds=positive[0][0].float(), negative_prompt_embeds=empty[0][0].float(),
                  image=image_latent, num_inference_steps=steps, guidance_scale=s_t, image_guidance_scale=s_i,
                  latents=noise * start_scale, output_type="latent", callback_on_step_end=keep).images

    ours_steps: list[torch.Tensor] = []
    guider = make_guider(model, positive, empty, image_latent, s_i, s_t)
    sampler = comfy.samplers.sampler_object("euler")
    out = guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas,
                        callback=lambda step, x0, x, total: ours_steps.append(x.clone()), seed=0)
    ours = out * 0.18215  # guider.sample returns process_latent_out(x) = x / scale_factor
    # ComfyUI's callback sees x before each step; diffusers' sees latents after it.
    first_ours = ours_steps[1]
    rel_step = ((first_ours - theirs_steps[0]).norm() / theirs_steps[0].norm()).item()
    assert rel_step < 1e-4, f"one guided step differs from diffusers: relative error {rel_step:.2e}"
    rel_run = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel_run < 1e-3, f"{steps}-step run differs from diffusers: relative error {rel_run:.2e}"


def test_fused_attention_clone_leaves_original_and_user_overrides_alone(loaded, monkeypatch):
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfyui_ip2p.pipeline.attention import with_fused_attention

    model = loaded[0]
    patched = with_fused_attention(model)
    if attention.optimized_attention is attention.attention_pytorch:
        assert patched is model
        return
    assert patched is not model
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    user = model.clone()
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = print
    assert with_fused_attention(user) is user
    fused_calls = []
    sdpa = comfy.ops.scaled_dot_product_attention
    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 8 * 40, generator=gen) for _ in range(3))
    # called the way ComfyUI's layers call it: through the decorated default kernel
    options = patched.model_options["transformer_options"]
    out = attention.optimized_attention(q, k, v, 8, transformer_options=options)
    assert fused_calls, "the override must route the default kernel to PyTorch's fused attention"
    reference = attention.optimized_attention(q, k, v, 8)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
