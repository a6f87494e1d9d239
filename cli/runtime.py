"""ComfyUI in-process: boot it once, load its nodes (ours included), execute API-format graphs.

This is ComfyUI's own executor (validation, caching, progress, interrupts), without the HTTP server, for the
headless command and for tests. Everything ComfyUI writes goes to the folders chosen at `boot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BOOTED: dict[str, Any] = {}


def comfyui_dir() -> Path:
    """The ComfyUI tree to run: $COMFYUI_PATH (set by scripts/setup.sh's env.sh), else the pack's runtime."""
    here = Path(__file__).resolve().parent.parent
    candidates = [os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_DIR"), here / ".runtime" / "ComfyUI"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "main.py").is_file():
            return Path(candidate).resolve()
    raise RuntimeError(
        "No ComfyUI found. Run `bash scripts/setup.sh` (it unpacks one into .runtime/), "
        "or set COMFYUI_DIR to an existing ComfyUI."
    )


def prepare_base(base: Path) -> None:
    """Creates ComfyUI's folders under a base directory and links this pack into its custom_nodes."""
    for sub in ("models/checkpoints", "input", "output", "temp", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui_ip2p"
    # several ranks may prepare the same fresh folder at once
    with contextlib.suppress(FileExistsError):
        if not link.exists():
            link.symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)


def boot(base_dir: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Imports ComfyUI with `base_dir` as its base directory (models/, input/, output/, temp/, custom_nodes/).

    ComfyUI reads its arguments at import time, so this must run before anything imports `comfy` and can
    only run once per process; a second call with the same base directory is a no-op.
    """
    base = str(Path(base_dir).resolve()) if base_dir else None
    if base:
        prepare_base(Path(base))
    if _BOOTED:
        if base != _BOOTED["base"]:
            raise RuntimeError(f"ComfyUI already booted with base {_BOOTED['base']}, not {base}")
        return _BOOTED["comfy"]
    comfy = comfyui_dir()
    if str(comfy) not in sys.path:
        sys.path.insert(0, str(comfy))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    args.cpu = cpu
    args.base_directory = base
    args.disable_api_nodes = True
    # `utils` must resolve to ComfyUI's package before `comfy/utils.py` shadows it.
    import utils.extra_config  # noqa: F401

    _BOOTED.update(base=base, comfy=comfy)
    return comfy


def load_nodes() -> dict[str, type]:
    """Loads ComfyUI's built-in and custom nodes once; returns NODE_CLASS_MAPPINGS."""
    import nodes

    if not _BOOTED.get("nodes_loaded"):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        _BOOTED["nodes_loaded"] = True
    return nodes.NODE_CLASS_MAPPINGS


class _ServerStub:
    """What the executor needs from PromptServer: a place to send events (kept for inspection)."""

    def __init__(self, on_event=None) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.events: list[tuple[str, Any]] = []
        self.on_event = on_event

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))
        if self.on_event is not None:
            self.on_event(event, data)

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    ok: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict | None = None
    node_errors: dict = field(default_factory=dict)
    events: list = field(default_factory=list)

    def raise_for_error(self) -> RunResult:
        if not self.ok:
            raise RuntimeError(format_error(self))
        return self


def format_error(result: RunResult) -> str:
    lines = []
    if result.error:
        err = result.error
        node = f"{err.get('node_type', '')} (node {err.get('node_id', '?')}): " if err.get("node_type") else ""
        lines.append(node + str(err.get("exception_message") or err.get("message") or err))
        if err.get("details"):
            lines.append(str(err["details"]))
    for node_id, info in result.node_errors.items():
        for e in info.get("errors", []):
            lines.append(f"{info.get('class_type', '?')} (node {node_id}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or "unknown ComfyUI error"


def run_prompt(prompt: dict, on_event=None, extra_data: dict | None = None) -> RunResult:
    """Validates and executes an API-format graph with a fresh executor (no cache between runs)."""
    import comfy.utils
    import execution

    load_nodes()
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        return RunResult(ok=False, error=valid[1], node_errors=valid[3])
    server = _ServerStub(on_event)

    def progress_hook(value, total, preview=None, prompt_id=None, node_id=None):
        server.send_sync("progress", {"value": value, "max": total, "node": node_id})

    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(progress_hook)
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0})
    try:
        executor.execute(prompt, prompt_id, extra_data or {}, valid[2])
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    error = next((data for event, data in executor.status_messages
                  if event in ("execution_error", "execution_interrupted")), None)
    return RunResult(ok=executor.success and error is None, outputs=executor.history_result.get("outputs", {}),
                     error=error, events=server.events)
