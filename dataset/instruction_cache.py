"""A disk cache of parsed LLM answers, so a rerun or a run after a crash never pays for the same request twice.

One JSON object per line: {"key": <sha256>, "instruction": ..., "output": ..., <meta for people>}. Only answers
that gave a row are cached, and only as that row: never the model's raw text, which an endpoint controls (one
that echoes the API key back would otherwise put the key into a file ComfyUI's /view serves), and never a
failure, which would then be "answered" forever. Each row is appended and fsynced as soon as it arrives. A crash
can at worst leave a torn last line; loading skips lines that do not parse, and the next append starts on a
fresh line.

Lines of the first version held the raw text ({"key", "text", ...}); they are never used (their answer is asked
again), and the file is rewritten without them once, so raw text an older version stored does not stay
downloadable.

The key is a hash of what determines the answer: mode, base URL (without credentials), and the request body
(model, prompt or messages, sampling parameters). The API key is never part of it, and only the hash is
written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: one ComfyUI process per output folder, the thread lock suffices
    fcntl = None

from .paths import atomic_write_bytes

CACHE_FORMAT_VERSION = 1  # of the key material; the line format is told apart by its fields


def cache_key(mode: str, base_url: str, body: dict[str, Any]) -> str:
    material = {"v": CACHE_FORMAT_VERSION, "mode": mode, "base_url": base_url, "body": body}
    canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedRow:
    instruction: str
    output_caption: str


def _row_of(record: Any) -> tuple[str, CachedRow] | None:
    """(key, row) from one parsed line of the current format, or None."""
    if not isinstance(record, dict):
        return None
    key, instruction, output = record.get("key"), record.get("instruction"), record.get("output")
    if isinstance(key, str) and isinstance(instruction, str) and isinstance(output, str):
        return key, CachedRow(instruction, output)
    return None


class InstructionCache:
    """Key -> the row an answer gave, backed by an append-only JSONL file (or memory only when `path` is None).

    Safe to call from several threads, and from several processes on one machine (ranks of the headless
    builder share the file): writes hold an exclusive lock (flock) on the file.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.skipped_lines = 0  # lines that did not parse (a torn write, or a hand edit)
        self.legacy_lines = 0  # lines of the first version (raw text): never used, removed from the file
        self._entries: dict[str, CachedRow] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if self.path is not None and self.path.exists():
            self._load(self.path.read_bytes())
            if self.legacy_lines:
                self._drop_legacy_lines()

    def _load(self, data: bytes) -> None:
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped_lines += 1
                continue
            entry = _row_of(record)
            if entry is not None:
                self._entries[entry[0]] = entry[1]
            elif isinstance(record, dict) and "text" in record:
                self.legacy_lines += 1
            else:
                self.skipped_lines += 1

    def _drop_legacy_lines(self) -> None:
        """Rewrites the file without raw-text lines (read again under the lock: another process may append)."""
        assert self.path is not None
        with contextlib.suppress(OSError), self._locked_file() as f:
            # Best effort: on a full or read-only disk the old lines stay; they are never used either way.
            f.seek(0)
            kept = [line for line in f.read().split(b"\n") if line.strip() and not _is_legacy(line)]
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))
            self._needs_newline = False

    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[BinaryIO]:
        """The cache file opened for appending, under an exclusive lock shared with other processes.

        Locked after opening, then checked to still be the file at `path`: a process that rewrote the file while
        we waited for the lock has replaced it, and appending to the old one would lose the line.
        """
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with open(self.path, "a+b") as f:  # closing releases the lock
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                if os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino:
                    yield f
                    return

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> CachedRow | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, row: CachedRow, **meta: str) -> None:
        """Remember `row` and make it durable before returning. `meta` is for people reading the file."""
        record = {"key": key, "instruction": row.instruction, "output": row.output_caption, **meta}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[key] = row
            if self.path is None:
                return
            with self._locked_file() as f:
                # Another process may have left a torn line since we loaded: start on a fresh line if so.
                if self._needs_newline or _ends_without_newline(f):
                    f.write(b"\n")
                    self._needs_newline = False
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())


def _ends_without_newline(f: BinaryIO) -> bool:
    """Whether the file `f` (open for reading and appending) is non-empty and its last byte is not a newline."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return False
    f.seek(size - 1)
    return f.read(1) != b"\n"


def _is_legacy(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False  # a torn line: harmless, skipped on loading
    return isinstance(record, dict) and "text" in record
