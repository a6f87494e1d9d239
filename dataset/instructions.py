"""The paper's instruction generation: captions in, (caption, instruction, edited caption) rows out.

InstructPix2Pix (Brooks et al., 2022, section 3.1.1) fine-tuned GPT-3 on human-written triples in this
format (the reference code, timothybrooks/instruct-pix2pix, generate_txt_dataset.py):

    prompt     = caption + "\\n##\\n"
    completion = instruction + "\\n%%\\n" + edited caption      (stop sequence "\\nEND")
    temperature 0.7, frequency penalty 0.1, at most 256 tokens

`mode="completion"` sends exactly that to a completions endpoint (a model fine-tuned the same way, or any
base model with `completion_few_shot=True`). `mode="chat"` gives a chat model the same contract through a
system prompt and a few original examples; both answers go through one parser.

An answer that gives no row (not JSON, empty, malformed, cut at max_tokens, quoting the API key, or an edited
caption equal to the caption, ignoring case, whitespace and ".!?" at the ends) is asked again with a new sample,
up to ANSWER_ATTEMPTS asks in all, as the reference re-asks up to 4 times (generate_txt_dataset.py: 1 + 3
retries). Transport failures are retried by llm_client first. Requests run concurrently, and each usable answer
is cached on disk as its parsed row the moment it arrives (see instruction_cache); an answer that gave no row is
never cached, so the next run asks again. A failed or malformed request never raises: it is counted in the
stats, per caption and by reason. No ComfyUI import here; the node is a thin adapter.
"""

from __future__ import annotations

import csv
import json
import os
import string
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai

from .instruction_cache import CachedRow, InstructionCache, cache_key
from .llm_client import (
    INVALID,
    RATE_LIMITED,
    REFUSED,
    UNAVAILABLE,
    Attempted,
    Endpoint,
    MissingAPIKeyError,
    RetryPolicy,
    holds_secret,
    open_client,
    public_base_url,
    request_with_retries,
)

__all__ = [
    "CHAT_EXAMPLES",
    "SYSTEM_PROMPT",
    "EditInstruction",
    "Endpoint",
    "InstructionResult",
    "InstructionStats",
    "MalformedOutputError",
    "MissingAPIKeyError",
    "NoUsableInstructionsError",
    "RetryPolicy",
    "Sampling",
    "as_captions",
    "build_request",
    "chat_messages",
    "completion_prompt",
    "format_completion",
    "generate_instructions",
    "is_identical_edit",
    "judge_answer",
    "judge_row",
    "parse_completion",
    "read_captions",
]

Mode = Literal["completion", "chat"]
MODES: tuple[Mode, ...] = ("completion", "chat")

PROMPT_SEPARATOR = "\n##\n"
OUTPUT_SEPARATOR = "\n%%\n"
STOP_SEQUENCE = "\nEND"
MAX_PART_CHARS = 400  # longer parts are a model rambling, not a caption

CAPTION_SUFFIXES = (".txt", ".jsonl", ".csv")
_IDENTITY_STRIP = string.whitespace + ".!?"
_MAX_REASONS = 20
# Asks per caption before its answer counts as unusable: the reference's 1 + 3 retries.
ANSWER_ATTEMPTS = 4
_MAX_LISTED = 1000  # skipped captions listed by name per run; the counts by reason are always complete
_EXCERPT = 80  # characters of a caption quoted in a skip list

# Why a caption gave no row. The labels are shown to users and are stable keys of InstructionStats.skipped.
NOT_JSON = "answer not JSON"
EMPTY = "empty answer"
TRUNCATED = "answer cut at max_tokens"
QUOTED_KEY = "answer quoted the API key"
IDENTICAL = "edited caption identical to the caption"
CANCELLED = "cancelled"
# An identical edit is the model's own choice after every ask, so (as the reference does) it is dropped, not
# counted as unanswered: a rerun would not be expected to fix it. Every other reason leaves the caption unanswered.
FAILURE_LABELS = {RATE_LIMITED: "rate limited", UNAVAILABLE: "endpoint unavailable or timed out",
                  INVALID: "invalid response", REFUSED: "request refused by the endpoint"}
# How often the scheduler wakes to ask `should_cancel` while requests are in flight.
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class EditInstruction:
    input_caption: str
    instruction: str
    output_caption: str


