"""Benchmark helpers with no ComfyUI import: timing, memory probes, node calls, child processes, tables.

Kept free of `comfy` so the parent process of a benchmark can spawn its children and print their results
without ever booting ComfyUI or touching the GPU itself (its own memory would otherwise blur the figures).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so a wall-clock interval covers the kernels it launched."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


class CpuClock:
    """Process CPU seconds (all threads) over a series of timed calls.

    On a shared 2-core machine wall time swings with other people's load; CPU time is steadier (it still
    grows a little under contention, as threads spin waiting for a descheduled peer).
    """

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._start = 0.0

    def __enter__(self) -> CpuClock:
        self._start = time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.samples.append(time.process_time() - self._start)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --- memory -----------------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


_EARLIER_PEAK_KIB = [0]  # the RSS high-water before the resets: loading, model construction, warm-up


def _rss_hwm_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peaks(device: str) -> bool:
    """Restarts the RSS high-water mark (Linux clear_refs 5) and the CUDA peak; False if RSS cannot reset.

    Resetting after the model load lets the peak describe the edit itself (weights resident + activations),
    not the transient copies a checkpoint load makes; that earlier peak is kept apart. (clear_refs also
    resets ru_maxrss, which Linux derives from the same high-water mark.)
    """
    _EARLIER_PEAK_KIB[0] = max(_EARLIER_PEAK_KIB[0], _rss_hwm_kib())
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peaks_mb(device: str) -> dict[str, float | None]:
    """Peak RSS since the last reset, the peak before the first reset (load) and the CUDA peak, in MiB."""
    cuda = None
    if device.startswith("cuda") and torch.cuda.is_available():
        cuda = torch.cuda.max_memory_allocated() / 2**20
    return {
        "rss_peak_mb": _rss_hwm_kib() / 1024,
        "rss_load_peak_mb": _EARLIER_PEAK_KIB[0] / 1024 or None,
        "cuda_peak_mb": cuda,
    }


# --- ComfyUI node classes, called without the executor ------------------------------------------------------

def call_node(node_class: type, **inputs: Any) -> tuple:
    """Runs one node the way ComfyUI's executor does (V1 FUNCTION or V3 execute) and returns its outputs.

    The executor is bypassed on purpose: it reloads nothing between calls this way, so a timing covers the
    node's own work on already-loaded models and not graph validation or checkpoint loading.
    """
    function = getattr(node_class(), node_class.FUNCTION)
    out = function(**inputs)
    if inspect.iscoroutine(out):
        out = asyncio.run(out)
    if hasattr(out, "args") and not isinstance(out, tuple):  # a V3 NodeOutput
        return tuple(out.args)
    if isinstance(out, dict):  # a V1 node returning {"result": ..., "ui": ...}
        return tuple(out.get("result", ()))
    return tuple(out)


# --- results ------------------------------------------------------------------------------------------------

@dataclass
class VariantResult:
    """One variant's measurements; `seconds_per_step` covers only the sampling loop."""

    variant: str
    label: str
    seconds_per_edit: float
    seconds_per_step: float
    runs: list[float] = field(default_factory=list)
    memory: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "label": self.label, "seconds_per_edit": self.seconds_per_edit,
            "seconds_per_step": self.seconds_per_step, "runs": self.runs, "memory": self.memory,
            "details": self.details,
        }


def run_child(argv: list[str], log_path: Path, result_path: Path, timeout: float | None) -> dict[str, Any]:
    """Runs one variant in a fresh interpreter (clean peak memory, no shared caches) and reads its JSON."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, check=False)
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"child {' '.join(argv)} failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(result_path.read_text())


def ratio(value: float, reference: float | None) -> float | None:
    if reference is None or not reference or value != value:  # NaN-safe
        return None
    return value / reference


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into bench/README.md)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])
