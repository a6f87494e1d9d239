"""Edit nodes: the one-node InstructEdit, DualCFGSampler and IP2PGuider for custom graphs, the guidance grid."""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.v0_0_2 import io

from ..pipeline.edit import (
    NATIVE_RESOLUTION,
    EditRequest,
    SamplingSettings,
    edit_images,
    encode_image,
    prepare_pixels,
    sample,
)
from ..pipeline.grid import edit_grid, grid_cells
from ..pipeline.guider import make_guider
from ..pipeline.images import FRAMINGS, guidance_grid, parse_scales
from ..pipeline.loading import check_is_ip2p
from .errors import named_errors
from .widgets import seed_input


def image_scale_input(default: float = 1.5) -> io.Float.Input:
    return io.Float.Input(
        "image_guidance", default=default, min=0.0, max=100.0, step=0.05, round=0.01,
        tooltip="s_I, how closely the edit keeps the input image. Higher = more faithful, less change. "
                "Paper default 1.5; typical 1.0-2.5. At 1.0 one model branch is skipped.")


def text_scale_input(default: float = 7.5) -> io.Float.Input:
    return io.Float.Input(
        "text_guidance", default=default, min=0.0, max=100.0, step=0.1, round=0.01,
        tooltip="s_T, how strongly the edit follows the instruction. Higher = stronger edit. "
                "Paper default 7.5; typical 5-10.")


def sampling_inputs(steps: int = 20) -> list:
    return [
        io.Int.Input("steps", default=steps, min=1, max=1000,
                     tooltip="Denoising steps. The paper uses 100 Euler-ancestral steps; 20-30 is usually enough."),
        seed_input(tooltip="Seed of the starting noise; the same seed and settings give the same edit."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler_ancestral",
                       tooltip="Any ComfyUI sampler; the paper used euler_ancestral."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                       tooltip="Any ComfyUI scheduler; 'normal' matches the reference."),
    ]


def settings_from(kwargs: dict) -> SamplingSettings:
    return SamplingSettings(
        steps=kwargs["steps"], seed=kwargs["seed"], sampler_name=kwargs["sampler_name"],
        scheduler=kwargs["scheduler"], image_scale=kwargs["image_guidance"], text_scale=kwargs["text_guidance"],
        denoise=kwargs.get("denoise", 1.0))


class InstructEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructEdit",
            display_name="Instruct Edit (InstructPix2Pix)",
            category="InstructPix2Pix",
            description=(
                "Edits images by a written instruction (\"make it winter\") with the paper's dual guidance: "
                "resizes like the reference, encodes the image, samples with image and text guidance in one "
                "batched model call per step, decodes, and returns the edit at the input's size."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model (from Load InstructPix2Pix Model)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.Vae.Input("vae", tooltip="The model's VAE."),
                io.Image.Input("image", tooltip="Images to edit (a batch is edited in one go; RGBA and "
                                                "grayscale are converted to RGB)."),
                io.String.Input("instruction", multiline=True, default="make it winter",
                                tooltip="What to change, written as an instruction: \"turn the sky pink\"."),
                image_scale_input(),
                text_scale_input(),
                *sampling_inputs(),
                io.Int.Input("resolution", default=NATIVE_RESOLUTION, min=NATIVE_RESOLUTION, max=4096, step=64,
                             tooltip="Longest side the edit is computed at (sides rounded to multiples of 64, "
                                     "as the reference). -64 (the default) = the model's native size: 512 "
                                     "for SD1.x/2.x, 1024 for SDXL and CosXL Edit. 0 = the input's own size. "
                                     "Any other value is used as it is."),
                io.Boolean.Input("keep_input_size", default=True,
                                 tooltip="Return the edit at the input image's size and aspect."),
                io.String.Input("negative", multiline=True, default="", optional=True,
                                tooltip="Optional negative prompt; replaces the empty prompt in the "
                                        "unconditional branches (the paper uses the empty prompt)."),
                io.Int.Input("variations", default=1, min=1, max=64, optional=True,
                             tooltip="Edits per input image, from different noise of the same seed."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: edit only where the mask is white (1). Everything outside it "
                                      "keeps the input's own pixels exactly. One mask for all images or one "
                                      "per image; another size is resized to the image. An all-black mask "
                                      "returns the input without sampling."),
                io.Int.Input("mask_feather", default=0, min=0, max=256, optional=True,
                             tooltip="Softens the mask's edge over this many pixels, inside the mask, so the "
                                     "edit blends in while pixels outside the mask stay untouched."),
                io.Boolean.Input("detail", default=True, optional=True,
                                 tooltip="With keep_input_size: return the input at its full resolution with "
                                         "only the edit's change added (the change is computed at the edit "
                                         "resolution, upscaled smoothly, and added to the original), so a "
                                         "large photo stays sharp and what the edit did not change keeps every "
                                         "original pixel's detail. Off: the edit itself is upscaled (soft on "
                                         "a large photo). On by default: on a 2048x1536 test photo the "
                                         "untouched pixels come back exact (upscaling: 28 dB) for a fraction "
                                         "of a second. Limit: where the edit replaces an object, the old fine "
                                         "texture can show through faintly; turn it off then."),
                io.Combo.Input("framing", options=list(FRAMINGS), default="stretch", optional=True,
                               tooltip="How the image is fitted to the edit's size (multiples of 64) when the "
                                       "aspects differ. stretch: the whole image, slightly squeezed. crop: "
                                       "the reference's centre crop (ImageOps.fit), nothing squeezed; with "
                                       "keep_input_size the edited crop is put back into the input, the "
                                       "cut-off border keeps the input's pixels."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The edited images."),
                io.Latent.Output(display_name="LATENT", tooltip="The edit's latents (at the edit resolution)."),
            ],
        )

    @classmethod
    @named_errors("InstructEdit")
    def execute(cls, model, clip, vae, image, instruction, resolution, keep_input_size, negative="",
                variations=1, mask=None, mask_feather=0, detail=True, framing="stretch",
                **kwargs) -> io.NodeOutput:
        check_is_ip2p(model)
        request = EditRequest(instruction=instruction, negative=negative, resolution=resolution,
                              keep_input_size=keep_input_size, variations=variations, mask=mask,
                              feather=mask_feather, detail=detail, framing=framing)
        edited, samples = edit_images(model, clip, vae, image, request, settings_from(kwargs))
        return io.NodeOutput(edited, {"samples": samples})


def image_inputs() -> list:
    return [
        io.Latent.Input("image_latent", optional=True,
                        tooltip="The input image already encoded (raw VAE latent, e.g. from VAE Encode)."),
        io.Image.Input("image", optional=True, tooltip="The input image (needs `vae`)."),
        io.Vae.Input("vae", optional=True, tooltip="Encodes `image`."),
    ]


def conditioning_inputs() -> list:
    return [
        io.Conditioning.Input("positive", tooltip="The instruction's conditioning (CLIP Text Encode). Core's "
                                                  "DualCFGGuider calls this branch cond1."),
        io.Conditioning.Input("negative", tooltip="The empty prompt's conditioning (or a negative prompt): used by "
                                                  "the image-only branch (core: cond2) and, without the image, by "
                                                  "the unconditional branch (core: negative)."),
    ]


class DualCFGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualCFGSampler",
            display_name="Dual CFG Sampler (InstructPix2Pix)",
            category="InstructPix2Pix/sampling",
            description=(
                "A sampler with the paper's two guidance scales for custom graphs. Give it the image either as "
                "IMAGE + VAE or as an encoded image latent. A noise mask on `latent` (Set Latent Noise Mask) "
                "limits the edit to the masked region. For SamplerCustomAdvanced use the IP2P Guider node."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model; every patch on it (LoRA, FreeU, "
                                                "RescaleCFG, PAG, ...) applies as in core's samplers."),
                *conditioning_inputs(),
                image_scale_input(),
                text_scale_input(),
                *sampling_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 samples from pure noise (the paper). Lower values start from "
                                       "`latent` and keep more of it."),
                *image_inputs(),
                io.Latent.Input("latent", optional=True,
                                tooltip="Starting latent (for denoise < 1 or a noise mask); defaults to zeros of "
                                        "the image size. Its noise mask is honoured: only the masked region "
                                        "is sampled, the rest keeps this latent."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    @named_errors("DualCFGSampler")
    def execute(cls, model, positive, negative, image_latent=None, image=None, vae=None, latent=None,
                **kwargs) -> io.NodeOutput:
        check_is_ip2p(model)
        settings = settings_from(kwargs)
        concat = image_latent_from(image_latent, image, vae, model)
        latent = dict(latent) if latent is not None else {"samples": torch.zeros_like(concat)}
        guider = make_guider(model, positive, negative, concat, settings.image_scale, settings.text_scale)
        latent["samples"] = sample(guider, latent["samples"], settings, noise_mask=latent.get("noise_mask"),
                                   batch_index=latent.get("batch_index"))
        return io.NodeOutput(latent)


class IP2PGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PGuider",
            display_name="IP2P Guider (InstructPix2Pix)",
            category="InstructPix2Pix/sampling",
            description=(
                "The paper's dual guidance as a GUIDER for SamplerCustomAdvanced (or any custom sampler): "
                "all branches in one batched model call per step. Samples nothing itself. Equivalent to core's "
                "InstructPixToPixConditioning + DualCFGGuider (style regular, cfg_conds = text guidance, "
                "cfg_cond2_negative = image guidance)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model; its patches apply as in core's guiders."),
                *conditioning_inputs(),
                image_scale_input(),
                text_scale_input(),
                *image_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="Plug into SamplerCustomAdvanced.")],
        )

    @classmethod
    @named_errors("IP2PGuider")
    def execute(cls, model, positive, negative, image_guidance, text_guidance, image_latent=None, image=None,
                vae=None) -> io.NodeOutput:
        check_is_ip2p(model)
        concat = image_latent_from(image_latent, image, vae, model)
        return io.NodeOutput(make_guider(model, positive, negative, concat, image_guidance, text_guidance))


def image_latent_from(image_latent, image, vae, model) -> torch.Tensor:
    if image_latent is not None:
        return image_latent["samples"]
    if image is None or vae is None:
        raise ValueError("connect either `image_latent`, or `image` together with `vae`")
    return encode_image(vae, prepare_pixels(image, 0), model)


class IP2PGuidanceGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PGuidanceGrid",
            display_name="Guidance Grid (InstructPix2Pix)",
            category="InstructPix2Pix",
            description=(
                "The paper's s_I x s_T sweep as one labelled grid, to choose the two guidance scales: rows "
                "are image guidance, columns text guidance, every cell from the same seed. All cells are "
                "sampled in one run (one batched model call per step), each equal to InstructEdit's edit with "
                "its scales."
            ),
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.Image.Input("image", tooltip="One image (the first of a batch is used)."),
                io.String.Input("instruction", multiline=True, default="make it winter"),
                io.String.Input("image_guidance_values", default="1.0, 1.5, 2.0",
                                tooltip="Comma-separated s_I values (rows)."),
                io.String.Input("text_guidance_values", default="5.0, 7.5, 10.0",
                                tooltip="Comma-separated s_T values (columns)."),
                *sampling_inputs(),
                io.Int.Input("resolution", default=NATIVE_RESOLUTION, min=NATIVE_RESOLUTION, max=4096, step=64,
                             tooltip="Longest side of each cell's edit. -64 (the default) = the model's native "
                                     "size: 512 for SD1.x/2.x, 1024 for SDXL and CosXL Edit. 0 = the input's "
                                     "own size."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="All cells, labelled."),
                io.Image.Output(display_name="images", tooltip="The cells as a batch, row by row."),
            ],
        )

    @classmethod
    @named_errors("IP2PGuidanceGrid")
    def execute(cls, model, clip, vae, image, instruction, image_guidance_values, text_guidance_values,
                resolution, **kwargs) -> io.NodeOutput:
        check_is_ip2p(model)
        image_scales = parse_scales(image_guidance_values, "image_guidance_values")
        text_scales = parse_scales(text_guidance_values, "text_guidance_values")
        settings = settings_from({**kwargs, "image_guidance": 1.0, "text_guidance": 1.0})
        _, batch = edit_grid(model, clip, vae, image, instruction, grid_cells(image_scales, text_scales),
                             resolution, settings)
        return io.NodeOutput(guidance_grid(batch, image_scales, text_scales), batch)


NODES = [InstructEdit, DualCFGSampler, IP2PGuiderNode, IP2PGuidanceGrid]
