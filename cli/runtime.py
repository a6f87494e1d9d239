"""ComfyUI in-process: boot it once, load its nodes (ours included), execute API-format graphs.

This is ComfyUI's own executor (validation, caching, progress, interrupts), without the HTTP server, for the
headless commands and for tests. Everything ComfyUI writes goes to the folders chosen at `boot`. `start` is how
a command boots it (the one place for that), `progress_printer` how it shows a run's progress.

ComfyUI complains at every start about optional parts it cannot import (its audio nodes need torchaudio, which
this pack does not): those complaints become one line on stderr, the full messages with `verbose`. Anything
else it logs (a failure of this pack or of another custom node) passes through as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
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


def load_nodes(verbose: bool = False) -> dict[str, type]:
    """Loads ComfyUI's built-in and custom nodes once; returns NODE_CLASS_MAPPINGS. ComfyUI's complaints about
    its optional parts become one line (all its messages with `verbose`)."""
    if not _BOOTED.get("nodes_loaded"):
        with optional_parts_summed_up(verbose):
            import nodes

            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        _BOOTED["nodes_loaded"] = True
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """The commands' --verbose, for `start`."""
    parser.add_argument("--verbose", action="store_true",
                        help="show every message ComfyUI logs at start-up (by default its complaints about "
                             "optional parts it cannot import are one line)")


def start(base_dir: str | os.PathLike | None = None, *, cpu: bool | None = None, with_nodes: bool = True,
          verbose: bool = False) -> Path:
    """ComfyUI for a command, in this process: booted with `base_dir` (ranks sharing a fresh folder may set it up
    at once), its model code imported and, `with_nodes`, its nodes and this pack's loaded. Returns ComfyUI's
    output folder."""
    boot(base_dir, cpu=cpu)
    if with_nodes:
        load_nodes(verbose)
    else:
        with optional_parts_summed_up(verbose):
            import comfy.sd  # noqa: F401  (the model code: where ComfyUI complains about its optional parts)
    import folder_paths

    return Path(folder_paths.get_output_directory()).resolve()


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's complaints about its optional parts: one line
# ---------------------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """Keeps every record with the exception being handled when it was logged (ComfyUI logs import failures
    from inside its `except` blocks, as formatted text: the exception object is the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[logging.LogRecord, BaseException | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record, sys.exc_info()[1]))


def _imported_file(record: logging.LogRecord, error: BaseException) -> Path:
    """The file whose import failed: for ComfyUI's node loader (nodes.py) the module it was loading, the first
    real file of the traceback after the loader's own; else the file that logged the record."""
    logged = Path(os.path.abspath(record.pathname))
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith("<") and Path(os.path.abspath(name)) != logged:
            return Path(os.path.abspath(name))
        tb = tb.tb_next
    return logged


def _optional_failure(record: logging.LogRecord, error: BaseException | None) -> Path | None:
    """The file of ComfyUI's own tree (not a custom node: this pack's failures are never summed up) that could not
    import a package, when the record is about one; else None."""
    if not isinstance(error, ImportError):
        return None
    root = comfyui_dir()
    path = _imported_file(record, error)
    if not path.is_relative_to(root) or "custom_nodes" in path.relative_to(root).parts:
        return None
    return path


Records = Sequence[tuple[logging.LogRecord, BaseException | None]]


def summary_of_optional_failures(records: Records, hint: str = "--verbose shows ComfyUI's messages",
                                 ) -> tuple[str, list[tuple[logging.LogRecord, BaseException | None]]]:
    """One line about ComfyUI's optional parts that could not import a package ("" when none), and the records
    about anything else, in their order, to pass on as they are."""
    modules: dict[str, None] = {}
    reasons: dict[str, None] = {}
    packages: dict[str, None] = {}
    kinds = []
    for record, error in records:
        path = _optional_failure(record, error)
        if path is not None:
            kinds.append("optional")
            reasons[str(error)] = None
            packages[getattr(error, "name", None) or str(error)] = None
            if record.funcName == "load_custom_node":
                modules[path.stem] = None
        elif record.funcName == "init_extra_nodes" and record.levelno == logging.WARNING:
            kinds.append("list")  # ComfyUI's own list of the built-in node modules that failed
        else:
            kinds.append("other")
    # ComfyUI's list stays when a module in it failed for another reason (that failure is passed on too).
    other_failure = any(kind == "other" and record.funcName == "load_custom_node"
                        for kind, (record, _) in zip(kinds, records, strict=True))
    passed = {"other", "list"} if other_failure or not modules else {"other"}
    rest = [item for kind, item in zip(kinds, records, strict=True) if kind in passed]
    if not reasons:
        return "", rest
    if modules:
        line = (f"ComfyUI: {len(modules)} optional node modules could not be imported ({', '.join(modules)}: "
                f"{'; '.join(reasons)}); harmless for this pack; {hint}")
    else:
        line = (f"ComfyUI: optional packages missing ({', '.join(packages)}): some of its models that this pack "
                f"does not use will not load; harmless for this pack; {hint}")
    return line, rest


