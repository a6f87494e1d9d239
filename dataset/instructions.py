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

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from .instruction_cache import CachedRow, InstructionCache, cache_key
from .instruction_format import (
    CHAT_EXAMPLES,
    MAX_PART_CHARS,
    MODES,
    SYSTEM_PROMPT,
    EditInstruction,
    MalformedOutputError,
    Mode,
    Sampling,
    as_captions,
    build_request,
    check_parts,
    is_identical_edit,
    parse_completion,
)
from .llm_client import (
    INVALID,
    RATE_LIMITED,
    REFUSED,
    UNAVAILABLE,
    Attempted,
    Endpoint,
    RetryPolicy,
    holds_secret,
    open_client,
    public_base_url,
    request_with_retries,
)

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
