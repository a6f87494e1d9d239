"""InstructPix2Pix for ComfyUI.

ComfyUI finds `comfy_entrypoint` here. The node modules are imported only when ComfyUI asks for them, so
the pure parts of the pack (samplers/, dataset/, training/) import without a ComfyUI runtime.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import IP2PExtension

    return IP2PExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