# Original examples in the paper's format; varied edit kinds (colour, style, time, addition, weather, swap).
CHAT_EXAMPLES: tuple[EditInstruction, ...] = (
    EditInstruction(
        "a red bicycle leaning against a brick wall",
        "make the bicycle blue",
        "a blue bicycle leaning against a brick wall",
    ),
    EditInstruction(
        "portrait of an old fisherman, oil painting",
        "turn it into a charcoal sketch",
        "portrait of an old fisherman, charcoal sketch",
    ),
    EditInstruction(
        "a quiet street in Lisbon at noon",
        "make it night with glowing street lamps",
        "a quiet street in Lisbon at night with glowing street lamps",
    ),
    EditInstruction(
        "a golden retriever sitting on the grass",
        "give the dog a party hat",
        "a golden retriever wearing a party hat sitting on the grass",
    ),
    EditInstruction(
        "a mountain lake under a clear summer sky",
        "add a thunderstorm",
        "a mountain lake under a dark sky with a thunderstorm",
    ),
    EditInstruction(
        "a bowl of green apples on a wooden table",
        "replace the apples with oranges",
        "a bowl of oranges on a wooden table",
    ),
)

SYSTEM_PROMPT = (
    "You write instructions for an image editing model. The user gives the caption of an image. "
    "Invent one plausible, visual edit of that image and answer with exactly three lines:\n"
    "line 1: the edit as a short imperative instruction\n"
    "line 2: %%\n"
    "line 3: the caption of the edited image, worded like the input caption and changed only as the "
    "instruction says\n"
    "Write nothing else: no quotes, labels, numbering or explanations."
)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; the defaults are the paper's. None leaves a parameter out of the request."""

    temperature: float | None = 0.7
    frequency_penalty: float | None = 0.1
    max_tokens: int | None = 256
    stop: tuple[str, ...] | None = (STOP_SEQUENCE,)
    seed: int | None = None  # a different seed is a different cache entry: the way to re-roll

    def as_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "frequency_penalty": self.frequency_penalty,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop) if self.stop is not None else None,
            "seed": self.seed,
        }
        return {name: value for name, value in params.items() if value is not None}


@dataclass
class InstructionStats:
    """Per-caption counts (ok + malformed + dropped_identical + duplicates + failed + cancelled == requested)
    and per-request counts (cached, fetched, http_requests).

    `skipped` counts the captions that gave no row by reason (the labels above; malformed answers by what was
    wrong with the last one); `skipped_captions` names them, [caption excerpt, reason] pairs. Plain data, so
    it travels as JSON (the node's ui output) to readers such as the headless builder.
    """

    requested: int = 0
    cached: int = 0  # unique requests answered from the disk cache
    fetched: int = 0  # unique requests answered with a usable row over HTTP in this run
    http_requests: int = 0  # HTTP attempts sent, retries and re-asks included
    ok: int = 0
    malformed: int = 0  # no usable answer after every ask: not JSON, empty, malformed, cut, quoting the key
    dropped_identical: int = 0
    duplicates: int = 0
    failed: int = 0  # transport failures after every retry
    cancelled: int = 0
    reasons: list[str] = field(default_factory=list)  # distinct failure and malformed reasons, first few
    # Captions without a usable answer for a reason a rerun can fix (failed or malformed): not cached, so a rerun
    # asks for exactly these.
    unanswered: int = 0
    failure_kinds: list[str] = field(default_factory=list)  # llm_client.FAILURE_KINDS seen, first seen first
    reasked: int = 0  # extra asks after an unusable answer
    ignored_cache: int = 0  # cache entries that were not a usable row for their caption: asked again
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_captions: list[list[str]] = field(default_factory=list)

    def note_failure(self, kind: str | None) -> None:
        if kind is not None and kind not in self.failure_kinds:
            self.failure_kinds.append(kind)

    def note(self, reason: str) -> None:
        if reason not in self.reasons and len(self.reasons) < _MAX_REASONS:
            self.reasons.append(reason)

    def skip(self, caption: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_captions) < _MAX_LISTED:
            self.skipped_captions.append([excerpt(caption), reason])

    @property
    def retryable(self) -> int:
        """Captions that a rerun asks again (and may turn into rows)."""
        return self.unanswered + self.cancelled

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = (
            f"{self.ok} rows from {self.requested} captions ({self.cached} cached, {self.fetched} fetched); "
            f"malformed {self.malformed}, identical {self.dropped_identical}, duplicates {self.duplicates}, "
            f"failed {self.failed}, cancelled {self.cancelled}"
        )
        if self.skipped:
            text += "; skipped by reason: " + skipped_text(self.skipped)
        return text


