"""Atomic file writes: a temp file next to the target, fsync, then os.replace.

A run killed mid-write leaves at most a hidden `.<name>.<pid>.tmp` beside the target, never a truncated file
under the final name (a reader sees the old file or the new one). Temp names end in .tmp, so ComfyUI's model
lists never show them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..dataset.writer import write_failure


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Files are shared with ComfyUI and other users like any file this process creates (not 0600 like mkstemp).
FILE_MODE = 0o666 & ~_umask()


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(path: Path) -> None:
    """Temp files of earlier, killed writers of `path`."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


class WriteFailedError(OSError, ValueError):
    """A file could not be written (full disk, size limit, read-only folder); the old file is untouched.

    An OSError, as the failure is one; also a ValueError, so the nodes report it under their name."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls `write(temp_path)` and moves the result over `path` only when it completed.

    A failed write raises WriteFailedError saying where and why; the previous file stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except Exception as error:
        # Writers fail in their own words (safetensors "os error 28", torch "unexpected pos"): say it plainly.
        raise WriteFailedError(f"could not write {path}: {write_failure(error)}. The previous {path.name} (if "
                               "any) is unchanged; free space and run again") from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
