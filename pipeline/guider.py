"""ComfyUI guider for the paper's dual guidance: all needed branches in one batched model call per step."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import node_helpers
import torch

from ..algorithms.dual_cfg import branches_needed, check_scales, combine
from .attention import with_fused_attention

# The branches in BRANCHES order (uncond, image, full), under the names core's Guider_DualCFG gives them.
CORE_KEYS = ("negative", "middle", "positive")


def with_image(conditioning: list, image_latent) -> list:
    """Attaches the (raw, unscaled) image latent; the model class applies its own scaling (CosXL)."""
    return node_helpers.conditioning_set_values(conditioning, {"concat_latent_image": image_latent})


def without_image(conditioning: list) -> list:
    """The image-unconditional branch: IP2P models fill a missing concat latent with zeros."""
    out = []
    for embedding, options in conditioning:
        kept = {k: v for k, v in options.items() if k != "concat_latent_image"}
        out.append([embedding, kept])
    return out


class IP2PGuider(comfy.samplers.CFGGuider):
    """`set_conds(positive, negative, image_latent)` builds the three branches of eq. 3:

    full = (positive text, image), image = (negative text, image), uncond = (negative text, zero image).

    The branches map onto core's Guider_DualCFG as positive = full, middle = image, negative = uncond, with
    cfg1 = s_T and cfg2 = s_I; `predict_noise` combines them the way its "regular" style does, so every model
    patch that hooks `cfg_function` acts here as it acts in core's graph.
    """

    image_scale = 1.5
    text_scale = 7.5

    def set_conds(self, positive, negative, image_latent=None):  # type: ignore[override]
        if image_latent is not None:
            positive, image = with_image(positive, image_latent), with_image(negative, image_latent)
        else:
            image = negative
        # Core's key names, because ComfyUI reads them: "positive" spreads a ControlNet applied with
        # control_apply_to_uncond (and GLIGEN) to the other branches, "negative" sets prompt_type.
        image = node_helpers.conditioning_set_values(image, {"prompt_type": "negative"})
        self.inner_set_conds({"negative": without_image(negative), "middle": image, "positive": positive})

    def set_cfg(self, image_scale: float, text_scale: float):  # type: ignore[override]
        check_scales(image_scale, text_scale)
        self.image_scale, self.text_scale = float(image_scale), float(text_scale)

    def predict_noise(self, x, timestep, model_options=None, seed=None):  # noqa: ARG002 (ComfyUI's callback signature)
        # Checked once per model call so a cancel lands within one step, whatever the sampler.
        comfy.model_management.throw_exception_if_processing_interrupted()
        model_options = model_options if model_options is not None else {}
        keep_all = bool(model_options.get("disable_cfg1_optimization", False))
        needed = branches_needed(self.image_scale, self.text_scale, keep_all)
        conds = [self.conds.get(key) if use else None for key, use in zip(CORE_KEYS, needed, strict=True)]
        # One batched call for every needed branch; a skipped one comes back as zeros, as in core.
        uncond, image, full = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        hooks = CfgHooks(self.inner_model, x, timestep, model_options, conds)
        return combine(uncond, image, full, self.image_scale, self.text_scale, cfg=hooks)


class CfgHooks:
    """The image-guidance pair through ComfyUI's hooks: `sampler_pre_cfg_function`s, then `cfg_function`
    (which runs `sampler_cfg_function` and every `sampler_post_cfg_function`).

    Core's Guider_DualCFG calls `cfg_function` but skips the pre-cfg hooks, so APG, FreSca and TCFG silently do
    nothing in core's IP2P graph. Here they see exactly what core's single-CFG sampling gives them: the pair
    that enters `cfg_function` (cond = image branch, uncond = unconditional branch) and its scale s_I; the
    text term keeps the model's own image-branch prediction.
    """

    def __init__(self, model, x, timestep, model_options: dict, conds: list) -> None:
        self.model, self.x, self.timestep, self.model_options = model, x, timestep, model_options
        self.uncond_cond, self.image_cond, self.full_cond = conds

    def __call__(self, image, uncond, scale: float | torch.Tensor):
        # A tensor scale (one per sample, [B, 1, 1, 1]: the guidance grid) passes through cfg_function and its
        # hooks as core's own float does: they all compute with it by broadcasting.
        image, uncond = self.pre_cfg(image, uncond, scale)
        return comfy.samplers.cfg_function(self.model, image, uncond, scale, self.x, self.timestep,
                                           model_options=self.model_options, cond=self.image_cond,
                                           uncond=self.uncond_cond)

    def pre_cfg(self, image, uncond, scale: float | torch.Tensor):
        functions = self.model_options.get("sampler_pre_cfg_function", [])
        if not functions:
            return image, uncond
        conds = [self.image_cond, self.uncond_cond]
        out = [image, uncond]
        for fn in functions:
            out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": self.timestep,
                      "input": self.x, "sigma": self.timestep, "model": self.model,
                      "model_options": self.model_options})
        return out[0], out[1]


def matching_text(model, conditioning: list) -> list:
    """Refuses text embeddings of another model family (e.g. an SD1.5 CLIP on an SDXL model); returns them.

    Without this the mismatch surfaces deep in the UNet as a bare matrix-shape error.
    """
    expected = model.model.model_config.unet_config.get("context_dim")
    for embedding, _options in conditioning:
        width = embedding.shape[-1]
        if expected is not None and width != expected:
            raise ValueError(f"the text encoder does not match the model: the CLIP gives {width}-wide text "
                             f"embeddings, the model expects {expected}. Connect the CLIP loaded with this "
                             "model's checkpoint (SD1.x: 768, SD2.x: 1024, SDXL: 2048)")
    return conditioning


def make_guider(model, positive, negative, image_latent, image_scale: float, text_scale: float) -> IP2PGuider:
    matching_text(model, positive)
    matching_text(model, negative)
    guider = IP2PGuider(with_fused_attention(model))
    guider.set_conds(positive, negative, image_latent)
    guider.set_cfg(image_scale, text_scale)
    return guider