def excerpt(caption: str) -> str:
    return caption if len(caption) <= _EXCERPT else f"{caption[:_EXCERPT - 3]}... ({len(caption)} characters)"


def skipped_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class InstructionResult:
    rows: list[EditInstruction]  # in input order
    stats: InstructionStats
    cancelled: bool = False


class NoUsableInstructionsError(ValueError):
    """Not one caption gave a usable row. The message says why and what to do; `stats` holds the counts
    (InstructionStats.as_dict()) as data, for programs such as the headless builder, which takes such a chunk as
    zero rows with these counts. Programs recognise it by its class name: ComfyUI runs the nodes from its own copy
    of the pack (custom_nodes/), whose classes are not the ones the program imported."""

    def __init__(self, message: str, stats: dict[str, Any]) -> None:
        super().__init__(message)
        self.stats = stats


# ---------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ---------------------------------------------------------------------------------------------------------


def format_completion(instruction: str, output_caption: str) -> str:
    return instruction + OUTPUT_SEPARATOR + output_caption


def completion_prompt(caption: str, examples: Sequence[EditInstruction] = ()) -> str:
    """The paper's prompt; examples, if any, go first in the same format so a base model can follow it."""
    shots = "".join(
        e.input_caption + PROMPT_SEPARATOR + format_completion(e.instruction, e.output_caption) + STOP_SEQUENCE + "\n\n"
        for e in examples
    )
    return shots + caption + PROMPT_SEPARATOR


def chat_messages(
    caption: str,
    system_prompt: str = SYSTEM_PROMPT,
    examples: Sequence[EditInstruction] = CHAT_EXAMPLES,
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}]
    for example in examples:
        messages.append({"role": "user", "content": example.input_caption})
        messages.append(
            {"role": "assistant", "content": format_completion(example.instruction, example.output_caption)}
        )
    messages.append({"role": "user", "content": caption})
    return messages


def build_request(
    mode: Mode,
    model: str,
    caption: str,
    sampling: Sampling = Sampling(),
    system_prompt: str = SYSTEM_PROMPT,
    examples: Sequence[EditInstruction] = CHAT_EXAMPLES,
    completion_few_shot: bool = False,
) -> dict[str, Any]:
    """The JSON body for one caption; also the material of its cache key."""
    if mode == "completion":
        shots = examples if completion_few_shot else ()
        return {"model": model, "prompt": completion_prompt(caption, shots), **sampling.as_params()}
    if mode == "chat":
        return {
            "model": model,
            "messages": chat_messages(caption, system_prompt, examples),
            **sampling.as_params(),
        }
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class MalformedOutputError(ValueError):
    """The model's text does not follow `instruction \\n%%\\n edited caption`."""


def parse_completion(text: str, max_part_chars: int = MAX_PART_CHARS) -> tuple[str, str]:
    """(instruction, edited caption) from a model's text, or MalformedOutputError saying why not."""
    cleaned = text.replace("\r\n", "\n")
    # Servers that ignore `stop` (or chat models imitating the format) may still write the end marker.
    cleaned = cleaned.split(STOP_SEQUENCE, 1)[0]
    parts = _split_on_separator(cleaned)
    if len(parts) == 1:
        raise MalformedOutputError("no separator")
    if len(parts) > 2:
        raise MalformedOutputError("multiple separators")
    instruction, edited = (part.strip() for part in parts)
    check_parts(instruction, edited, max_part_chars)
    return instruction, edited


def check_parts(instruction: str, edited: str, max_part_chars: int = MAX_PART_CHARS) -> None:
    """MalformedOutputError unless both parts are one non-empty line of at most `max_part_chars` characters."""
    if not instruction.strip() or not edited.strip():
        raise MalformedOutputError("empty part")
    if "\n" in instruction or "\n" in edited:
        raise MalformedOutputError("multi-line part")
    if max(len(instruction), len(edited)) > max_part_chars:
        # The limit, not the length, in the message: it is also the reason's label, counted across captions.
        raise MalformedOutputError(f"too long (over {max_part_chars} characters)")


def _split_on_separator(text: str) -> list[str]:
    """Split on lines that hold only `%%` (spaces around it tolerated)."""
    lines = text.split("\n")
    parts: list[list[str]] = [[]]
    for line in lines:
        if line.strip() == "%%":
            parts.append([])
        else:
            parts[-1].append(line)
    return ["\n".join(part) for part in parts]


