"""Guidance nodes: IP2PAutoGuidance picks s_I and s_T from CLIP scores of a batched guidance grid."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..pipeline.auto_guidance import auto_guidance
from ..pipeline.edit import NATIVE_RESOLUTION
from ..pipeline.images import parse_scales
from ..pipeline.loading import check_is_ip2p
from .errors import named_errors
from .nodes_dataset import clip_weights_input
from .nodes_edit import sampling_inputs, settings_from


class IP2PAutoGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PAutoGuidance",
            display_name="Auto Guidance (InstructPix2Pix)",
            category="InstructPix2Pix",
            description=(
                "Chooses the two guidance scales for an image and instruction: edits a small s_I x s_T grid in "
                "one batched run, scores every cell with CLIP (image similarity to the input, direction "
                "similarity of the change to the text change) and returns the cell with the best direction "
                "similarity among those that keep enough of the input."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model (from Load InstructPix2Pix Model)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.Vae.Input("vae", tooltip="The model's VAE."),
                io.Image.Input("image", tooltip="The image to edit (the first of a batch is used)."),
                io.String.Input("instruction", multiline=True, default="make it winter",
                                tooltip="What to change, written as an instruction: \"turn the sky pink\"."),
                io.String.Input("image_guidance_values", default="1.2, 1.5, 2.0",
                                tooltip="Comma-separated s_I values to try (the grid's rows)."),
                io.String.Input("text_guidance_values", default="5.0, 7.5, 10.0",
                                tooltip="Comma-separated s_T values to try (the grid's columns)."),
                *sampling_inputs(),
                io.Int.Input("resolution", default=NATIVE_RESOLUTION, min=NATIVE_RESOLUTION, max=4096, step=64,
                             tooltip="Longest side of each cell's edit. -64 (the default) = the model's native "
                                     "size: 512 for SD1.x/2.x, 1024 for SDXL and CosXL Edit. 0 = the input's "
                                     "own size."),
                clip_weights_input(),
                io.Float.Input("min_image_similarity", default=0.7, min=-1.0, max=1.0, step=0.01,
                               tooltip="The least CLIP image similarity to the input a cell must keep to be "
                                       "chosen (0.7: the paper's data filter). Higher keeps more of the input."),
                io.String.Input("input_caption", multiline=True, default="", optional=True,
                                tooltip="Optional caption of the input image. With output_caption, the edit "
                                        "is scored against this caption change instead of \"\" -> instruction."),
                io.String.Input("output_caption", multiline=True, default="", optional=True,
                                tooltip="Optional caption the edited image should match (give both captions)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The chosen cell's edit (at the edit resolution)."),
                io.Float.Output(display_name="image_guidance", tooltip="The chosen s_I."),
                io.Float.Output(display_name="text_guidance", tooltip="The chosen s_T."),
                io.Image.Output(display_name="plot", tooltip="Heat map of the direction similarity per cell; "
                                                             "crossed-out cells keep too little of the input, "
                                                             "the chosen cell is framed."),
                io.Image.Output(display_name="images", tooltip="Every cell's edit, row by row."),
                io.String.Output(display_name="report", tooltip="The choice and every cell's scores."),
            ],
        )

    @classmethod
    @named_errors("IP2PAutoGuidance")
    def execute(cls, model, clip, vae, image, instruction, image_guidance_values, text_guidance_values, resolution,
                clip_weights, min_image_similarity, input_caption="", output_caption="", **kwargs) -> io.NodeOutput:
        check_is_ip2p(model)
        image_scales = parse_scales(image_guidance_values, "image_guidance_values")
        text_scales = parse_scales(text_guidance_values, "text_guidance_values")
        settings = settings_from({**kwargs, "image_guidance": 1.0, "text_guidance": 1.0})
        result = auto_guidance(model, clip, vae, image, instruction, image_scales, text_scales, resolution, settings,
                               clip_weights, min_image_similarity, input_caption, output_caption)
        s_i, s_t = result.scales
        return io.NodeOutput(result.edit, s_i, s_t, result.plot, result.cells, result.report,
                             ui=ui.PreviewText(result.report))


NODES = [IP2PAutoGuidance]
