"""Where dataset files may go, and how they land on disk so that a crash never leaves half a file.

`resolve_inside` turns a user-typed dataset name into a folder strictly inside a root (ComfyUI's output
folder, say). The write helpers put every file in place with a rename, so a reader sees the old file or the
new one, never a torn one; temporaries are hidden dot-files that readers and `datasets` skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]+")
# Characters Windows refuses in file names; refusing them everywhere keeps datasets portable.
_WINDOWS_FORBIDDEN = set('<>:"|?*')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
# Control, format (zero-width, bidi overrides that disguise names) and lone surrogate characters.
_INVISIBLE = {"Cc", "Cf", "Cs"}
_EXAMPLE = "a plain relative folder name such as 'my_edits' or 'my_edits/run_2'"
# Longest file or folder name most file systems accept (ext4, NTFS, APFS: 255), with room for the
# writers' temporary-file decorations (".<name>.tmp-<pid>").
_MAX_PART_BYTES = 200

TEMP_MARKER = ".tmp-"


def resolve_inside(root: str | os.PathLike, name: str, what: str = "dataset name", example: str = _EXAMPLE) -> Path:
    """The folder `root/name`, refusing any name that could reach outside `root`.

    Refused: absolute paths, Windows drive letters and UNC paths, `..` components, NUL, control and
    invisible characters (zero-width, bidi overrides), characters or device names Windows forbids, parts
    longer than file systems allow, and symlinks (already on disk) that lead out of `root`. The name is
    NFKC-normalised first, so look-alike characters (fullwidth dots and slashes) are judged as what they
    normalise to. Both / and \\ separate components. `what` and `example` word the error messages.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}")
    if "\x00" in name:
        raise ValueError(f"{what} {name!r} contains a NUL byte; use {example}")
    text = unicodedata.normalize("NFKC", name).strip()
    if not text:
        raise ValueError(f"{what} is empty; use {example}")
    if any(unicodedata.category(ch) in _INVISIBLE for ch in text):
        raise ValueError(f"{what} {name!r} contains control or invisible characters; use {example}")
    if text.startswith(("/", "\\")) or _DRIVE.match(text):
        raise ValueError(f"{what} {name!r} is an absolute path; use {example} (it goes inside {root})")
    parts = [_check_part(part, name, what, example) for part in _SEPARATORS.split(text) if part not in ("", ".")]
    if not parts:
        raise ValueError(f"{what} {name!r} names the root folder itself; use {example}")
    root_path = Path(root).resolve()
    target = root_path.joinpath(*parts).resolve()
    if target == root_path or not target.is_relative_to(root_path):
        raise ValueError(
            f"{what} {name!r} leads outside {root_path} through a symlink; use {example} "
            "that is a real folder inside it"
        )
    return target


def _check_part(part: str, name: str, what: str, example: str) -> str:
    if part == "..":
        raise ValueError(f"{what} {name!r} contains '..'; use {example}")
    bad = sorted(_WINDOWS_FORBIDDEN.intersection(part))
    if bad:
        raise ValueError(f"{what} {name!r} contains {''.join(bad)!r}; use {example}")
    if part.rstrip(". ") != part:
        # Windows silently drops trailing dots and spaces, so "a." and "a" would be the same folder.
        raise ValueError(f"{what} {name!r} has a part ending in a dot or space; use {example}")
    if part.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise ValueError(f"{what} {name!r} uses the Windows device name {part!r}; use {example}")
    if len(part.encode("utf-8")) > _MAX_PART_BYTES:
        # Otherwise the OS refuses it later with a bare "File name too long" that names no node.
        raise ValueError(f"{what} {name!r} has a part longer than {_MAX_PART_BYTES} bytes; use {example}")
    return part


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TEMP_MARKER in path.name


def remove_temps(folder: Path) -> None:
    """Delete temporaries a killed writer left in `folder` (they were never renamed into place)."""
    for path in folder.iterdir():
        if is_temp(path) and path.is_file():
            path.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make renames and new names in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that it is either absent/old or complete, never partial."""
    write_atomically(path, lambda handle: handle.write(data))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a temporary beside `path`, moved over it only once complete and on disk."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk or a cancel must not leave a half-written temp file beside the real one
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line durably: a crash leaves the line whole, absent, or torn at the end (see read_jsonl)."""
    is_new = not path.exists()
    with open(path, "ab") as handle:
        handle.write((line + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    if is_new:
        fsync_dir(path.parent)


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON-object lines of `path`; a torn last line (a crash mid-append) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        # Only lines with their newline count: the last element after split is the unterminated tail.
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                records.append(value)
    return records


def cut_torn_tail(path: Path) -> None:
    """Truncate an unterminated last line so the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
