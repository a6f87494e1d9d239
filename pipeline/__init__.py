"""ComfyUI-bound work, one module per concept (edit, guider, p2p, instructions, clip_filter, datasets, train, lora,
memory): ComfyUI's objects, folders, progress and memory around the pure code in algorithms/, dataset/, training/.
"""
