"""Image preparation nodes."""

from comfy_api.v0_0_2 import io

from ..pipeline.edit import check_images
from ..pipeline.images import reference_size, resize_lanczos, to_rgb
from .errors import named_errors


class IP2PReferenceResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PReferenceResize",
            display_name="IP2P Reference Resize",
            category="InstructPix2Pix/image",
            description=(
                "Resizes images the way the InstructPix2Pix reference does before an edit: the longest side "
                "near `resolution`, both sides multiples of 64, Lanczos filtering."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to resize (RGBA and grayscale become RGB)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Target for the longest side; the paper edits at 512."),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Int.Output(display_name="width"),
                io.Int.Output(display_name="height"),
            ],
        )

    @classmethod
    @named_errors("IP2PReferenceResize")
    def execute(cls, image, resolution) -> io.NodeOutput:
        check_images(image)
        width, height = reference_size(image.shape[2], image.shape[1], resolution)
        return io.NodeOutput(resize_lanczos(to_rgb(image), width, height), width, height)


NODES = [IP2PReferenceResize]
