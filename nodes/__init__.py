"""Node classes only: each family module (nodes_<family>.py) parses inputs, calls the work in pipeline/
(or dataset/, training/) and wraps outputs. Every family module lists its node classes in `NODES`."""

import importlib
import logging
import pkgutil

from comfy_api.v0_0_2 import ComfyExtension, io


def discover() -> list[type[io.ComfyNode]]:
    """Every family's NODES; a family that fails to import is reported and skipped, the others still load."""
    found: list[type[io.ComfyNode]] = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("nodes_")):
        try:
            found += importlib.import_module(f"{__name__}.{module}").NODES
        except Exception:
            logging.exception("InstructPix2Pix: the %s nodes failed to load and are skipped", module)
    return found


class IP2PExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return discover()
