"""SDXL-InstructPix2Pix and CosXL Edit: ComfyUI's detection, the pack's checks, and the edit nodes end to end.

ComfyUI detects SDXL_instructpix2pix only in SDXL's full layout, so detection is proven on a full-size state dict
of meta tensors (no memory) and execution on ComfyUI's own SDXL_instructpix2pix class built with a small layout
(testing/tiny_models.tiny_sdxl_ip2p). The text conditioning has SDXL's shapes (testing/tiny_models.StubSDXLClip):
SDXL's two real text encoders are too large to build here.
"""

from __future__ import annotations

import pytest
import torch

SETTINGS = {"steps": 2, "seed": 5, "sampler_name": "euler_ancestral", "scheduler": "normal"}
SDXL_LATENT_SCALE = 0.13025  # SDXL's VAE scaling factor: CosXL Edit's concat latent is multiplied by it


@pytest.mark.parametrize("edm_vpred", [False, True], ids=["sdxl-ip2p", "cosxl-edit"])
def test_full_size_sdxl_ip2p_is_detected_and_accepted(comfy_nodes, edm_vpred):
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    from comfyui_ip2p.pipeline.loading import check_is_ip2p, is_ip2p
    from comfyui_ip2p.testing.tiny_models import UNET_PREFIX, sdxl_ip2p_meta_state_dict

    sd = sdxl_ip2p_meta_state_dict(edm_vpred)
    assert sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == 8
    config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    assert type(config) is comfy.supported_models.SDXL_instructpix2pix
    expected_type = comfy.model_base.ModelType.V_PREDICTION_EDM if edm_vpred else comfy.model_base.ModelType.EPS
    assert config.model_type(sd) == expected_type
    model = config.get_model(sd, "", device=torch.device("meta"))  # the full UNet, without allocating it
    assert isinstance(model, comfy.model_base.SDXL_instructpix2pix)
    if edm_vpred:
        sampling = model.model_sampling
        assert isinstance(sampling, comfy.model_sampling.V_PREDICTION)
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM)
        assert sampling.sigma_max.item() == pytest.approx(120.0)
        assert sampling.sigma_min.item() == pytest.approx(0.002)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    check_is_ip2p(patcher, "sdxl_ip2p.safetensors")  # what LoadIP2PModel and InstructEdit ask
    assert is_ip2p(patcher)


@pytest.fixture(scope="module", params=[False, True], ids=["sdxl-ip2p", "cosxl-edit"])
def sdxl(request, comfy_nodes):
    """(MODEL, CLIP stand-in, VAE, edm_vpred) for a small SDXL-IP2P model."""
    import comfy.sd
    from comfyui_ip2p.testing.tiny_models import VAE_PREFIX, StubSDXLClip, taesd_state_dict, tiny_sdxl_ip2p

    vae_sd = {k.removeprefix(VAE_PREFIX): v.float() for k, v in taesd_state_dict(4).items()}
    return tiny_sdxl_ip2p(seed=1, edm_vpred=request.param), StubSDXLClip(), comfy.sd.VAE(sd=vae_sd), request.param


class ForwardProbe:
    """Replaces the diffusion model's forward: records what the UNet receives (after the model class has
    processed the conditioning) and answers one constant per row saying which conditioning it saw."""

    def __init__(self, empty_context: torch.Tensor):
        self.empty = empty_context
        self.calls: list[dict] = []

    def __call__(self, x, timesteps=None, context=None, y=None, **kwargs):
        self.calls.append({"x": x.clone(), "context": context.clone(), "y": y.clone()})
        concat = x[:, 4:]
        has_image = (concat.flatten(1).abs().sum(1) > 0).float()
        has_text = (~torch.isclose(context, self.empty.to(context)).flatten(1).all(1)).float()
        value = 0.1 + 0.3 * has_image + 0.05 * has_text
        return value.view(-1, 1, 1, 1).expand(x.shape[0], 4, *x.shape[2:]).to(x)


def capture_denoised_sampler(store: list):
    import comfy.samplers

    def one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        store.append((x.clone(), sigmas[0].item(), denoised.clone()))
        return denoised

    return comfy.samplers.KSAMPLER(one_step)


def probed(model, empty_context):
    patched = model.clone()  # shares the diffusion model: its forward is swapped for this test, then restored
    probe = ForwardProbe(empty_context)
    original = model.model.diffusion_model.forward
    model.model.diffusion_model.forward = probe
    return patched, probe, original


