"""A disk cache of LLM answers, so a rerun or a run after a crash never pays for the same request twice.

One JSON object per line: {"key": <sha256>, "text": <the model's raw text>, "finish_reason": ..., ...}.
Each answer is appended and fsynced as soon as it arrives. A crash can at worst leave a torn last line;
loading skips lines that do not parse, and the next append starts on a fresh line.

The key is a hash of what determines the answer: mode, base URL (without credentials), and the request body
(model, prompt or messages, sampling parameters). The API key is never part of it, and only the hash is
written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FORMAT_VERSION = 1


def cache_key(mode: str, base_url: str, body: dict[str, Any]) -> str:
    material = {"v": CACHE_FORMAT_VERSION, "mode": mode, "base_url": base_url, "body": body}
    canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str | None = None


class InstructionCache:
    """Key -> the model's raw answer, backed by an append-only JSONL file (or memory only when `path` is None).

    Safe to call from several threads.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.skipped_lines = 0  # lines that did not parse (a torn write, or a hand edit)
        self._entries: dict[str, CachedAnswer] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if self.path is not None and self.path.exists():
            self._load(self.path.read_bytes())

    def _load(self, data: bytes) -> None:
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, text = record["key"], record["text"]
                finish_reason = record.get("finish_reason")
            except (ValueError, KeyError, TypeError, AttributeError):
                self.skipped_lines += 1
                continue
            if isinstance(key, str) and isinstance(text, str) and isinstance(finish_reason, str | None):
                self._entries[key] = CachedAnswer(text, finish_reason)
            else:
                self.skipped_lines += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, answer: CachedAnswer, **meta: str) -> None:
        """Remember `answer` and make it durable before returning. `meta` is for people reading the file."""
        record = {"key": key, "text": answer.text, "finish_reason": answer.finish_reason, **meta}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[key] = answer
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                if self._needs_newline:
                    f.write(b"\n")
                    self._needs_newline = False
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
