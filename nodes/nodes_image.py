"""Image preparation nodes."""

from comfy_api.v0_0_2 import io

from ..pipeline.edit import prepare_pixels
from ..pipeline.images import FRAMINGS
from .errors import named_errors


class IP2PReferenceResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PReferenceResize",
            display_name="IP2P Reference Resize",
            category="InstructPix2Pix/image",
            description=(
                "Resizes images to the InstructPix2Pix reference's edit size: the longest side near "
                "`resolution`, both sides multiples of 64, Lanczos filtering. `framing` crop fits the image "
                "exactly as the reference does (a centred crop), stretch resizes the whole image."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to resize (RGBA and grayscale become RGB)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Target for the longest side; the paper edits at 512."),
                io.Combo.Input("framing", options=list(FRAMINGS), default="stretch", optional=True,
                               tooltip="stretch: the whole image resized to the new size (the aspect changes "
                                       "slightly). crop: the reference's ImageOps.fit, the centred part of the "
                                       "new aspect resized to it (a thin border is cut off)."),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Int.Output(display_name="width"),
                io.Int.Output(display_name="height"),
            ],
        )

    @classmethod
    @named_errors("IP2PReferenceResize")
    def execute(cls, image, resolution, framing="stretch") -> io.NodeOutput:
        pixels = prepare_pixels(image, resolution, framing)
        return io.NodeOutput(pixels, pixels.shape[2], pixels.shape[1])


NODES = [IP2PReferenceResize]
