"""Pure math, no ComfyUI import: the dual classifier-free guidance formula, Prompt-to-Prompt attention sharing and
the seed ranges."""
