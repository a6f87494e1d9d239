"""User-facing errors: the node's name first, then what went wrong and how to fix it."""

from __future__ import annotations

import functools


class IP2PNodeError(ValueError):
    pass


def named_errors(node_id: str):
    """Re-raises input and model errors from the work functions with the node's name in front."""

    def wrap(func):
        @functools.wraps(func)
        def run(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except (ValueError, FileNotFoundError) as error:
                if isinstance(error, IP2PNodeError):
                    raise
                raise IP2PNodeError(f"{node_id}: {error}") from error

        return run

    return wrap
