"""Model nodes: load an InstructPix2Pix checkpoint, or turn a text-to-image model into the paper's init."""

from comfy_api.v0_0_2 import io

from ..pipeline.loading import checkpoint_choices, convert_to_ip2p, load_ip2p
from .errors import named_errors


class LoadIP2PModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadIP2PModel",
            display_name="Load InstructPix2Pix Model",
            category="InstructPix2Pix",
            description=(
                "Loads an InstructPix2Pix checkpoint (SD1.5 or SDXL/CosXL Edit; a single file from "
                "models/checkpoints or a diffusers folder from models/diffusers) as ComfyUI's standard "
                "MODEL, CLIP and VAE, so it chains with LoRA loaders, KSampler and VAE Decode."
            ),
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices(),
                               tooltip="An InstructPix2Pix checkpoint (8-channel UNet). Text-to-image models "
                                       "are refused: convert them with ConvertToIP2P to fine-tune."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The 8-channel InstructPix2Pix diffusion model."),
                io.Clip.Output(display_name="CLIP", tooltip="Text encoder for the instruction."),
                io.Vae.Output(display_name="VAE", tooltip="Encodes the input image and decodes the edit."),
            ],
        )

    @classmethod
    @named_errors("LoadIP2PModel")
    def execute(cls, checkpoint) -> io.NodeOutput:
        model, clip, vae = load_ip2p(checkpoint)
        return io.NodeOutput(model, clip, vae)


class ConvertToIP2P(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConvertToIP2P",
            display_name="Convert To InstructPix2Pix",
            category="InstructPix2Pix",
            description=(
                "The paper's training initialisation: a text-to-image MODEL with its first convolution "
                "widened to 8 input channels (the 4 new image channels start at zero). Untrained, it edits "
                "nothing: with any image it predicts what the original model predicts. Feed it to TrainIP2P."
            ),
            inputs=[io.Model.Input("model", tooltip="An SD1.x or SDXL text-to-image model (4 input channels).")],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A new 8-channel model; the input is untouched.")],
        )

    @classmethod
    @named_errors("ConvertToIP2P")
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(convert_to_ip2p(model))


NODES = [LoadIP2PModel, ConvertToIP2P]
