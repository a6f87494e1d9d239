"""The compute precision of the edit, P2P and training: which dtype autocast computes in, if any.

`auto` uses bf16 where the hardware computes it natively: on CPUs with AMX or AVX512-BF16 (a UNet forward of the
SD1.5 layout measured 1.9x faster there under bf16 autocast than in fp32) and, for training, on GPUs with bf16.
For the edit on GPUs `auto` keeps the dtype ComfyUI already loaded the weights in (fp16/bf16). `fp32` is no
autocast at all: bit-for-bit the model as loaded (fp32 on a CPU), what every equality test uses.
"""

from __future__ import annotations

import functools
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# /proc/cpuinfo flags of CPUs that compute bf16 matrix products in hardware.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# Set to 1 or 0 to override the CPU check (e.g. a VM hiding the flags, or to compare speeds).
CPU_BF16_OVERRIDE = "IP2P_CPU_BF16"
CPUINFO_LIMIT = 1 << 20  # a few KB per core: enough for any machine, bounded for a pseudo-file


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read(CPUINFO_LIMIT)
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    override = os.environ.get(CPU_BF16_OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def explicit_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype of an explicit choice; fp16 autocast is refused off CUDA (slow or unsupported there)."""
    if check_precision(precision) == "fp16" and device_type != "cuda":
        raise ValueError("fp16 needs a CUDA GPU; use precision bf16, auto or fp32 on this device")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast_dtype(precision: str, device_type: str, gpu_auto: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype for `precision` on a device of `device_type`; None = no autocast.

    `gpu_auto` is what `auto` means on a CUDA GPU: None for the edit (ComfyUI's own weight dtype), bf16 for
    training where the GPU has it.
    """
    if check_precision(precision) != "auto":
        return explicit_dtype(precision, device_type)
    if device_type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return gpu_auto if device_type == "cuda" else None