def normalise_caption(caption: str) -> str:
    return caption.strip(_IDENTITY_STRIP).lower()


def is_identical_edit(caption: str, output_caption: str) -> bool:
    return normalise_caption(caption) == normalise_caption(output_caption)


# ---------------------------------------------------------------------------------------------------------
# Captions in, rows out
# ---------------------------------------------------------------------------------------------------------


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions from .txt (one a line), .jsonl (field `caption`, else `input`) or .csv (column `caption`)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _clean(path.read_text(encoding="utf-8-sig").splitlines())
    if suffix == ".jsonl":
        return _clean(_jsonl_captions(path))
    if suffix == ".csv":
        return _clean(_csv_captions(path))
    raise ValueError(f"unsupported caption file {path.name}: use one of {', '.join(CAPTION_SUFFIXES)}")


def _jsonl_captions(path: Path) -> Iterable[str]:
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path.name}:{number}: not JSON ({exc})") from None
        caption = record.get("caption", record.get("input")) if isinstance(record, dict) else None
        if not isinstance(caption, str):
            raise ValueError(f"{path.name}:{number}: no string field 'caption' or 'input'")
        yield caption


def _csv_captions(path: Path) -> Iterable[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        column = next((c for c in ("caption", "input") if c in columns), None)
        if column is None:
            raise ValueError(f"{path.name}: no 'caption' column (columns: {', '.join(columns)})")
        for record in reader:
            yield record[column] or ""


def as_captions(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Captions from a list, a caption file path, or a block of text with one caption per line.

    A one-line string ending in .txt/.jsonl/.csv is a path (and must exist); any other string is text.
    Captions are stripped and blank ones dropped.
    """
    if isinstance(source, os.PathLike):
        return read_captions(source)
    if isinstance(source, str):
        candidate = source.strip()
        if "\n" not in candidate and candidate.lower().endswith(CAPTION_SUFFIXES):
            if not Path(candidate).expanduser().is_file():
                raise FileNotFoundError(f"caption file not found: {candidate}")
            return read_captions(candidate)
        return _clean(source.splitlines())
    return _clean(source)


def _clean(captions: Iterable[str]) -> list[str]:
    out = []
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        text = caption.strip()
        if text:
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    key: str
    caption: str
    body: dict[str, Any]


@dataclass(frozen=True)
class _Outcome:
    """What came of one caption's request: a row, or the reason there is none."""

    row: CachedRow | None = None
    reason: str | None = None  # a label above, "malformed output: ...", or a FAILURE_LABELS value
    failure: str | None = None  # the transport failure's message (redacted), for the reasons list
    failure_kind: str | None = None
    http_requests: int = 0
    asks: int = 0


DEFAULT_SAMPLING = Sampling()
DEFAULT_RETRY = RetryPolicy()


def generate_instructions(
    captions: str | os.PathLike[str] | Sequence[str],
    endpoint: Endpoint,
    *,
    mode: Mode = "chat",
    sampling: Sampling = DEFAULT_SAMPLING,
    retry: RetryPolicy = DEFAULT_RETRY,
    concurrency: int = 4,
    cache_path: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    examples: Sequence[EditInstruction] = CHAT_EXAMPLES,
    completion_few_shot: bool = False,
    max_part_chars: int = MAX_PART_CHARS,
    answer_attempts: int = ANSWER_ATTEMPTS,
) -> InstructionResult:
    """Ask the endpoint for one edit per caption; rows come back in input order.

    `progress(done, total)` counts unique requests, cached ones included. `should_cancel()` is polled on
    the calling thread between requests: once it returns True no new request starts, the ones in flight
    finish (they are paid for) and everything answered so far is returned and cached. If it raises, the
    exception propagates after the requests in flight have finished and been cached.
    Raises MissingAPIKeyError (before any request) when an endpoint that needs a key has none.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if answer_attempts < 1:
        raise ValueError(f"answer_attempts must be at least 1, got {answer_attempts}")
    caption_list = as_captions(captions)
    stats = InstructionStats(requested=len(caption_list))
    cache = InstructionCache(cache_path)
    base_url = public_base_url(endpoint.base_url)

    keys: list[str] = []
    jobs: dict[str, _Job] = {}
    for caption in caption_list:
        body = build_request(mode, endpoint.model, caption, sampling, system_prompt, examples, completion_few_shot)
        key = cache_key(mode, base_url, body)
        keys.append(key)
        jobs.setdefault(key, _Job(key, caption, body))

    outcomes = _from_cache(jobs, cache, stats, max_part_chars)
    to_fetch = [job for key, job in jobs.items() if key not in outcomes]

    cancelled = False
    if to_fetch:
        client, secret = open_client(endpoint)
        stop = threading.Event()
        fetch = _Fetcher(client, secret, mode, endpoint.model, retry, cache, stop, max_part_chars, answer_attempts)
        try:
            fetched, cancelled = _run_pool(
                fetch, to_fetch, concurrency, stop, progress, should_cancel, stats.cached, len(jobs)
            )
        finally:
            client.close()
        outcomes.update(fetched)
        stats.fetched = sum(1 for o in fetched.values() if o.row is not None)
        stats.http_requests = sum(o.http_requests for o in fetched.values())
        stats.reasked = sum(max(o.asks - 1, 0) for o in fetched.values())
    elif progress is not None:
        progress(len(jobs), len(jobs))

    rows = _assemble(caption_list, keys, outcomes, stats)
    return InstructionResult(rows=rows, stats=stats, cancelled=cancelled)


def _from_cache(jobs: dict[str, _Job], cache: InstructionCache, stats: InstructionStats,
                max_part_chars: int) -> dict[str, _Outcome]:
    """Cached rows that are still a usable answer for their caption; others (a hand edit, an entry written
    under other rules) are asked again."""
    outcomes = {}
    for key, job in jobs.items():
        row = cache.get(key)
        if row is None:
            continue
        if judge_row(job.caption, row.instruction, row.output_caption, max_part_chars) is not None:
            stats.ignored_cache += 1
            continue
        outcomes[key] = _Outcome(row=row)
    stats.cached = len(outcomes)
    return outcomes


def judge_row(caption: str, instruction: str, edited: str, max_part_chars: int = MAX_PART_CHARS) -> str | None:
    """None when (instruction, edited) is a usable row for `caption`, else the reason it is not."""
    try:
        check_parts(instruction, edited, max_part_chars)
    except MalformedOutputError as exc:
        return f"malformed output: {exc}"
    if is_identical_edit(caption, edited):
        return IDENTICAL
    return None


def judge_answer(caption: str, answer: Attempted, secret: str | None,
                 max_part_chars: int = MAX_PART_CHARS) -> tuple[CachedRow | None, str | None]:
    """(the row, None) for a usable answer, else (None, the reason it gave no row)."""
    if answer.text is None:
        return None, NOT_JSON
    if not answer.text.strip():
        return None, EMPTY
    if holds_secret(answer.text, secret):
        # An endpoint that writes the key into its answer would put it into rows, datasets and the cache.
        return None, QUOTED_KEY
    if answer.finish_reason == "length":
        # The model hit max_tokens before the end marker: the edited caption may be cut mid-phrase.
        return None, TRUNCATED
    try:
        instruction, edited = parse_completion(answer.text, max_part_chars)
    except MalformedOutputError as exc:
        return None, f"malformed output: {exc}"
    reason = judge_row(caption, instruction, edited, max_part_chars)
    return (CachedRow(instruction, edited), None) if reason is None else (None, reason)


def new_sample(body: dict[str, Any], ask: int) -> dict[str, Any]:
    """The body for ask number `ask` (0-based). With a seed, the same seed would give the same answer again: each
    re-ask gets the next seed. Without one, the server samples afresh at the request's temperature."""
    if ask == 0 or "seed" not in body:
        return body
    return {**body, "seed": body["seed"] + ask}


@dataclass(frozen=True)
class _Fetcher:
    """One job on a worker thread: asks (each with transport retries) until an answer gives a row, then the cache."""

    client: openai.OpenAI
    secret: str | None
    mode: Mode
    model: str
    retry: RetryPolicy
    cache: InstructionCache
    stop: threading.Event  # set: abandon back-offs and re-asks
    max_part_chars: int = MAX_PART_CHARS
    answer_attempts: int = ANSWER_ATTEMPTS

    def __call__(self, job: _Job) -> _Outcome:
        requests, asks, reason = 0, 0, None
        for ask in range(self.answer_attempts):
            if ask and self.stop.is_set():
                break  # cancelled between asks: the caption stays unanswered, asked again on the next run
            asks += 1
            result = request_with_retries(self.client, self.mode == "chat", new_sample(job.body, ask), self.retry,
                                          self.stop, self.secret)
            requests += result.attempts
            if result.cancelled:
                return _Outcome(reason=CANCELLED, http_requests=requests, asks=asks)
            if result.failure is not None:
                # llm_client already retried the transport; asking again would only repeat that.
                return _Outcome(reason=FAILURE_LABELS.get(result.failure_kind or REFUSED, "request failed"),
                                failure=result.failure, failure_kind=result.failure_kind, http_requests=requests,
                                asks=asks)
            row, reason = judge_answer(job.caption, result, self.secret, self.max_part_chars)
            if row is not None:
                # Cached from the worker, the moment it is paid for, so a crash of the caller loses nothing.
                self.cache.put(job.key, row, mode=self.mode, model=self.model, caption=job.caption)
                return _Outcome(row=row, http_requests=requests, asks=asks)
        return _Outcome(reason=reason or CANCELLED, http_requests=requests, asks=asks)


def _collect(finished: set[Future[_Outcome]], running: dict[Future[_Outcome], _Job], answers: dict[str, _Outcome],
             progress: Callable[[int, int], None] | None, done: int, total: int) -> int:
    """Moves finished jobs' outcomes into `answers` and reports progress; returns the new done count."""
    for future in finished:
        job = running.pop(future)
        answers[job.key] = future.result()
        done += 1
        if progress is not None:
            progress(done, total)
    return done


def _run_pool(
    fetch: Callable[[_Job], _Outcome],
    jobs: Sequence[_Job],
    concurrency: int,
    stop: threading.Event,
    progress: Callable[[int, int], None] | None,
    should_cancel: Callable[[], bool] | None,
    done: int,
    total: int,
) -> tuple[dict[str, _Outcome], bool]:
    """Run `jobs`, at most `concurrency` at a time. Callbacks run on the calling thread only, since
    ComfyUI's progress bar and interrupt check expect the executing thread."""
    cancel_requested = False
    answers: dict[str, _Outcome] = {}
    pending = deque(jobs)

    def wants_cancel() -> bool:
        return should_cancel is not None and bool(should_cancel())

    if progress is not None:
        progress(done, total)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ip2p-llm") as pool:
        running: dict[Future[_Outcome], _Job] = {}
        try:
            while pending or running:
                while pending and len(running) < concurrency and not cancel_requested:
                    if wants_cancel():
                        cancel_requested = True
                        break
                    job = pending.popleft()
                    running[pool.submit(fetch, job)] = job
                if not running:
                    break
                finished, _ = wait(running, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                done = _collect(finished, running, answers, progress, done, total)
                if not cancel_requested and wants_cancel():
                    cancel_requested = True
                if cancel_requested:
                    stop.set()
        finally:
            # On an exception the pool still waits for the workers; they must not sit out long back-offs.
            stop.set()
    return answers, cancel_requested


def _assemble(
    captions: Sequence[str],
    keys: Sequence[str],
    outcomes: dict[str, _Outcome],
    stats: InstructionStats,
) -> list[EditInstruction]:
    rows: list[EditInstruction] = []
    seen: set[EditInstruction] = set()
    for caption, key in zip(captions, keys, strict=True):
        outcome = outcomes.get(key, _Outcome(reason=CANCELLED))
        if outcome.row is None:
            _count_skip(caption, outcome, stats)
            continue
        row = EditInstruction(caption, outcome.row.instruction, outcome.row.output_caption)
        if row in seen:
            stats.duplicates += 1
            continue
        seen.add(row)
        rows.append(row)
    stats.ok = len(rows)
    return rows


def _count_skip(caption: str, outcome: _Outcome, stats: InstructionStats) -> None:
    reason = outcome.reason or CANCELLED
    stats.skip(caption, reason)
    if reason == CANCELLED:
        stats.cancelled += 1
    elif reason == IDENTICAL:
        stats.dropped_identical += 1
    elif outcome.failure is not None:
        stats.failed += 1
        stats.unanswered += 1
        stats.note(outcome.failure)
        stats.note_failure(outcome.failure_kind)
    else:
        stats.malformed += 1
        stats.unanswered += 1
        stats.note(_REASON_NOTES.get(reason, reason))
        if reason == NOT_JSON:
            stats.note_failure(INVALID)


_REASON_NOTES = {
    NOT_JSON: "the server's answer was not JSON (is base_url an OpenAI-compatible API?)",
    TRUNCATED: "malformed output: truncated at max_tokens",
}
