"""ComfyUI guider for the paper's dual guidance: all needed branches in one batched model call per step."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import node_helpers

from ..samplers.dual_cfg import BRANCHES, branches_needed, check_scales, combine
from .attention import with_fused_attention


def with_image(conditioning: list, image_latent) -> list:
    """Attaches the (raw, unscaled) image latent; the model class applies its own scaling (CosXL)."""
    return node_helpers.conditioning_set_values(conditioning, {"concat_latent_image": image_latent})


def without_image(conditioning: list) -> list:
    """The image-unconditional branch: IP2P models fill a missing concat latent with zeros."""
    out = []
    for embedding, options in conditioning:
        options = {k: v for k, v in options.items() if k != "concat_latent_image"}
        out.append([embedding, options])
    return out


class IP2PGuider(comfy.samplers.CFGGuider):
    """`set_conds(positive, negative, image_latent)` builds the three branches of eq. 3:

    full = (positive text, image), image = (negative text, image), uncond = (negative text, zero image).
    """

    image_scale = 1.5
    text_scale = 7.5

    def set_conds(self, positive, negative, image_latent=None):  # type: ignore[override]
        if image_latent is not None:
            positive, image = with_image(positive, image_latent), with_image(negative, image_latent)
        else:
            image = negative
        # ComfyUI treats "negative" prompt_type conds as the uncond side in hooks and patches.
        uncond = node_helpers.conditioning_set_values(without_image(negative), {"prompt_type": "negative"})
        image = node_helpers.conditioning_set_values(image, {"prompt_type": "negative"})
        self.inner_set_conds({"uncond": uncond, "image": image, "full": positive})

    def set_cfg(self, image_scale: float, text_scale: float):  # type: ignore[override]
        check_scales(image_scale, text_scale)
        self.image_scale, self.text_scale = float(image_scale), float(text_scale)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        # Checked once per model call so a cancel lands within one step, whatever the sampler.
        comfy.model_management.throw_exception_if_processing_interrupted()
        model_options = model_options if model_options is not None else {}
        needed = branches_needed(self.image_scale, self.text_scale)
        conds = [self.conds.get(name) if use else None for name, use in zip(BRANCHES, needed, strict=True)]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        uncond, image, full = (o if use else None for o, use in zip(out, needed, strict=True))
        return combine(uncond, image, full, self.image_scale, self.text_scale)


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