@pytest.mark.parametrize("s_i,s_t,branches", [(1.5, 7.5, 3), (1.0, 7.5, 2), (1.0, 1.0, 1), (1.3, 12.0, 3)])
def test_guidance_formula_prediction_type_and_scaled_concat(sdxl, s_i, s_t, branches):
    import comfy.sample
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text
    from comfyui_ip2p.pipeline.guider import make_guider

    model, clip, vae, edm_vpred = sdxl
    empty = encode_text(clip, "")
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    image_latent = encode_image(vae, pixels)
    patched, probe, original = probed(model, empty[0][0])
    try:
        guider = make_guider(patched, encode_text(clip, "make it winter"), empty, image_latent, s_i, s_t)
        latent = torch.zeros_like(image_latent)
        store: list = []
        guider.sample(comfy.sample.prepare_noise(latent, 0), latent, capture_denoised_sampler(store),
                      torch.tensor([5.0, 0.0]), seed=0)
    finally:
        model.model.diffusion_model.forward = original
    assert len(probe.calls) == 1 and probe.calls[0]["x"].shape[0] == branches, "one batched call per step"
    x, sigma, guided = store[0]
    uncond, image, full = 0.1, 0.4, 0.45
    out = uncond + s_i * (image - uncond) + s_t * (full - image)
    # CosXL: v-prediction (sigma_data 1), x0 = x / (s^2 + 1) - v * s / sqrt(s^2 + 1); else epsilon, x0 = x - eps * s
    vpred = x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
    expected = vpred if edm_vpred else x - out * sigma
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    concat = probe.calls[0]["x"][:, 4:]
    scale = SDXL_LATENT_SCALE if edm_vpred else 1.0  # CosXL scales the image latent; diffusers' SDXL IP2P not
    image_rows = [i for i in range(concat.shape[0]) if concat[i].abs().sum() > 0]
    assert len(image_rows) == min(branches, 2), "the image branch and the full branch see the image"
    for row in image_rows:
        torch.testing.assert_close(concat[row], image_latent[0].to(concat) * scale, rtol=1e-5, atol=1e-6)


def unet_inputs(model):
    """Records the diffusion model's inputs (the real forward still runs)."""
    seen: list[dict] = []

    def pre_hook(_module, args, kwargs):
        seen.append({"x": args[0].detach().clone(), "y": kwargs["y"].detach().clone()})

    return seen, model.model.diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def test_edit_nodes_run_sdxl_ip2p_and_agree(sdxl, comfy_nodes):
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text, prepare_pixels

    model, clip, vae, edm_vpred = sdxl
    images = torch.rand(1, 64, 128, 3, generator=torch.Generator().manual_seed(2))
    scales = {"image_guidance": 1.5, "text_guidance": 7.5}
    seen, handle = unet_inputs(model)
    try:
        edited, latent = comfy_nodes["InstructEdit"].execute(
            model, clip, vae, images, "make it winter", resolution=128, keep_input_size=True, **scales,
            **SETTINGS).result
    finally:
        handle.remove()
    assert edited.shape == (1, 64, 128, 3) and torch.isfinite(edited).all()
    assert latent["samples"].shape == (1, 4, 8, 16) and torch.isfinite(latent["samples"]).all()
    image_latent = encode_image(vae, prepare_pixels(images, 128))
    scale = SDXL_LATENT_SCALE if edm_vpred else 1.0
    torch.testing.assert_close(seen[0]["x"][0, 4:], image_latent[0] * scale, rtol=1e-5, atol=1e-6)
    # SDXL's size conditioning: InstructEdit gives the edit's own size, as diffusers' SDXL pipelines do.
    pooled = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][1]["pooled_output"]
    sized = model.model.encode_adm(pooled_output=pooled, width=128, height=64)[:, 1280:]
    torch.testing.assert_close(seen[0]["y"][:, 1280:], sized.expand(seen[0]["y"].shape[0], -1).to(seen[0]["y"]))

    positive, negative = encode_text(clip, "make it winter"), encode_text(clip, "")
    sampler = comfy_nodes["DualCFGSampler"].execute(
        model, positive, negative, image_latent={"samples": image_latent}, denoise=1.0, **scales,
        **SETTINGS).result[0]["samples"]
    assert sampler.shape == latent["samples"].shape and torch.isfinite(sampler).all()

    guider = comfy_nodes["IP2PGuider"].execute(model, positive, negative, image_latent={"samples": image_latent},
                                               **scales).result[0]
    run = comfy_nodes["SamplerCustomAdvanced"].execute(
        comfy_nodes["RandomNoise"].execute(SETTINGS["seed"]).result[0], guider,
        comfy_nodes["KSamplerSelect"].execute(SETTINGS["sampler_name"]).result[0],
        comfy_nodes["BasicScheduler"].execute(model, SETTINGS["scheduler"], SETTINGS["steps"], 1.0).result[0],
        {"samples": torch.zeros_like(image_latent)})
    from_guider = (run.result if hasattr(run, "result") else run)[0]["samples"]
    # The guider node and the sampler node are one computation: same seed, same steps, same result.
    torch.testing.assert_close(from_guider, sampler, rtol=1e-5, atol=1e-5)


def test_native_resolution_is_1024_for_sdxl(sdxl):
    from comfyui_ip2p.pipeline.edit import NATIVE_RESOLUTION, edit_resolution

    model = sdxl[0]
    assert edit_resolution(model, NATIVE_RESOLUTION) == 1024
    assert edit_resolution(model, 768) == 768, "an explicit resolution is kept"
    assert edit_resolution(model, 0) == 0, "0 still means the input's own size"


