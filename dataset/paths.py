"""Where dataset files may go, and how they land on disk so that a crash never leaves half a file.

`resolve_inside` turns a user-typed dataset name into a folder strictly inside a root (ComfyUI's output
folder, say). The write helpers put every file in place with a rename, so a reader sees the old file or the
new one, never a torn one; temporaries are hidden dot-files that readers and `datasets` skip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

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
    """The temporary `path` is written as before it is renamed into place: hidden, and no longer ending in the
    file's own suffix, so dataset readers, `datasets` and ComfyUI's model lists never show it."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TEMP_MARKER in path.name


def remove_temps(folder: Path, of: str | None = None) -> None:
    """Delete temporaries a killed writer left in `folder` (they were never renamed into place); with `of`, only
    those of the file of that name (any process id)."""
    prefix = "." if of is None else f".{of}{TEMP_MARKER}"
    for path in folder.iterdir():
        if is_temp(path) and path.name.startswith(prefix) and path.is_file():
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """The pack's one atomic writer: `write(temp)` creates the file at `temp` beside `path`, which is then made
    durable (fsync) and renamed over `path`; returns `path`.

    A reader sees the old file or the new one, never a torn one. The temporary is `temp_name(path)`, created by
    `write` with the process's default permissions like every file ComfyUI writes (not 0600 like mkstemp). Any
    failure (a full disk, a cancel) removes the temporary and raises as it came; the old file stays as it was.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "r+b") as handle:  # writable: Windows flushes only handles open for writing
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a file opened for `path`, put in place by atomic_write."""

    def through_handle(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, through_handle)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that it is either absent/old or complete, never partial."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line durably, on a line of its own: a crash leaves it whole, absent, or torn at the end.

    A file whose last line has no newline (written by another tool, or torn by a crash) gets one first, so
    the existing bytes are never changed and never glued to the new record (see read_jsonl for the reading
    side). The file is opened without following a final symlink and must be a regular file.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY
    fd = os.open(path, flags, 0o666)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetFileError(f"{path.name} in {path.parent} is not a regular file; writers append only "
                                   "to regular files: remove it, or choose another dataset name")
        data = (line + "\n").encode("utf-8")
        if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if info.st_size == 0:
        fsync_dir(path.parent)


def read_jsonl(path: Path, root: Path | None = None) -> list[dict]:
    """The JSON-object lines of `path` (confined to `root` when given); other lines are skipped and counted.

    A last line without newline counts when it is a whole JSON object (a file written by another tool); a
    torn one (a crash mid-append) is never a whole object, so it is skipped like any unparseable line.
    """
    records, skipped = read_jsonl_counted(path, root)
    if skipped:
        log.warning("%s: skipped %d line(s) that are not JSON records (torn by a crash, or not written by a "
                    "dataset writer)", path, skipped)
    return records


def read_jsonl_counted(path: Path, root: Path | None = None) -> tuple[list[dict], int]:
    """(records, number of non-empty lines that are not JSON objects) of `path`; ([], 0) when it is absent."""
    if not os.path.lexists(path):
        return [], 0
    records, skipped = [], 0
    for _, value in json_lines(read_dataset_bytes(path, root, MAX_TEXT_FILE_BYTES)):
        if isinstance(value, dict):
            records.append(value)
        else:
            skipped += 1
    return records, skipped


def json_lines(data: bytes | str) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed value or None when the line is not JSON) of every non-empty line."""
    lines = data.split(b"\n") if isinstance(data, bytes) else data.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError:
            yield number, None


def cut_torn_tail(path: Path) -> None:
    """Truncate an unterminated last line: only for the bytes this process just wrote (a failed append).

    Existing files are never cut when a writer opens them (append_line adds the missing newline instead),
    since their last line may be another tool's complete record.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------------------
# Reading dataset files: the one door
# ---------------------------------------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # Windows has no FIFOs to block on
# prompt.json, seeds.json, metadata.jsonl and manifests: the paper's largest seeds.json is about 20 MB. A cap
# keeps a planted multi-gigabyte "text" file from being read into memory whole.
MAX_TEXT_FILE_BYTES = 512 * 1024 * 1024


