"""The compute precision as a MODEL patch: an apply_model wrapper on a cloned ModelPatcher that runs the model
under autocast, so it composes with every other patch (LoRAs, attention patches, cfg hooks, TorchCompileModel's
wrapper) and reaches every sampler that uses the MODEL, ours and core's alike. The dtype is chosen when the model
runs, from the device it runs on (training/precision.py)."""

from __future__ import annotations

from collections.abc import Callable

import comfy.patcher_extension
import torch

from ..training.precision import autocast_dtype, check_precision, explicit_dtype

WRAPPER_KEY = "comfyui_ip2p.precision"
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL


def autocast_wrapper(precision: str) -> Callable:
    def run(executor, x: torch.Tensor, *args, **kwargs):
        dtype = autocast_dtype(precision, x.device.type)
        if dtype is None:
            return executor(x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=dtype):
            return executor(x, *args, **kwargs)

    return run


def with_precision(model, precision: str):
    """A clone of `model` computing in `precision`; the input MODEL is untouched. A later choice replaces an
    earlier one; `fp32` removes it, giving back the model's own computation bit for bit."""
    check_precision(precision)
    explicit_dtype(precision, model.load_device.type)  # refuses fp16 off CUDA before anything runs
    patched = model.clone()
    patched.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    if precision != "fp32":
        patched.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, autocast_wrapper(precision))
    return patched
