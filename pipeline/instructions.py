"""The instruction node's ComfyUI side: caption files in the input folder, API keys (environment variables
named like keys, or key files in a ComfyUI system user folder), the answer cache in the output folder, the
progress bar and cancel around dataset/instructions.py.

Where things live (all through folder_paths, whatever a workflow says):
- caption files: ComfyUI's input folder;
- API key files: `user/__ip2p_keys/`, a ComfyUI *system user* folder that no HTTP endpoint serves (the input
  and output folders are readable through /view, and `user/<name>/` through /userdata);
- the LLM answer cache: `output/ip2p_cache/instructions.jsonl` (the temp folder is wiped at start-up, so a
  cache there would not survive the crash it is meant for).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..dataset.instruction_format import CAPTION_SUFFIXES, Sampling, as_captions, read_captions
from ..dataset.instructions import InstructionStats, NoUsableInstructionsError, generate_instructions
from ..dataset.key_hosts import check_key_destination
from ..dataset.llm_client import (
    RATE_LIMITED,
    UNAVAILABLE,
    Endpoint,
    MissingAPIKeyError,
    RetryPolicy,
    resolve_api_key,
)
from ..dataset.paths import resolve_inside
from ..dataset.records import EditRow
from ..dataset.writer import write_failure
from .settings import check_finite

NO_FILE = "none"
CACHE_DIR = "ip2p_cache"
KEYS_USER = "ip2p_keys"

# Only variables named like API keys may be read: a shared workflow could otherwise name any secret in the
# environment (cloud credentials, tokens) and send it as the bearer token to a base_url of its choosing.
_KEY_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*API_KEY$", re.IGNORECASE)
# An API key is sent as one HTTP header token: visible ASCII, no spaces, no line breaks.
_KEY_TEXT = re.compile(r"[\x21-\x7e]+")
_SCAN_LIMIT = 2000  # entries looked at per folder level when listing datasets or caption files
# Seconds one LLM request may take, and the retry policy of the node (module-level so tests can shorten them).
LLM_TIMEOUT_S = 60.0
LLM_RETRY = RetryPolicy()




def caption_file_choices() -> list[str]:
    """NO_FILE, then every .txt/.jsonl/.csv under the input folder (relative, with / separators)."""
    root = Path(folder_paths.get_input_directory())
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            (Path(folder) / name).relative_to(root).as_posix()
            for name in sorted(files)
            if name.lower().endswith(CAPTION_SUFFIXES) and not name.startswith(".")
        ]
        if len(found) >= _SCAN_LIMIT:
            break
    return [NO_FILE, *found]


def collect_captions(text: str, captions_file: str) -> list[str]:
    """Captions from the chosen input-folder file, else from the text (one per line).

    The text is split here, never handed to `as_captions` as one string, which would read a one-line text
    ending in .txt as a path anywhere on disk.
    """
    if captions_file and captions_file != NO_FILE:
        root = folder_paths.get_input_directory()
        path = _inside(root, captions_file, "captions_file")
        if not path.is_file():
            raise FileNotFoundError(f"captions_file {captions_file!r} is not a file in the input folder {root}")
        captions = read_captions(path)
        source = f"captions_file {captions_file!r}"
    else:
        captions = as_captions(text.splitlines())
        source = "captions"
    if not captions:
        raise ValueError(f"{source} holds no captions: write one caption per line, or choose a captions_file")
    return captions


def _inside(root: str | os.PathLike, name: str, what: str) -> Path:
    try:
        return resolve_inside(root, name)
    except ValueError as error:
        raise ValueError(f"{what} {name!r} must name a file inside {root}: {error}") from None


def key_env_name(name: str) -> str | None:
    name = name.strip()
    if not name:
        return None
    if not _KEY_ENV_NAME.match(name):
        raise ValueError(
            f"api_key_env must be the NAME of an environment variable ending in API_KEY (e.g. OPENAI_API_KEY), "
            f"got {name!r}; other variables are not read, so a shared workflow cannot send them anywhere"
        )
    return name


def keys_directory() -> Path:
    return Path(folder_paths.get_system_user_directory(KEYS_USER))


def key_file_path(name: str) -> Path | None:
    """The key file `name` in user/__ip2p_keys/, or None for no file."""
    name = name.strip()
    if not name:
        return None
    root = keys_directory()
    path = _inside(root, name, "api_key_file")
    if not path.is_file():
        raise FileNotFoundError(
            f"api_key_file {name!r} not found: put the key (one line) into {root / name} "
            "(that folder is never served over HTTP, unlike input/ and output/)"
        )
    return path


def endpoint_from(base_url: str, model: str, api_key_env: str, api_key_file: str) -> Endpoint:
    if not base_url.strip().lower().startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    try:
        host = urllib.parse.urlsplit(base_url.strip()).hostname
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        host = None
        reason = str(error)
    else:
        reason = "no host name"
    if not host:
        raise ValueError(f"base_url {base_url!r} is not a valid URL ({reason}): write it like "
                         "http://127.0.0.1:8000/v1")
    if not model.strip():
        raise ValueError("model is empty: give the model name the endpoint serves")
    endpoint = Endpoint(model=model.strip(), base_url=base_url.strip(), api_key_env=key_env_name(api_key_env),
                        api_key_file=key_file_path(api_key_file), timeout=LLM_TIMEOUT_S)
    check_api_key(endpoint)
    return endpoint


def check_api_key(endpoint: Endpoint) -> None:
    """Refuses a key bound for a host the user has not allowed (dataset/key_hosts.py), and a key that is not
    one header token, without ever quoting it.

    A key file with a second line (a comment, another key) or a key with a space inside fails in the HTTP
    client with "Illegal header value b'Bearer <key>...'": the whole key would land in the node's error, the
    server log and /history, and redacting the exact key does not catch the escaped form.
    """
    try:
        key = resolve_api_key(endpoint.api_key_env, endpoint.api_key_file)
    except MissingAPIKeyError as error:
        raise ValueError(str(error)) from None
    if key is None:
        return
    source = (f"api_key_file {Path(endpoint.api_key_file).name!r}" if endpoint.api_key_file
              else f"the environment variable {endpoint.api_key_env}")
    check_key_destination(endpoint.base_url, keys_directory(), source)
    if not _KEY_TEXT.fullmatch(key):
        raise ValueError(f"the API key in {source} is not one line of visible ASCII characters (a second line, "
                         "a comment or a space in it?): put only the key, on one line")


def instruction_cache_path() -> Path:
    # Checked like a dataset name: a symlinked ip2p_cache leading out of the output folder is refused.
    return resolve_inside(folder_paths.get_output_directory(), f"{CACHE_DIR}/instructions.jsonl",
                          "the LLM answer cache", f"real files in output/{CACHE_DIR} (or cache off)")


def sampling_from(temperature: float, frequency_penalty: float, max_tokens: int, seed: int) -> Sampling:
    check_finite(temperature=temperature, frequency_penalty=frequency_penalty)
    # Seed 0 sends none: servers that do not know the parameter are not bothered with it.
    return Sampling(temperature=temperature, frequency_penalty=frequency_penalty, max_tokens=max_tokens,
                    seed=seed or None)


# Loggers of the HTTP stack whose DEBUG records print whole response headers and bodies (ComfyUI's
# --verbose DEBUG turns them on): an endpoint that echoes the API key would put it into the log file.
_HTTP_LOGGERS = ("httpx", "httpcore", "httpcore2", "openai")


@contextlib.contextmanager
def http_debug_logs_off():
    """Raises the HTTP stack's loggers to INFO while requests carry the key; restores them after."""
    loggers = [logging.getLogger(name) for name in _HTTP_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Progress:
    """generate_instructions' progress(done, total) onto a ComfyUI progress bar made on the first call."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def run_instructions(
    captions: list[str], endpoint: Endpoint, mode: str, sampling: Sampling, concurrency: int, use_cache: bool,
) -> tuple[list[EditRow], str, dict]:
    """Rows without images, a summary and the counts as data. A cancel keeps every answer received so far in the
    cache. With no usable row it raises NoUsableInstructionsError: the canvas shows why and what to do, and a
    program running the workflow (the headless builder) reads the counts it carries."""
    cache_path = instruction_cache_path() if use_cache else None
    try:
        with http_debug_logs_off():
            result = generate_instructions(
                captions, endpoint, mode=mode, sampling=sampling, retry=LLM_RETRY, concurrency=concurrency,
                cache_path=cache_path, progress=_Progress(), should_cancel=mm.processing_interrupted)
    except MissingAPIKeyError as error:
        raise ValueError(f"{error}; or name a key file in {keys_directory()} with api_key_file") from None
    except OSError as error:
        # Appending to the answer cache failed (full disk): no new request starts, and every answer cached
        # before is kept, so the rerun after freeing space asks only for what is missing.
        raise ValueError(f"could not write the instruction cache {cache_path}: {write_failure(error)}. Free "
                         "space and run again (answers cached before are kept), or turn cache off") from error
    if result.cancelled:
        mm.throw_exception_if_processing_interrupted()
    if not result.rows:
        raise NoUsableInstructionsError(f"no usable instructions: {_stats_text(result.stats)}. What to do: "
                                        f"{_advice(result.stats)}", result.stats.as_dict())
    rows = [EditRow(r.input_caption, r.instruction, r.output_caption, None, None) for r in result.rows]
    where = f"cached in {cache_path}" if cache_path else "cache off"
    return rows, f"{_stats_text(result.stats)} ({where}){_skip_list(result.stats.skipped_captions)}", \
        result.stats.as_dict()


def _stats_text(stats: InstructionStats) -> str:
    """The counts, why requests failed, and what a rerun will do about it."""
    text = stats.summary()
    if stats.reasons:
        text += "; reasons: " + "; ".join(stats.reasons)
    if any("truncated at max_tokens" in reason for reason in stats.reasons):
        text += " (raise max_tokens to get whole answers)"
    if stats.unanswered:
        text += (f". {stats.unanswered} captions got no usable answer; they are not cached and are asked again on "
                 "the next run (answers already received are kept)")
    return text


def _skip_list(skipped: list[list[str]]) -> str:
    """One line per caption that gave no row, with its reason (the counts by reason are in the summary)."""
    return "".join(f"\n  skipped: {caption!r}: {reason}" for caption, reason in skipped)


def _advice(stats: InstructionStats) -> str:
    """What to do when no caption gave a row, from the kinds of failures seen."""
    kinds = set(stats.failure_kinds)
    if RATE_LIMITED in kinds:
        return ("the endpoint is rate limiting: lower concurrency, wait and run again (answers received so far "
                "are cached)")
    if UNAVAILABLE in kinds:
        return ("the endpoint is down, overloaded or too slow: check that it is running, wait and run again "
                "(answers received so far are cached)")
    return ("check base_url, model and mode (chat for chat models, completion for models fine-tuned on the "
            "paper's format)")
