"""Compute precision as a MODEL patch (pipeline/precision.py): bf16 autocast where the hardware has it."""

from comfy_api.v0_0_2 import io

from ..pipeline.precision import with_precision
from ..training.precision import PRECISIONS
from .errors import named_errors


class IP2PComputePrecision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PComputePrecision",
            display_name="Compute Precision (InstructPix2Pix)",
            category="InstructPix2Pix",
            description=(
                "Runs the MODEL under autocast: on CPUs with AMX or AVX512-BF16 bf16 roughly halves the time of "
                "each step (a small change in the result, ~1e-2 relative per prediction). Put it after the "
                "loader; InstructEdit, the samplers, P2P pairs and core's KSampler all use it. Without this "
                "node, or with fp32, the model computes exactly as loaded."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: bf16 on CPUs that compute it natively (AMX / AVX512-BF16), else "
                                       "as loaded; on GPUs the dtype ComfyUI loaded (fp16/bf16). fp32: no "
                                       "autocast, exact. bf16 / fp16: always that dtype (fp16 on CUDA only)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy; the input is untouched.")],
        )

    @classmethod
    @named_errors("IP2PComputePrecision")
    def execute(cls, model, precision) -> io.NodeOutput:
        return io.NodeOutput(with_precision(model, precision))


NODES = [IP2PComputePrecision]
