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
import safetensors.torch
import torch
from comfyui_ip2p.headless.runtime import run_prompt
from PIL import Image

STEPS, SEED, SAMPLER = 3, 11, "euler_ancestral"
INSTRUCTION = "make it winter"
EQUAL = 1e-4  # relative error allowed between two routes of the same graph
CHANGED = 1e-3  # a patch "acts" when it moves the latent by more than this (10x the equality tolerance)

# Every sampler-hook patch node of ComfyUI 0.3.75 that applies to an SD1.5 model, and what patches the
# model itself. Left out: SkipLayerGuidanceDiT/SkipLayerGuidanceDiTSimple (DiT blocks only; SD1.5 has none),
# VideoLinearCFGGuidance/VideoTriangleCFGGuidance (scale per video frame), RenormCFG's Lumina-only truncation.
POST_AND_CFG_PATCHES = {
    "RescaleCFG": [("RescaleCFG", {"multiplier": 1.0})],
    "PAG": [("PerturbedAttentionGuidance", {"scale": 3.0})],
    "SAG": [("SelfAttentionGuidance", {"scale": 2.0, "blur_sigma": 2.0})],
    "CFGZeroStar": [("CFGZeroStar", {})],
    "CFGNorm": [("CFGNorm", {"strength": 0.5})],
    "Mahiro": [("Mahiro", {})],
    # PerpNeg removes from the negative its part along "empty"; with both the empty prompt it has nothing to do
    "PerpNeg": [("PerpNeg", {"empty_conditioning": ["other", 0], "neg_scale": 2.0})],
    "EpsilonScaling": [("Epsilon Scaling", {"scaling_factor": 1.02})],
    "TemporalScoreRescaling": [("TemporalScoreRescaling", {"tsr_k": 0.8, "tsr_sigma": 1.0})],
    "RenormCFG": [("RenormCFG", {"cfg_trunc": 100.0, "renorm_cfg": 0.5})],
    "FreeU_V2": [("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2})],
    "ModelSamplingDiscrete": [("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False})],
}
# Patches on core's pre-CFG hook, which core's DualCFGGuider never calls (they silently do nothing in
# core's IP2P graph). The pack applies them to the pair that enters cfg_function, as core's own CFG does.
PRE_CFG_PATCHES = {
    "APG": [("APG", {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5})],
    "FreSca": [("FreSca", {"scale_low": 0.5, "scale_high": 1.5, "freq_cutoff": 2})],
    "TCFG": [("TCFG", {})],
}


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


def base_graph(chain: dict, instruction: str = INSTRUCTION) -> dict:
    return {
        # core's CheckpointLoaderSimple, loaded once per process (saves seconds per graph)
        "ckpt": {"class_type": "IP2PProbeCheckpoint", "inputs": {"ckpt_name": chain["ckpt"]}},
        "img": {"class_type": "LoadImage", "inputs": {"image": chain["image"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": instruction}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "other": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a blurry photo"}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": SAMPLER}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
    }


def add_patches(graph: dict, patches: list) -> list:
    """Chains patch nodes onto the loader's MODEL; returns the patched MODEL's link."""
    model = ["ckpt", 0]
    for index, (class_type, inputs) in enumerate(patches):
        node = f"patch{index}"
        graph[node] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node, 0]
    return model


def save(graph: dict, node: str, latent: list) -> None:
    graph[node] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": f"chain_{node}"}}


def add_core_route(graph: dict, model: list, s_i: float, s_t: float, positive=("pos", 0), negative=("neg", 0),
                   latent: list | None = None) -> None:
    graph["c_ip2p"] = {"class_type": "InstructPixToPixConditioning",
                       "inputs": {"positive": list(positive), "negative": list(negative), "vae": ["ckpt", 2],
                                  "pixels": ["img", 0]}}
    graph["c_guider"] = {"class_type": "DualCFGGuider",
                         "inputs": {"model": model, "cond1": ["c_ip2p", 0], "cond2": ["c_ip2p", 1],
                                    "negative": list(negative), "cfg_conds": s_t, "cfg_cond2_negative": s_i,
                                    "style": "regular"}}
    add_sca(graph, "core", model, ["c_guider", 0], latent or ["c_ip2p", 2])


def add_sca(graph: dict, name: str, model: list, guider: list, latent: list) -> None:
    graph[f"{name}_sigmas"] = {"class_type": "BasicScheduler",
                               "inputs": {"model": model, "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
    graph[f"{name}_sca"] = {"class_type": "SamplerCustomAdvanced",
                            "inputs": {"noise": ["noise", 0], "guider": guider, "sampler": ["sampler", 0],
                                       "sigmas": [f"{name}_sigmas", 0], "latent_image": latent}}
    save(graph, name, [f"{name}_sca", 0])


def sampling(s_i: float, s_t: float) -> dict:
    return {"image_guidance": s_i, "text_guidance": s_t, "steps": STEPS, "seed": SEED, "sampler_name": SAMPLER,
            "scheduler": "normal"}


def add_our_routes(graph: dict, model: list, s_i: float, s_t: float, instruction: str = INSTRUCTION,
                   positive=("pos", 0), negative=("neg", 0), latent: list | None = None,
                   edit_extra: dict | None = None) -> None:
    graph["edit"] = {"class_type": "InstructEdit",
                     "inputs": {"model": model, "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["img", 0],
                                "instruction": instruction, **sampling(s_i, s_t), "resolution": 64,
                                "keep_input_size": True, **(edit_extra or {})}}
    save(graph, "ours_edit", ["edit", 1])
    dual = {"model": model, "positive": list(positive), "negative": list(negative), **sampling(s_i, s_t),
            "denoise": 1.0, "image": ["img", 0], "vae": ["ckpt", 2]}
    if latent is not None:
        dual["latent"] = latent
    graph["dual"] = {"class_type": "DualCFGSampler", "inputs": dual}
    save(graph, "ours_dual", ["dual", 0])
    graph["guider"] = {"class_type": "IP2PGuider",
                       "inputs": {"model": model, "positive": list(positive), "negative": list(negative),
                                  "image_guidance": s_i, "text_guidance": s_t, "image": ["img", 0],
                                  "vae": ["ckpt", 2]}}
    add_sca(graph, "ours_guider", model, ["guider", 0], latent or ["c_ip2p", 2])


def latents(comfy_base: Path, graph: dict) -> dict[str, torch.Tensor]:
    result = run_prompt(graph).raise_for_error()
    out = {}
    for node, ui in result.outputs.items():
        info = ui["latents"][0]
        path = comfy_base / "output" / info["subfolder"] / info["filename"]
        out[node] = safetensors.torch.load_file(str(path))["latent_tensor"].float()
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def run_all_routes(chain: dict, comfy_base: Path, patches: list, s_i: float, s_t: float = 7.5) -> dict:
    graph = base_graph(chain)
    for index, (class_type, inputs) in enumerate(patches):
        # inputs that link to other nodes of the base graph (e.g. PerpNeg's empty conditioning) stay links
        patches[index] = (class_type, dict(inputs))
    model = add_patches(graph, patches)
    add_core_route(graph, model, s_i, s_t)
    add_our_routes(graph, model, s_i, s_t)
    return latents(comfy_base, graph)


_UNPATCHED: dict[tuple, dict] = {}


def unpatched(chain: dict, comfy_base: Path, s_i: float) -> dict:
    import comfy.ldm.modules.attention as attention

    key = (s_i, attention.optimized_attention)
    if key not in _UNPATCHED:
        _UNPATCHED[key] = run_all_routes(chain, comfy_base, [], s_i)
    return _UNPATCHED[key]


OUR_ROUTES = ("ours_edit", "ours_dual", "ours_guider")


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
