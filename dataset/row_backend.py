"""What every reader of dataset/source.py provides (Backend), and the small helpers they share."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .records import EditRow

MAPPING_HINT = (
    "give a column mapping such as 'input_image=<column>, edited_image=<column>, instruction=<column>' "
    "(optionally mask=, input_caption=, output_caption=)"
)


class Backend:
    """One layout's rows by index; RowSource (dataset/source.py) adds views, confinement and checks."""

    format: str
    path: Path
    columns: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, index: int) -> EditRow:
        raise NotImplementedError

    def scores(self, name: str, start: int, stop: int) -> list[float | None]:
        raise NotImplementedError

    def blocks(self) -> list[tuple[int, int]]:
        return [(0, len(self))]

    def mask_count(self) -> int | None:
        return None

    def stamps(self) -> list[str]:
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError


class LRU:
    """A tiny thread-safe LRU; dropped when pickled (each process fills its own)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: reading a row group must not stall other threads' hits
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"_size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_size"])


def root_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def shown_file(file: Path, path: Path) -> str:
    root = root_of(path)
    return file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name


