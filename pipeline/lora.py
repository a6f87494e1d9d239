"""LoRA training adapters on ComfyUI's UNet: ComfyUI's own LoRA adapters (comfy.weight_adapter, as its
TrainLoraNode uses) on the attention projections, plus a full weight difference for the first convolution (the
paper's new image channels start at zero, so a LoRA alone could never learn to look at the image).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.weight_adapter.lora import LoRAAdapter

log = logging.getLogger("comfyui_ip2p.training")

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_IN = "input_blocks.0.0"
UNET_PREFIX = "diffusion_model."


class WeightDiff(torch.nn.Module):
    """A trainable full-weight difference, applied the way ComfyUI applies weight adapters."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.diff.to(weight.dtype)


@dataclass
class Adapters:
    """module name -> adapter; trainable weights are named as they are saved in the LoRA file."""

    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    alpha: float = 1.0

    def params(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for name, adapter in self.modules.items():
            for pname, p in adapter.named_parameters():
                if p.requires_grad:
                    out[f"{UNET_PREFIX}{name}.{pname}"] = p
        return out

    def attach(self, unet: torch.nn.Module) -> None:
        """(Re)installs every adapter; ComfyUI's model loading clears weight functions."""
        modules = dict(unet.named_modules())
        for name, adapter in self.modules.items():
            modules[name].weight_function = [adapter]


def make_lora(unet: UNetModel, rank: int, alpha: float) -> Adapters:
    unet.requires_grad_(False)
    adapters = Adapters(alpha=alpha)
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS) and ".attn" in name:
            adapter = LoRAAdapter.create_train(module.weight, rank=rank, alpha=alpha)
            adapters.modules[name] = adapter.to(module.weight.device)
    conv = dict(unet.named_modules())[CONV_IN]
    adapters.modules[CONV_IN] = WeightDiff(conv.weight).to(conv.weight.device)
    adapters.attach(unet)
    return adapters