@pytest.fixture(scope="module")
def sdxl_t2i_ckpt(comfy_base) -> str:
    """A small SDXL-family text-to-image checkpoint (ComfyUI builds it as model_base.SDXL, KOALA-shaped)."""
    from comfyui_ip2p.testing.tiny_models import write_sdxl_checkpoint

    write_sdxl_checkpoint(comfy_base / "models/checkpoints/small_sdxl_t2i.safetensors", seed=6)
    return "small_sdxl_t2i.safetensors"


def sdxl_prediction(model, x, image_latent, seed=0):
    """One prediction with SDXL's conditioning (context, pooled text and size), image latent in the concat."""
    gen = torch.Generator().manual_seed(seed)
    context, pooled = torch.randn(1, 77, 2048, generator=gen), torch.randn(1, 1280, generator=gen)
    y = model.model.encode_adm(pooled_output=pooled, width=64, height=64)
    kwargs = {} if image_latent is None else {"c_concat": image_latent}
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=context, y=y, **kwargs)


def test_convert_sdxl_family_model_and_load_it_back(comfy_nodes, comfy_base, sdxl_t2i_ckpt):
    """ConvertToIP2P on an SDXL-family model gives ComfyUI's SDXL_instructpix2pix class, exact with a zero image
    latent; saved as a checkpoint (a layout ComfyUI's matcher list does not name as IP2P), LoadIP2PModel loads
    it back as SDXL_instructpix2pix with the same predictions."""
    import comfy.model_base
    import comfy.sd
    from comfyui_ip2p.pipeline.loading import CONV_IN, load_ip2p

    path = comfy_base / "models/checkpoints" / sdxl_t2i_ckpt
    t2i = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    assert isinstance(t2i[0].model, comfy.model_base.SDXL) and not isinstance(t2i[0].model, comfy.model_base.IP2P)
    before = {k: v.clone() for k, v in t2i[0].model.diffusion_model.state_dict().items()}
    converted = comfy_nodes["ConvertToIP2P"].execute(t2i[0]).result[0]
    assert type(converted.model) is comfy.model_base.SDXL_instructpix2pix
    assert converted.model.model_type == t2i[0].model.model_type
    after = t2i[0].model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original model must be untouched"
    weight = converted.model.diffusion_model.state_dict()[CONV_IN]
    assert weight.shape[1] == 8 and torch.count_nonzero(weight[:, 4:]) == 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sdxl_prediction(converted, x, torch.zeros_like(x)), sdxl_prediction(t2i[0], x, None),
                               rtol=1e-5, atol=1e-5)

    # Give the new channels weights, so loading back is checked on the image path too.
    with torch.no_grad():
        converted.model.diffusion_model.input_blocks[0][0].weight[:, 4:].normal_(0, 0.05)
    saved = comfy_base / "models/checkpoints/small_sdxl_ip2p_converted.safetensors"
    comfy.sd.save_checkpoint(str(saved), converted, vae=t2i[2])
    loaded, _, vae = load_ip2p(saved.name)
    assert type(loaded.model) is comfy.model_base.SDXL_instructpix2pix and vae is not None
    image_latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sdxl_prediction(loaded, x, image_latent), sdxl_prediction(converted, x, image_latent),
                               rtol=1e-4, atol=1e-4)


def test_guidance_grid_on_sdxl_equals_single_edits_with_size_conditioning(sdxl, comfy_nodes):
    model, clip, vae, _ = sdxl
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(7))

    def grid(image_values: str):
        return comfy_nodes["IP2PGuidanceGrid"].execute(
            model, clip, vae, image, "make it winter", image_values, "5.0", resolution=64, **SETTINGS).result[1]

    def single(s_i: float):
        return comfy_nodes["InstructEdit"].execute(
            model, clip, vae, image, "make it winter", resolution=64, keep_input_size=False, image_guidance=s_i,
            text_guidance=5.0, **SETTINGS).result[0]

    seen, handle = unet_inputs(model)
    try:
        cells = grid("1.0, 1.5")
    finally:
        handle.remove()
    pooled = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][1]["pooled_output"]
    sized = model.model.encode_adm(pooled_output=pooled, width=64, height=64)[:, 1280:]
    torch.testing.assert_close(seen[0]["y"][:, 1280:], sized.expand(seen[0]["y"].shape[0], -1).to(seen[0]["y"]))
    assert cells.shape == (2, 64, 64, 3)
    assert torch.equal(grid("1.5"), single(1.5)), "a one-cell grid is the single edit, bit for bit"
    for row, s_i in enumerate((1.0, 1.5)):
        # Two cells batch the UNet's products at another size (other kernel blocking): float32 rounding, which
        # the random SDXL weights amplify to ~1e-4 relative here (SD1.5's tiny model: ~5e-6).
        error = ((cells[row:row + 1] - single(s_i)).norm() / single(s_i).norm()).item()
        assert error < 5e-4, (s_i, error)
    assert (cells[0] - cells[1]).abs().max() > 1e-3, "different scales must give different edits"