@contextlib.contextmanager
def optional_parts_summed_up(verbose: bool = False) -> Iterator[None]:
    """ComfyUI's log records in the block: those about optional parts it could not import become one line on
    stderr, every other record is passed on as it is. With `verbose`, everything is passed on as it is."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    collect = _Collect()
    saved = root.handlers[:]
    root.handlers = [collect]
    try:
        yield
    finally:
        root.handlers = saved
        line, others = summary_of_optional_failures(collect.records)
        for record, _ in others:
            logger = root if record.name == "root" else logging.getLogger(record.name)
            logger.handle(record)
        if line:
            print(line, file=sys.stderr, flush=True)


def progress_printer(prompt: Mapping[str, dict], *, every_s: float = 0.5,
                     prefix: str = "") -> Callable[[str, Any], None]:
    """An `on_event` for run_prompt: a line with the running node's progress ("<class>: 3/20") at most every
    `every_s` seconds."""
    last = [time.monotonic()]

    def on_event(event: str, data: Any) -> None:
        if event == "progress" and time.monotonic() - last[0] > every_s:
            last[0] = time.monotonic()
            kind = prompt.get(str(data.get("node")), {}).get("class_type", "step")
            print(f"{prefix}  {kind}: {data['value']}/{data['max']}", flush=True)

    return on_event


class _ServerStub:
    """What the executor needs from PromptServer: a place to send events (kept for inspection)."""

    def __init__(self, on_event=None) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.events: list[tuple[str, Any]] = []
        self.on_event = on_event

    def send_sync(self, event, data, sid=None) -> None:  # noqa: ARG002 (ComfyUI's callback signature)
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
    exception: BaseException | None = None  # what the failing node raised (the object; `error` has its text)

    def raised(self, kind: type[BaseException]) -> BaseException | None:
        """The failing node's exception, or the first of its causes, that is a `kind`; None if none is."""
        return raised(self.exception, kind)


def raised(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error` or the first of its causes (`raise ... from`) that is a `kind`, matched by class name: ComfyUI runs
    the pack's nodes from its own copy of the pack (custom_nodes/), whose classes are not the ones this program
    imported, so the class name is the data to match."""
    while error is not None:
        if any(base.__name__ == kind.__name__ for base in type(error).__mro__):
            return error
        error = error.__cause__
    return None


class _HandledByCaller(logging.Filter):
    """Drops ComfyUI's error log (a message and a traceback) for a node failure that the caller handles itself."""

    def __init__(self, kinds: Sequence[type[BaseException]]) -> None:
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: ARG002 (logging.Filter's signature)
        error = sys.exc_info()[1]  # ComfyUI logs the failure from inside its `except` block
        return not any(raised(error, kind) for kind in self.kinds)


def format_error(result: RunResult) -> str:
    lines = []
    if result.error:
        err = result.error
        node = f"{err.get('node_type', '')} (node {err.get('node_id', '?')}): " if err.get("node_type") else ""
        lines.append(node + str(err.get("exception_message") or err.get("message") or err))
        if err.get("details"):
            lines.append(str(err["details"]))
    lines += [f"{info.get('class_type', '?')} (node {node_id}): {e.get('message')}: {e.get('details')}"
              for node_id, info in result.node_errors.items() for e in info.get("errors", [])]
    return "\n".join(lines) or "unknown ComfyUI error"


def run_prompt(prompt: dict, on_event=None, extra_data: dict | None = None,
               handled: Sequence[type[BaseException]] = ()) -> RunResult:
    """Validates and executes an API-format graph with a fresh executor (no cache between runs).

    A node failure comes back in the result: its text in `error` (what ComfyUI shows), the exception object in
    `exception`. ComfyUI's error log is left out for the exception kinds in `handled` (the caller deals with
    those itself, e.g. the dataset builder with a chunk that got no usable LLM answer)."""
    import comfy.utils
    import execution

    load_nodes()
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        return RunResult(ok=False, error=valid[1], node_errors=valid[3])
    server = _ServerStub(on_event)

    def progress_hook(value, total, preview=None, prompt_id=None, node_id=None):  # noqa: ARG001 (ComfyUI's callback signature)
        if node_id is None:  # as ComfyUI's server does: the node being executed
            from comfy_execution.utils import get_executing_context

            context = get_executing_context()
            node_id = context.node_id if context is not None else None
        server.send_sync("progress", {"value": value, "max": total, "node": node_id})

    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(progress_hook)
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0})
    failures: list[BaseException] = []
    report_failure = executor.handle_execution_error

    def keep_failure(*args, **kwargs):  # ComfyUI hands the exception object to this method, last
        failures.append(kwargs.get("ex", args[-1] if args else None))
        return report_failure(*args, **kwargs)

    executor.handle_execution_error = keep_failure
    quiet = _HandledByCaller(handled)
    logging.getLogger().addFilter(quiet)
    try:
        executor.execute(prompt, prompt_id, extra_data or {}, valid[2])
    finally:
        logging.getLogger().removeFilter(quiet)
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    error = next((data for event, data in executor.status_messages
                  if event in ("execution_error", "execution_interrupted")), None)
    return RunResult(ok=executor.success and error is None, outputs=executor.history_result.get("outputs", {}),
                     error=error, events=server.events, exception=failures[-1] if failures else None)