class DatasetFileError(ValueError):
    """A file of a dataset that must not be read: it leads outside the dataset or is not a regular file."""


class DatasetPath(type(Path())):  # type: ignore[misc]
    """A path to a file of a dataset that remembers the dataset folder it must stay inside.

    Readers hand images out as these (not decoded yet); whoever opens one later through `open_dataset_file`
    is held to the same folder, also when the file was swapped for a symlink in between. Paths derived from
    one (parent, joinpath) are plain and carry no root.
    """

    dataset_root: Path | None = None

    def __reduce__(self):
        # The root travels along when rows are pickled (DataLoader workers, multiprocessing).
        return dataset_path, (os.fspath(self), self.dataset_root)


def dataset_path(path: str | os.PathLike, root: str | os.PathLike | None) -> DatasetPath:
    confined = DatasetPath(path)
    confined.dataset_root = None if root is None else Path(root)
    return confined


def open_dataset_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> BinaryIO:
    """Open a dataset file for reading; every read of a dataset file goes through here.

    First `check_dataset_file` (nothing opened yet), then a non-blocking open that does not follow a final
    symlink, and the opened file must be a regular file again (fstat): a file swapped after the check is
    caught too. So a FIFO never blocks the executor, a device or socket is never read, and a symlink planted in
    a dataset reads nothing outside it. Messages name the file inside the dataset only, never where a link
    points or whether that exists.
    """
    root = root if root is not None else getattr(path, "dataset_root", None)
    real, shown = check_dataset_file(path, root)
    try:
        fd = os.open(real, os.O_RDONLY | _NONBLOCK | _NOFOLLOW | _CLOEXEC | _BINARY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown} is missing from the dataset") from None
    except OSError as error:
        # ELOOP: a symlink swapped in after the check
        raise DatasetFileError(f"{shown} cannot be opened as a regular dataset file ({error.strerror})") from None
    try:
        _require_regular(os.fstat(fd).st_mode, shown)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_dataset_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(real path, name for messages) of a dataset file that may be read, without opening it.

    Refused: a real location (symlinks resolved) outside `root` (default: the path's own `dataset_root`), and,
    by lstat, anything but a regular file; opening some devices has side effects (a tape rewinds), so they are
    never opened. A missing file passes: opening it says so.
    """
    root = root if root is not None else getattr(path, "dataset_root", None)
    path = Path(path)
    real = Path(os.path.realpath(path))
    shown = _shown(path, root)
    if root is not None and not real.is_relative_to(os.path.realpath(root)):
        raise DatasetFileError(
            f"{shown} is a symlink (or inside one) leading outside the dataset folder {root}; datasets must hold "
            "their files, not links to other places: replace the link by the file itself"
        )
    with contextlib.suppress(FileNotFoundError):
        _require_regular(os.lstat(real).st_mode, shown)
    return real, shown


def read_dataset_bytes(path: str | os.PathLike, root: str | os.PathLike | None = None,
                       max_bytes: int | None = None) -> bytes:
    """The bytes of a dataset file (see open_dataset_file), refused above `max_bytes`."""
    with open_dataset_file(path, root) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise DatasetFileError(f"{_shown(Path(path), root)} is {size} bytes, more than the {max_bytes} a "
                                   "file of this kind may have in a dataset; is it really part of the dataset?")
        return handle.read()


def read_dataset_json(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Any:
    return json.loads(read_dataset_bytes(path, root, MAX_TEXT_FILE_BYTES).decode("utf-8"))


def _require_regular(mode: int, shown: str) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise DatasetFileError(f"{shown} is {kind}, not a regular file; datasets hold only regular files: replace "
                           "it by the real file, or remove it from the dataset")


def _shown(path: Path, root: str | os.PathLike | None) -> str:
    """How a dataset file is named in messages: relative to its dataset, as the path lies (links unresolved)."""
    if root is not None:
        with contextlib.suppress(ValueError):
            return repr(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix())
    return repr(path.name)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, None when it cannot be read: enough to notice that a file was replaced."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size
