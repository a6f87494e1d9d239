"""SDXL-InstructPix2Pix and CosXL Edit: ComfyUI + our guider against diffusers' SDXL IP2P pipeline, same weights.

The small SDXL_instructpix2pix model (testing/tiny_models.tiny_sdxl_ip2p) and its diffusers twin
(testing/sdxl_twin) hold identical random weights. Both sides get the same embeddings (the stub CLIP's, passed to
the pipeline as prompt_embeds/pooled_prompt_embeds, so no text encoder runs), the same raw image latent, the same
starting latent and the same sigmas. What could legitimately differ is made equal in the setup, and checked:
- sigmas: the pipeline's scheduler chooses them and ComfyUI's sampler gets exactly those; ComfyUI turns a sigma
  into the UNet's timestep itself (the nearest of its 1000 discrete steps; EDM: 0.25 ln sigma), so the test
  asserts those timesteps equal the pipeline's;
- the starting latent: ComfyUI scales the noise by sqrt(1 + sigma_0^2) at full denoise, the pipeline by its
  scheduler's init_noise_sigma, so the pipeline gets the noise pre-scaled, and ComfyUI's start is asserted;
- size conditioning: the pack sets original and target size to the edit size with crop 0 (pipeline/edit.with_size),
  the pipeline's default for a given height/width; the edit is not square, so a swapped (height, width) shows;
- precision: float32 on both sides, PyTorch's fused attention on both, no VAE in the loop (a 4-channel `image`
  is taken by the pipeline as latents; the output is requested as latents);
- the image latent's scale: the pipeline concatenates the VAE's latent as it is (posterior mode, no scaling
  factor), like ComfyUI for SDXL-IP2P; only with is_cosxl_edit=True does it multiply by its VAE's scaling_factor
  (set to SDXL's here), which ComfyUI does for an EDM v-prediction model (CosXL Edit).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

PROMPT = "make it winter"
WIDTH, HEIGHT = 96, 64  # pixels; latents 12 x 8
STEPS, IMAGE_SCALE, TEXT_SCALE = 4, 1.5, 7.5
SDXL_LATENT_SCALE = 0.13025  # SDXL's VAE scaling factor
STEP_TOLERANCE, RUN_TOLERANCE = 1e-4, 1e-3


@dataclass
class EditInputs:
    positive: list  # ComfyUI conditioning, with the size keys InstructEdit sets
    negative: list
    image_latent: torch.Tensor  # raw VAE latent (no scaling factor)
    noise: torch.Tensor


@dataclass
class Reference:
    """The pipeline's latents after each step, and the sigmas / timesteps its scheduler chose."""

    after_step: list[torch.Tensor]
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    start: torch.Tensor


@pytest.fixture(scope="module", params=[False, True], ids=["sdxl-ip2p", "cosxl-edit"])
def pair(request, comfy_nodes):
    """(ComfyUI MODEL, diffusers twin UNet, edm_vpred)."""
    from comfyui_ip2p.testing.sdxl_twin import twin_of
    from comfyui_ip2p.testing.tiny_models import tiny_sdxl_ip2p

    model = tiny_sdxl_ip2p(seed=3, edm_vpred=request.param, dtype=torch.float32)
    return model, twin_of(model, torch.float32), request.param


def edit_inputs(model, width: int = WIDTH, height: int = HEIGHT) -> EditInputs:
    from comfyui_ip2p.pipeline.edit import encode_text, with_size
    from comfyui_ip2p.testing.tiny_models import StubSDXLClip

    clip = StubSDXLClip()
    positive, negative = (with_size(model, encode_text(clip, text), width, height) for text in (PROMPT, ""))
    gen = torch.Generator().manual_seed(7)
    # The VAE is not under test (both sides take latents); raw SDXL latents span several units, hence the 4.
    image_latent = 4.0 * torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    noise = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    return EditInputs(positive, negative, image_latent, noise)


def scheduler_for(edm_vpred: bool):
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

    if edm_vpred:
        # CosXL Edit's sampling: EDM v-prediction, sigma_data 1 (ComfyUI's default for it), sigmas 0.002..120
        return EDMEulerScheduler(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0, prediction_type="v_prediction",
                                 sigma_schedule="exponential")
    # SDXL's betas; linspace spacing gives whole timesteps (999, 666, 333, 0), which ComfyUI's discrete sampling
    # maps its sigmas back to exactly.
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="linspace")


