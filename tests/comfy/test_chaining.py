"""Chaining: what the user wires onto the MODEL or the latent acts through the pack's edit nodes exactly as
through core's own IP2P graph (InstructPixToPixConditioning -> DualCFGGuider -> SamplerCustomAdvanced).

Every case runs one graph through ComfyUI's executor with four routes that share the loader, the texts and
the patched MODEL: core's hand-wired graph, InstructEdit, DualCFGSampler, and IP2PGuider + SamplerCustomAdvanced.
Each route ends in core's SaveLatent, so the latents are compared from real files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_ip2p.testing.chain_graphs import (
    CHANGED,
    EQUAL,
    INSTRUCTION,
    OUR_ROUTES,
    POST_AND_CFG_PATCHES,
    PRE_CFG_PATCHES,
    add_core_route,
    add_our_routes,
    add_patches,
    add_sca,
    base_graph,
    latents,
    relative,
    run_all_routes,
    save,
)
from PIL import Image


@pytest.fixture(scope="module")
def chain(comfy_nodes, comfy_base) -> dict:
    """A two-level random SD1.5-IP2P checkpoint (FreeU needs 640-wide blocks), a ControlNet and a LoRA for
    it, a 64x64 input and a left/right mask."""
    from comfyui_ip2p.testing import probe_nodes
    from comfyui_ip2p.testing.tiny_models import write_checkpoint, write_controlnet, write_lora

    probe_nodes.register()

    models = comfy_base / "models"
    ckpt = write_checkpoint(models / "checkpoints/chain_ip2p.safetensors", "ip2p", "two_level", seed=5)
    write_controlnet(models / "controlnet/chain_control.safetensors", "two_level", seed=6)
    write_lora(models / "loras/chain_lora.safetensors", ckpt, seed=7)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(comfy_base / "input/chain.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255  # edit the right half only
    Image.fromarray(mask).save(comfy_base / "input/chain_mask.png")
    return {"ckpt": ckpt.name, "image": "chain.png", "mask": "chain_mask.png"}


_UNPATCHED: dict[tuple, dict] = {}


def unpatched(chain: dict, comfy_base: Path, s_i: float) -> dict:
    import comfy.ldm.modules.attention as attention

    key = (s_i, attention.optimized_attention)
    if key not in _UNPATCHED:
        _UNPATCHED[key] = run_all_routes(chain, comfy_base, [], s_i)
    return _UNPATCHED[key]


def test_unpatched_routes_equal_core(chain, comfy_base):
    for s_i in (1.0, 1.5):
        out = unpatched(chain, comfy_base, s_i)
        for route in OUR_ROUTES:
            assert relative(out[route], out["core"]) < EQUAL, (s_i, route)


@pytest.mark.parametrize("s_i", [1.0, 1.5])
@pytest.mark.parametrize("name", sorted(POST_AND_CFG_PATCHES))
def test_model_patch_acts_as_in_core(chain, comfy_base, name, s_i, monkeypatch):
    if (name, s_i) == ("PerpNeg", 1.0):
        # At s_I = 1 the unconditional branch is skipped (zeros, in core too) and PerpNeg then projects x itself:
        # it amplifies the last-bit difference between ComfyUI's CPU attention and the fused kernel the pack
        # uses (measured 2.3e-4 here, 1e-6 otherwise). On one kernel the routes must agree as tightly as ever.
        import comfy.ldm.modules.attention as attention

        monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    out = run_all_routes(chain, comfy_base, list(POST_AND_CFG_PATCHES[name]), s_i)
    plain = unpatched(chain, comfy_base, s_i)
    core_moved = relative(out["core"], plain["core"])
    errors = {route: relative(out[route], out["core"]) for route in OUR_ROUTES}
    assert max(errors.values()) < EQUAL, f"{name} at s_I={s_i}: differs from core's graph by {errors}"
    for route in OUR_ROUTES:
        moved = relative(out[route], plain[route])
        assert (moved > CHANGED) == (core_moved > CHANGED), (name, s_i, route, moved, core_moved)
    if s_i != 1.0:
        # at s_I = 1 some hooks have nothing to act on (core's as well); at 1.5 every one must act
        assert core_moved > CHANGED, f"{name} did not change core's graph: the case tests nothing"


@pytest.mark.parametrize("s_i", [1.0, 1.5])
@pytest.mark.parametrize("name", sorted(PRE_CFG_PATCHES))
def test_pre_cfg_patch_acts_as_in_cores_cfg(chain, comfy_base, name, s_i):
    """With the instruction equal to the negative prompt the text term vanishes, and the dual guidance is core's
    single CFG between (empty text + image) and (empty text, no image) at scale s_I: CFGGuider runs the
    pre-CFG hooks, so the pack must give its result."""
    graph = base_graph(chain, instruction="")
    model = add_patches(graph, list(PRE_CFG_PATCHES[name]))
    graph["c_ip2p"] = {"class_type": "InstructPixToPixConditioning",
                       "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2],
                                  "pixels": ["img", 0]}}
    graph["c_guider"] = {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["c_ip2p", 0],
                                                               "negative": ["neg", 0], "cfg": s_i}}
    add_sca(graph, "core", model, ["c_guider", 0], ["c_ip2p", 2])
    add_our_routes(graph, model, s_i, 7.5, instruction="")
    out = latents(comfy_base, graph)
    for route in OUR_ROUTES:
        error = relative(out[route], out["core"])
        assert error < EQUAL, f"{name} at s_I={s_i}: {route} differs from core's CFG by {error:.2e}"
    if s_i != 1.0:
        patched = run_all_routes(chain, comfy_base, list(PRE_CFG_PATCHES[name]), s_i)
        plain = unpatched(chain, comfy_base, s_i)
        for route in OUR_ROUTES:
            assert relative(patched[route], plain[route]) > CHANGED, f"{name} does nothing through {route}"


def test_lora_acts_as_in_core(chain, comfy_base):
    patch = [("LoraLoaderModelOnly", {"lora_name": "chain_lora.safetensors", "strength_model": 1.0})]
    out = run_all_routes(chain, comfy_base, patch, 1.5)
    plain = unpatched(chain, comfy_base, 1.5)
    assert relative(out["core"], plain["core"]) > CHANGED
    for route in OUR_ROUTES:
        assert relative(out[route], out["core"]) < EQUAL, route


def test_controlnet_on_the_conditioning_acts_as_in_core(chain, comfy_base):
    graph = base_graph(chain)
    graph["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "chain_control.safetensors"}}
    graph["cn_apply"] = {"class_type": "ControlNetApplyAdvanced",
                         "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0],
                                    "image": ["img", 0], "strength": 1.0, "start_percent": 0.0,
                                    "end_percent": 1.0}}
    positive, negative = ("cn_apply", 0), ("cn_apply", 1)
    add_core_route(graph, ["ckpt", 0], 1.5, 7.5, positive=positive, negative=negative)
    add_our_routes(graph, ["ckpt", 0], 1.5, 7.5)
    # InstructEdit encodes its own texts, so only the conditioning routes carry the ControlNet
    del graph["edit"], graph["ours_edit"]
    graph["dual"]["inputs"].update(positive=list(positive), negative=list(negative))
    graph["guider"]["inputs"].update(positive=list(positive), negative=list(negative))
    out = latents(comfy_base, graph)
    plain = unpatched(chain, comfy_base, 1.5)
    assert relative(out["core"], plain["core"]) > CHANGED
    for route in ("ours_dual", "ours_guider"):
        assert relative(out[route], out["core"]) < EQUAL, route


def masked_graph(chain: dict, s_i: float) -> dict:
    """Core's masked edit: VAE Encode + Set Latent Noise Mask as the starting latent."""
    graph = base_graph(chain)
    graph["mask"] = {"class_type": "LoadImageMask", "inputs": {"image": chain["mask"], "channel": "red"}}
    graph["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["ckpt", 2]}}
    graph["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["enc", 0], "mask": ["mask", 0]}}
    add_core_route(graph, ["ckpt", 0], s_i, 7.5, latent=["masked", 0])
    add_our_routes(graph, ["ckpt", 0], s_i, 7.5, latent=["masked", 0], edit_extra={"mask": ["mask", 0]})
    save(graph, "input_latent", ["enc", 0])
    return graph


@pytest.mark.parametrize("s_i", [1.0, 1.5])
def test_noise_mask_keeps_the_unmasked_latent_as_core_does(chain, comfy_base, s_i):
    out = latents(comfy_base, masked_graph(chain, s_i))
    source = out["input_latent"]
    for route in ("core", *OUR_ROUTES):
        kept, edited = out[route][..., :4], out[route][..., 4:]
        assert relative(kept, source[..., :4]) < 1e-5, f"{route} changed the unmasked half"
        assert relative(edited, source[..., 4:]) > 0.1, f"{route} did not edit the masked half"
    for route in OUR_ROUTES:
        assert relative(out[route], out["core"]) < EQUAL, route


def test_guider_makes_one_batched_model_call_per_step(chain, comfy_nodes, comfy_base):
    import comfy.sd
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text

    path = comfy_base / "models/checkpoints" / chain["ckpt"]
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    calls: list[int] = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(
        lambda apply_model, args: calls.append(args["input"].shape[0]) or apply_model(args["input"],
                                                                                       args["timestep"],
                                                                                       **args["c"]))
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    guider = comfy_nodes["IP2PGuider"].execute(counted, encode_text(clip, INSTRUCTION), encode_text(clip, ""),
                                               1.5, 7.5, image=pixels, vae=vae).result[0]
    assert not calls, "the guider node must not sample by itself"
    steps = 4
    sigmas = comfy_nodes["BasicScheduler"].execute(counted, "normal", steps, 1.0).result[0]
    noise = comfy_nodes["RandomNoise"].execute(0).result[0]
    sampler = comfy_nodes["KSamplerSelect"].execute("euler").result[0]
    latent = {"samples": torch.zeros_like(encode_image(vae, pixels))}
    comfy_nodes["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, latent)
    assert calls == [3] * steps, f"expected {steps} calls of 3 rows, got {calls}"


PRECISION = "IP2PComputePrecision"


def test_compute_precision_acts_through_every_route_as_through_cores(chain, comfy_base, monkeypatch):
    """The pack's precision patch is a MODEL wrapper: on a CPU without native bf16, auto leaves every route's
    latent bit for bit as without the node; bf16 acts through core's graph and the pack's three routes alike."""
    plain = unpatched(chain, comfy_base, 1.5)
    monkeypatch.setenv("IP2P_CPU_BF16", "0")  # simulates the CPU check: no AMX / AVX512-BF16
    auto = run_all_routes(chain, comfy_base, [(PRECISION, {"precision": "auto"})], 1.5)
    for route in ("core", *OUR_ROUTES):
        assert torch.equal(auto[route], plain[route]), route
    bf16 = run_all_routes(chain, comfy_base, [(PRECISION, {"precision": "bf16"})], 1.5)
    core_moved = relative(bf16["core"], plain["core"])
    assert core_moved > CHANGED, "bf16 did not change core's graph: the case tests nothing"
    for route in OUR_ROUTES:
        # Each route batches the branches its own way, so each is its own sample of bf16 rounding: they cannot
        # agree as in fp32, but each must move from its fp32 result by what core's moved (3 steps: ~3e-2).
        moved = relative(bf16[route], plain[route])
        assert core_moved / 3 < moved < 3 * core_moved, (route, moved, core_moved)
