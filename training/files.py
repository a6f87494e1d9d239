"""Model files, training state and run pictures, written whole or not at all, with failures said in words.

The writing itself is dataset.paths.atomic_write, the pack's one atomic writer (a hidden `.<name>.tmp-<pid>`
beside the target, fsync, rename): a run killed mid-write leaves at most that temporary, never a truncated file
under the final name. Here the folder is created, temporaries of earlier killed writers of the same file are
removed, and a failure becomes a WriteFailedError that says where and why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..dataset.paths import atomic_write, remove_temps
from ..dataset.writer import write_failure


class WriteFailedError(OSError, ValueError):
    """A file could not be written (full disk, size limit, read-only folder); the old file is untouched.

    An OSError, as the failure is one; also a ValueError, so the nodes report it under their name."""


def save_file(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls `write(temp_path)` and moves the result over `path` only when it completed.

    A failed write raises WriteFailedError saying where and why; the previous file stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temps(path.parent, of=path.name)
    try:
        return atomic_write(path, lambda tmp: write(str(tmp)))
    except Exception as error:
        # Writers fail in their own words (safetensors "os error 28", torch "unexpected pos"): say it plainly.
        raise WriteFailedError(f"could not write {path}: {write_failure(error)}. The previous {path.name} (if "
                               "any) is unchanged; free space and run again") from error


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save_file(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    return save_file(path, lambda tmp: torch.save(obj, tmp))


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return save_file(path, lambda tmp: Path(tmp).write_bytes(data))