def sdxl_pipeline(twin, edm_vpred: bool):
    from diffusers import AutoencoderKL, StableDiffusionXLInstructPix2PixPipeline

    # The pipeline reads only the VAE's config here (latent channels, 8x down-scaling, scaling_factor for
    # CosXL): image and output are latents.
    shape_only_vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                                   scaling_factor=SDXL_LATENT_SCALE)
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=shape_only_vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=twin,
        scheduler=scheduler_for(edm_vpred), add_watermarker=False, is_cosxl_edit=edm_vpred)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(conditioning: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of a one-entry ComfyUI conditioning: what the pipeline takes as prompt embeds."""
    context, options = conditioning[0]
    return context.float(), options["pooled_output"].float()


def run_diffusers(twin, edm_vpred: bool, inputs: EditInputs) -> Reference:
    pipe = sdxl_pipeline(twin, edm_vpred)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32).clone()
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float32).clone()
    # Full denoise: ComfyUI starts from noise * sqrt(1 + sigma_0^2); the pipeline multiplies `latents` by
    # init_noise_sigma itself.
    start = inputs.noise * float((sigmas[0] ** 2 + 1) ** 0.5)
    after_step: list[torch.Tensor] = []

    def keep(_index, _timestep, latents):  # this pipeline has only the older per-step callback
        after_step.append(latents.clone())

    positive, pooled = embeddings(inputs.positive)
    negative, negative_pooled = embeddings(inputs.negative)
    pipe(prompt_embeds=positive, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
         negative_pooled_prompt_embeds=negative_pooled, image=inputs.image_latent, height=HEIGHT, width=WIDTH,
         num_inference_steps=STEPS, guidance_scale=TEXT_SCALE, image_guidance_scale=IMAGE_SCALE,
         latents=start / scheduler.init_noise_sigma, output_type="latent", callback=keep, callback_steps=1)
    return Reference(after_step, sigmas, timesteps, start)


def run_ours(model, inputs: EditInputs, sigmas: torch.Tensor, image_scale: float = IMAGE_SCALE,
             text_scale: float = TEXT_SCALE) -> list[torch.Tensor]:
    """x before each step, then the final latent (in the pipeline's scaled latent space)."""
    import comfy.samplers
    from comfyui_ip2p.pipeline.guider import make_guider

    guider = make_guider(model, inputs.positive, inputs.negative, inputs.image_latent, image_scale, text_scale)
    xs: list[torch.Tensor] = []
    out = guider.sample(inputs.noise.clone(), torch.zeros_like(inputs.noise), comfy.samplers.sampler_object("euler"),
                        sigmas, callback=lambda _step, _x0, x, _total: xs.append(x.clone()), disable_pbar=True,
                        seed=0)
    return [*xs, out * SDXL_LATENT_SCALE]  # guider.sample returns process_latent_out(x) = x / scale_factor


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def runs(pair) -> tuple[EditInputs, Reference, list[torch.Tensor]]:
    """(inputs, the pipeline's run, our run) at the reference settings, once per model."""
    model, twin, edm_vpred = pair
    inputs = edit_inputs(model)
    reference = run_diffusers(twin, edm_vpred, inputs)
    return inputs, reference, run_ours(model, inputs, reference.sigmas)


def test_setup_gives_both_sides_the_same_timesteps_and_start(pair, runs):
    _inputs, ref, ours = runs
    timesteps = pair[0].get_model_object("model_sampling").timestep(ref.sigmas[:-1])
    torch.testing.assert_close(timesteps.float(), ref.timesteps, rtol=0, atol=1e-5)
    assert ref.sigmas[-1] == 0 and len(ref.after_step) == STEPS
    torch.testing.assert_close(ours[0], ref.start, rtol=1e-6, atol=1e-6)


def test_one_step_and_short_run_equal_diffusers_pipeline(runs):
    _inputs, ref, ours = runs
    # ComfyUI's callback sees x before each step, diffusers' the latents after it.
    rel_step = relative_error(ours[1], ref.after_step[0])
    assert rel_step < STEP_TOLERANCE, f"one guided step differs from diffusers: relative error {rel_step:.2e}"
    rel_run = relative_error(ours[-1], ref.after_step[-1])
    assert rel_run < RUN_TOLERANCE, f"{STEPS}-step run differs from diffusers: relative error {rel_run:.2e}"


@pytest.mark.parametrize("change", ["text guidance 6.5", "image guidance 1.25", "size swapped"])
def test_a_wrong_setting_is_clearly_caught(pair, runs, change):
    """The comparison can fail: one small change on our side moves the first step far past the tolerance."""
    model = pair[0]
    inputs, ref, _ours = runs
    image_scale, text_scale = IMAGE_SCALE, TEXT_SCALE
    if change.startswith("text"):
        text_scale = 6.5
    elif change.startswith("image"):
        image_scale = 1.25
    else:
        inputs = edit_inputs(model, width=HEIGHT, height=WIDTH)  # (height, width) conditioning swapped
    first_step = run_ours(model, inputs, ref.sigmas[:2], image_scale, text_scale)[1]
    rel_step = relative_error(first_step, ref.after_step[0])
    assert rel_step > 100 * STEP_TOLERANCE, f"{change}: relative error only {rel_step:.2e}"


def test_full_size_sdxl_ip2p_twin_is_sdxl_unet(comfy_nodes):
    """The twin's mapping at SDXL's real layout (meta tensors, no memory): every weight placed, shapes equal,
    and diffusers' config is SDXL's own (head counts 5/10/20, depths 1/2/10, 2816-wide added embedding)."""
    from comfyui_ip2p.testing.sdxl_twin import diffusers_sdxl_unet_config, meta_twin_check
    from comfyui_ip2p.testing.tiny_models import SDXL_FULL_UNET

    config = {**SDXL_FULL_UNET, "in_channels": 8}
    twin_config = diffusers_sdxl_unet_config(config)
    expected = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10], "layers_per_block": 2, "cross_attention_dim": 2048,
                "mid_block_type": "UNetMidBlock2DCrossAttn", "projection_class_embeddings_input_dim": 2816,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
    assert {k: twin_config[k] for k in expected} == expected
    # SDXL's UNet (2,567,463,684 parameters) plus conv_in's 4 extra input channels (4 x 320 x 3 x 3)
    assert meta_twin_check(config) == 2_567_463_684 + 4 * 320 * 9
