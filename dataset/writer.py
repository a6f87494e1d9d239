"""What every dataset writer shares: a safe folder, one writer at a time, a manifest, and exactly-once rows.

A writer is opened on `root` + a relative name (see `paths.resolve_inside`). Opening an existing dataset
resumes it: the format-specific `_recover` reads back which (group, sample_id) keys are already on disk and
cleans up what a killed writer left half done, so `add` skips rows that are already there.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from .paths import atomic_write_json, read_dataset_json, remove_temps, resolve_inside
from .records import EditRow, row_key

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

# The manifest is a hidden file: `datasets.load_dataset(folder)` skips files and folders whose names start with
# a dot (datasets.data_files: _is_unrequested_hidden_file_or_is_inside_unrequested_hidden_dir), so it never
# turns the pack's bookkeeping into a row of data. Versions before that wrote it visible, under the old name:
# read both, and a writer moves an old one to the new name.
MANIFEST_NAME = ".ip2p_dataset.json"
OLD_MANIFEST_NAME = "ip2p_dataset.json"
MANIFEST_NAMES = (MANIFEST_NAME, OLD_MANIFEST_NAME)
LOCK_NAME = ".ip2p_writer.lock"
WRITER_ID = "comfyui_ip2p"

Key = tuple[str, int]


class WriterBusyError(RuntimeError):
    """Another writer (in this or another process) holds the dataset folder."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The pack's manifest of `folder` (new name first, then the old one), or None when it has none."""
    for name in MANIFEST_NAMES:
        value = _manifest_at(folder, name)
        if value is not None:
            return value
    return None


def _manifest_at(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file() or path.is_symlink():
        return None  # a planted link or FIFO under this name is not our manifest
    try:
        value = read_dataset_json(path, folder)
    except (ValueError, OSError):
        return None
    return value if isinstance(value, dict) and value.get("writer") == WRITER_ID else None


class DatasetWriter:
    """Base class; use `formats.open_writer` to get one. A context manager: leaving the block finishes it.

    `add(row)` returns False (and writes nothing) when the row's key is already in the dataset, so a job
    that died can simply be run again from the start.
    """

    format = ""

    def __init__(self, root: str | os.PathLike, name: str) -> None:
        self.path = resolve_inside(root, name)
        self.path.mkdir(parents=True, exist_ok=True)
        refuse_links_out(self.path, self.path)
        self._lock = _take_lock(self.path / LOCK_NAME)
        self._keys: set[Key] = set()
        self._committed = 0
        self._closed = False
        try:
            self._check_folder()
            self._recover()
            self._write_manifest(clean=False)
        except BaseException:
            self._lock.close()
            raise

    # -- public API ------------------------------------------------------------------------------------

    def add(self, row: EditRow) -> bool:
        """Write `row` unless its (group, sample_id) is already present; True when it was added."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        key = row_key(row)
        if key in self._keys:
            return False
        self._add(row, key)
        self._keys.add(key)
        return True

    def extend(self, rows: Iterable[EditRow]) -> int:
        return sum(self.add(row) for row in rows)

    @property
    def keys(self) -> frozenset[Key]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        """Rows that are on disk for good (a crash now keeps exactly these)."""
        return self._committed

    def flush(self) -> None:
        """Make every added row durable now."""

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self._finish()
            self._write_manifest(clean=True)
        except BaseException:
            # A failed write (full disk) must not leave temporaries beside the rows that did make it.
            self._discard_temps()
            raise
        finally:
            self._closed = True
            self._lock.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Rows added before an error are complete rows: keep them, also when the block failed.
        self.close()

    # -- for subclasses --------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        manifest = read_manifest(self.path)
        if manifest is not None:
            if manifest.get("format") != self.format:
                raise ValueError(
                    f"{self.path} holds a {manifest.get('format')!r} dataset; open it with "
                    f"format={manifest.get('format')!r} or choose another name for a {self.format!r} dataset"
                )
            return
        if not self._accepts_foreign_folder():
            raise ValueError(
                f"{self.path} already has files that are not a dataset written by this pack; "
                "choose another name (an empty or new folder)"
            )

    def _accepts_foreign_folder(self) -> bool:
        return not any(entry.name != LOCK_NAME for entry in self.path.iterdir())

    def _manifest_extra(self) -> dict[str, Any]:
        return {}

    def _write_manifest(self, clean: bool) -> None:
        manifest = {"writer": WRITER_ID, "version": 1, "format": self.format, "clean": clean}
        manifest["rows"] = self._committed
        manifest.update(self._manifest_extra())
        atomic_write_json(self.path / MANIFEST_NAME, manifest)
        if _manifest_at(self.path, OLD_MANIFEST_NAME) is not None:
            # Ours (checked): the visible old manifest would load as a row in `datasets`.
            (self.path / OLD_MANIFEST_NAME).unlink(missing_ok=True)

    def _recover(self) -> None:
        raise NotImplementedError

    def _add(self, row: EditRow, key: Key) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Last writes of a clean close (after flush, before the manifest says clean)."""

    def _discard_temps(self) -> None:
        """Deletes this writer's temporaries after a failed write (subclasses add their own folders)."""
        remove_temps(self.path)


def refuse_links_out(folder: Path, root: Path, depth: int = 2) -> None:
    """Refuses a dataset folder holding symlinks (two levels deep: pair folders, shards, their files) that
    lead outside it: resuming appends to metadata files and adds images to pair folders, which would write
    through such a link to wherever it points."""
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if entry.is_symlink():
            if not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{root} holds {path.relative_to(root).as_posix()!r}, a symlink leading outside the dataset "
                    "folder; writers only write inside it: replace the link by a real folder or file, or choose "
                    "another dataset name"
                )
        elif depth > 1 and entry.is_dir():
            refuse_links_out(path, root, depth - 1)


def _take_lock(path: Path) -> IO[bytes]:
    """An exclusive lock on `path` held while the handle is open; the OS drops it when the process dies."""
    handle = open(path, "a+b")  # noqa: SIM115 - the handle is the lock and lives as long as the writer
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        handle.close()
        raise WriterBusyError(
            f"another writer is writing {path.parent}; wait until it finishes or choose another name"
        ) from None
    return handle


def write_failure(error: BaseException) -> str:
    """Why a write failed, in words (a full disk first), from an OSError or a library's wrapped OS error."""
    code = error.errno if isinstance(error, OSError) else _os_error_code(str(error))
    detail = (error.strerror if isinstance(error, OSError) else None) or str(error)[:200]
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({detail})"
    if code == errno.EFBIG:
        return f"the disk is full or a file size limit was reached ({detail})"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the folder is not writable ({detail})"
    return f"the write failed ({detail}); is the disk full?"


def _os_error_code(text: str) -> int | None:
    """The errno inside messages such as safetensors' "I/O error: File too large (os error 27)"."""
    match = re.search(r"os error (\d+)", text)
    return int(match.group(1)) if match else None
