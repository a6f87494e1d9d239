"""Node classes only: each family module parses inputs, calls the work in pipeline/ and wraps outputs."""

from comfy_api.v0_0_2 import ComfyExtension, io

from .nodes_edit import DualCFGSampler, InstructEdit, IP2PGuidanceGrid
from .nodes_image import IP2PReferenceResize
from .nodes_loading import ConvertToIP2P, LoadIP2PModel

NODES: list[type[io.ComfyNode]] = [
    LoadIP2PModel,
    ConvertToIP2P,
    InstructEdit,
    DualCFGSampler,
    IP2PGuidanceGrid,
    IP2PReferenceResize,
]


class IP2PExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
