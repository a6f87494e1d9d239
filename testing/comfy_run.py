"""A graph run through ComfyUI's executor that must succeed (cli.runtime.run_prompt gives the result as data)."""

from __future__ import annotations

from ..cli.runtime import RunResult, format_error


def checked(result: RunResult) -> RunResult:
    """The result, or a RuntimeError carrying ComfyUI's error text when the graph failed."""
    if not result.ok:
        raise RuntimeError(format_error(result))
    return result
