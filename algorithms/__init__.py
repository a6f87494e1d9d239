"""Pure math, no ComfyUI import: the dual classifier-free guidance formula and Prompt-to-Prompt attention sharing."""
