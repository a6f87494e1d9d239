"""Graphs that run one IP2P edit through core's hand-wired nodes and through each of the pack's edit nodes.

One graph holds four routes sharing the loader, the texts and the (patched) MODEL: core's
InstructPixToPixConditioning -> DualCFGGuider -> SamplerCustomAdvanced, InstructEdit, DualCFGSampler, and
IP2PGuider -> SamplerCustomAdvanced. Each route ends in core's SaveLatent, so latents are compared from files.
Used by tests/comfy/test_chaining.py and bench/chaining.py; needs the IP2PProbeCheckpoint node registered.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from ..cli.runtime import run_prompt
from .comfy_run import checked

STEPS, SEED, SAMPLER = 3, 11, "euler_ancestral"
INSTRUCTION = "make it winter"
EQUAL = 1e-4  # relative error allowed between two routes of the same graph
CHANGED = 1e-3  # a patch "acts" when it moves the latent by more than this (10x the equality tolerance)

# Every sampler-hook patch node of ComfyUI 0.3.75 that applies to an SD1.5 model, and what patches the
# model itself. Left out: SkipLayerGuidanceDiT/SkipLayerGuidanceDiTSimple (DiT blocks only; SD1.5 has none),
# VideoLinearCFGGuidance/VideoTriangleCFGGuidance (a scale per video frame), LatentApplyOperationCFG (needs a
# latent-operation node; it hooks pre-CFG like APG).
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


OUR_ROUTES = ("ours_edit", "ours_dual", "ours_guider")


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
    result = checked(run_prompt(graph))
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
    model = add_patches(graph, patches)
    add_core_route(graph, model, s_i, s_t)
    add_our_routes(graph, model, s_i, s_t)
    return latents(comfy_base, graph)


