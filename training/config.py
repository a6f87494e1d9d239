"""Every hyper-parameter of a training run, with the paper's defaults, in one serialisable place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .precision import PRECISIONS

MODES = ("full", "lora")
PREDICTIONS = ("eps", "v")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
# Where the latent cache lives: "memory", "disk" (memory-mapped chunk files), or "auto" (disk when the estimated
# cache exceeds the memory budget of training/latent_cache.py). Not a resume setting: both give identical batches.
CACHE_LOCATIONS = ("auto", "memory", "disk")
# How several processes share the work (docs/distributed.md): "ddp" holds the whole model on every process and
# averages the gradients; "fsdp" shards the weights, gradients, AdamW state and EMA of a full fine-tune over the
# processes (FSDP2). Not a resume setting: both save the same whole-tensor state, and either resumes the other's.
PARALLELS = ("ddp", "fsdp")

# Settings that change what a resumed run would compute: a saved state with other values is refused.
RESUME_KEYS = ("mode", "lora_rank", "lora_alpha", "resolution", "batch_size", "grad_accumulation", "seed",
               "random_crop", "random_flip", "cache_latents", "dropout_prob", "prediction", "ema_decay",
               "masked_loss", "outside_mask_weight")


@dataclass
class TrainConfig:
    """`batch_size` is per process; the effective batch is batch_size x grad_accumulation x processes."""

    steps: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    resolution: int = 256
    random_crop: bool = True
    random_flip: bool = True
    dropout_prob: float = 0.05  # each of the paper's three bands (text, both, image)
    ema_decay: float = 0.9999  # 0 turns EMA off
    prediction: str = "eps"  # set from the model: "eps" or "v"
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_location: str = "auto"
    # Rows that carry a mask (MagicBrush, UltraEdit region edits) weigh the loss by it: inside the mask 1, outside
    # outside_mask_weight (small but not zero: the unedited surroundings must still be reproduced). Off by default.
    masked_loss: bool = False
    outside_mask_weight: float = 0.1
    mode: str = "full"
    parallel: str = "ddp"  # with several processes only (torchrun / accelerate launch); see PARALLELS
    lora_rank: int = 16
    lora_alpha: float = 16.0
    checkpoint_every: int = 0  # also writes the resumable state; 0 = only at the end
    validation_every: int = 0
    validation_count: int = 4
    validation_steps: int = 20
    save_ema: bool = True  # the saved model holds the EMA weights (the raw ones when False or EMA is off)
    save_precision: str = "fp16"  # of the saved model file; the resumable state is always float32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self._check_finite()
        positive = ("steps", "batch_size", "grad_accumulation", "resolution", "lora_rank", "validation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dropout_prob <= 1.0 / 3.0:
            raise ValueError(f"dropout_prob must be in [0, 1/3] (three bands), got {self.dropout_prob}")
        if not 0.0 <= self.outside_mask_weight <= 1.0:
            raise ValueError(f"outside_mask_weight must be in [0, 1], got {self.outside_mask_weight}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("prediction", PREDICTIONS),
                              ("save_precision", SAVE_PRECISIONS), ("cache_location", CACHE_LOCATIONS),
                              ("parallel", PARALLELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self._check_fsdp()

    def _check_fsdp(self) -> None:
        if self.parallel != "fsdp":
            return
        if self.mode != "full":
            raise ValueError("parallel fsdp shards a full fine-tune (mode full); LoRA adapters are a few MB and train "
                             "with parallel ddp")
        if self.precision == "fp16":
            raise ValueError("parallel fsdp does not take precision fp16 (its gradient scaler is not wired for "
                             "sharded gradients); use bf16 or fp32")
        if self.validation_every:
            raise ValueError("parallel fsdp does not run validation (rank 0 would sample with weights sharded over "
                             "every process); set validation_every 0 and edit with the saved checkpoint")

    def _check_finite(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            # NaN passes every range check in validate and would silently train NaN weights.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{setting.name} must be a finite number, got {value}")

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Names of the settings that differ between a saved state's config and this run's."""
    now = current.to_dict()
    return [key for key in RESUME_KEYS if key in saved and saved[key] != now[key]]
