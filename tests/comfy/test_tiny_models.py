"""The random-weight factory: ComfyUI detects the models, and diffusers' twin computes the same UNet."""

import pytest
import torch


def test_checkpoints_are_detected_by_comfyui(comfy_base, tiny_ip2p_ckpt, tiny_t2i_ckpt):
    import comfy.model_detection
    import comfy.utils

    for name, expected, channels in [(tiny_ip2p_ckpt, "SD15_instructpix2pix", 8), (tiny_t2i_ckpt, "SD15", 4)]:
        sd = comfy.utils.load_torch_file(str(comfy_base / "models/checkpoints" / name))
        config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        assert type(config).__name__ == expected
        assert config.unet_config["in_channels"] == channels


def test_same_seed_same_weights_other_seed_other_weights():
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, unet_state_dict

    a = unet_state_dict(LAYOUTS["tiny"], 8, seed=3)
    b = unet_state_dict(LAYOUTS["tiny"], 8, seed=3)
    c = unet_state_dict(LAYOUTS["tiny"], 8, seed=4)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


@pytest.mark.parametrize("in_channels", [8, 4])
def test_diffusers_twin_matches_comfyui_unet(comfy_base, in_channels):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, UNET_PREFIX, diffusers_twin, unet_state_dict

    layout = LAYOUTS["tiny"]
    sd = unet_state_dict(layout, in_channels, seed=0)
    unet = UNetModel(**layout.comfy_config(in_channels))
    unet.load_state_dict({k.removeprefix(UNET_PREFIX): v.float() for k, v in sd.items()})
    twin = diffusers_twin(sd, layout, in_channels)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 16, 24, generator=gen)
    t = torch.tensor([999.0, 10.0])
    context = torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        ours = unet.eval()(x, timesteps=t, context=context)
        theirs = twin(x, t, encoder_hidden_states=context).sample
    assert ours.std() > 0.05, "random model should not be degenerate"
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    assert relative < 1e-4


def test_full_layout_is_sd15_in_comfyui_and_diffusers(comfy_base):
    """The full-size variant (benchmarks) must be the real SD1.5 IP2P layout on both sides, key for key."""
    import comfy.model_detection
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfyui_ip2p.testing.tiny_models import LAYOUTS, UNET_PREFIX, _meta_shapes, diffusers_unet_config
    from diffusers import UNet2DConditionModel

    layout = LAYOUTS["full"]
    shapes = _meta_shapes(lambda: UNetModel(**layout.comfy_config(8), operations=comfy.ops.disable_weight_init))
    sd = {UNET_PREFIX + k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    assert type(config).__name__ == "SD15_instructpix2pix"
    assert 855e6 < sum(v.numel() for v in sd.values()) < 865e6  # SD1.5's UNet: 859.5M parameters
    mapping = comfy.utils.unet_to_diffusers(layout.comfy_config(8))
    mapped = {d: shapes[c] for d, c in mapping.items() if c in shapes}
    with torch.device("meta"):
        twin = UNet2DConditionModel(**diffusers_unet_config(layout, 8))
    theirs = {k: v.shape for k, v in twin.state_dict().items()}
    assert mapped == theirs
