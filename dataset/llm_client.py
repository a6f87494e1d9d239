"""Talking to an OpenAI-compatible endpoint: the API key, the client, and our own retries.

Any server that speaks the OpenAI API works (OpenAI, vLLM, llama.cpp's server, Ollama). The key never
travels through a function argument, because node inputs end up saved inside workflow files: it comes from
an environment variable or from a key file named by path. Local servers need no key; the client is then
given a placeholder, since the `openai` client refuses to start without one.

The `openai` client's own retries are switched off (max_retries=0) so that the retry policy here is the only
one: bounded attempts, exponential back-off with jitter, Retry-After honoured, and a cancel event that cuts
a back-off short.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from .key_hosts import connect_url

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# What a keyless local server is sent; vLLM and Ollama ignore it unless they were started with a key.
PLACEHOLDER_KEY = "no-key-needed"
REDACTED = "[redacted]"

# Hosts that always need a real key; failing early beats a 401 for every caption.
_KEYED_HOST_SUFFIXES = ("openai.com",)


class MissingAPIKeyError(RuntimeError):
    pass


class InvalidResponseError(RuntimeError):
    """The server answered 200 with something that is not a completion."""


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests. Holds the *name* of the key's variable or file, never the key."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str | None = DEFAULT_KEY_ENV
    api_key_file: str | os.PathLike[str] | None = None
    timeout: float = 60.0  # seconds per attempt


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 1.0  # the first back-off, doubled on every further attempt
    backoff_max: float = 30.0
    retry_after_max: float = 120.0  # a longer Retry-After is clipped to this

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    def backoff(self, attempt: int) -> float:
        """Back-off after failed attempt number `attempt` (1-based), with jitter so workers spread out."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


# What went wrong with a request, for the advice a user gets (see FAILURE_KINDS).
RATE_LIMITED = "rate_limited"  # 429: slow down
UNAVAILABLE = "unavailable"  # 5xx, timeouts, dropped connections: the endpoint is down or overloaded
INVALID = "invalid"  # a 200 that is not a completion: wrong base_url, or a proxy in the way
REFUSED = "refused"  # any other 4xx: wrong model name, key or request
FAILURE_KINDS = (RATE_LIMITED, UNAVAILABLE, INVALID, REFUSED)


@dataclass(frozen=True)
class Failure:
    message: str
    retryable: bool
    retry_after: float | None = None
    kind: str = REFUSED


# ---------------------------------------------------------------------------------------------------------
# Keys and the client
# ---------------------------------------------------------------------------------------------------------


def resolve_api_key(
    env_var: str | None = DEFAULT_KEY_ENV, key_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The key from `key_file` if given (it is the more explicit choice), else from `env_var`, else None."""
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise MissingAPIKeyError(f"API key file not found: {path}")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise MissingAPIKeyError(f"API key file is empty: {path}")
        return key
    if env_var:
        return os.environ.get(env_var, "").strip() or None
    return None


def needs_real_key(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return any(host == s or host.endswith("." + s) for s in _KEYED_HOST_SUFFIXES)


def public_base_url(base_url: str) -> str:
    """The URL without user-info or query, which may carry credentials, and without a trailing slash."""
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def open_client(endpoint: Endpoint) -> tuple[openai.OpenAI, str | None]:
    """A client for `endpoint` and the secret to redact from messages (None when keyless)."""
    key = resolve_api_key(endpoint.api_key_env, endpoint.api_key_file)
    if key is None and needs_real_key(endpoint.base_url):
        source = f"the environment variable {endpoint.api_key_env}" if endpoint.api_key_env else "a key file"
        raise MissingAPIKeyError(f"{public_base_url(endpoint.base_url)} needs an API key: set {source}")
    client = openai.OpenAI(
        api_key=key or PLACEHOLDER_KEY,
        # `localhost` becomes 127.0.0.1 here, so the key never waits on a name lookup (key_hosts).
        base_url=connect_url(endpoint.base_url),
        timeout=endpoint.timeout,
        max_retries=0,
    )
    return client, key


# Any run of this many characters of the key counts as the key: a server that echoes part of it (or a
# message cut in the middle of it) must not put the rest into logs.
_KEY_FRAGMENT = 8
# Escapes that repr() and JSON write for characters a hostile echo puts between the key's characters.
_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[nrtfvb0\\'\"])")


def _letters(text: str) -> tuple[str, list[int]]:
    """The ASCII letters and digits of `text`, lower-cased, and where each one stands in `text`.

    Spaces, line breaks, punctuation, escapes and other characters are left out, so that "s k - A B c",
    "sk-ab\\ncd" and "SK-ABCD" all read as "skabcd": an endpoint that echoes the key spaced out, split over
    lines or in another case is still caught.
    """
    letters, where = [], []
    position = 0
    while position < len(text):
        escape = _ESCAPE.match(text, position) if text[position] == "\\" else None
        if escape is not None:
            position = escape.end()
            continue
        char = text[position]
        if char.isascii() and char.isalnum():
            letters.append(char.lower())
            where.append(position)
        position += 1
    return "".join(letters), where


def _encoded_forms(secret: str) -> list[str]:
    """The key as base64 (standard and URL-safe) wherever it starts in the encoded text: the characters that
    depend on the key's bytes alone (the first and last group depend on its neighbours too, so they are cut)."""
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret.encode("utf-8")).decode("ascii")
        core = encoded[4:-4]
        if len(core) >= _KEY_FRAGMENT:
            forms += [core, core.replace("+", "-").replace("/", "_")]
    return forms


def _covered(message: str, secret: str) -> list[bool]:
    """Which characters of `message` belong to a form of the key (fragments of _KEY_FRAGMENT letters or more)."""
    covered = [False] * len(message)
    for form in _encoded_forms(secret):
        found = message.find(form)
        while found != -1:
            covered[found:found + len(form)] = [True] * len(form)
            found = message.find(form, found + 1)
    letters, where = _letters(message)
    key_letters, _ = _letters(secret)
    for start in range(len(key_letters) - _KEY_FRAGMENT + 1):
        fragment = key_letters[start:start + _KEY_FRAGMENT]
        found = letters.find(fragment)
        while found != -1:
            # From the fragment's first letter to its last, with whatever was put between them.
            first, last = where[found], where[found + _KEY_FRAGMENT - 1]
            covered[first:last + 1] = [True] * (last + 1 - first)
            found = letters.find(fragment, found + 1)
    return covered


def redact(message: str, secret: str | None) -> str:
    """`message` with the key, and every fragment or spaced-out, split, case-changed or base64 form of it of
    _KEY_FRAGMENT or more letters, replaced."""
    if not secret:
        return message
    message = message.replace(secret, REDACTED)
    if len(_letters(secret)[0]) < _KEY_FRAGMENT:
        return message
    covered = _covered(message, secret)
    if not any(covered):
        return message
    parts, previous = [], False
    for char, hidden in zip(message, covered, strict=True):
        if not hidden:
            parts.append(char)
        elif not previous:
            parts.append(REDACTED)
        previous = hidden
    return "".join(parts)


def holds_secret(text: str, secret: str | None) -> bool:
    """Whether `text` quotes the key in any form redact() knows."""
    return bool(secret) and redact(text, secret) != text


# ---------------------------------------------------------------------------------------------------------
# One request with retries
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    text: str | None  # None: the server's 200 was not JSON at all
    finish_reason: str | None = None


def request_once(client: openai.OpenAI, chat: bool, body: dict[str, Any]) -> Answer:
    """One HTTP attempt.

    The `openai` client hands back a non-JSON body as a plain string; that is no model output, so it
    comes back as text None and the caller counts it as malformed without caching it.
    """
    response = client.chat.completions.create(**body) if chat else client.completions.create(**body)
    if isinstance(response, str):
        return Answer(text=None)
    # The client builds its objects without validation, so a wrong-shaped JSON body surfaces here.
    try:
        choice = response.choices[0]
        text = choice.message.content if chat else choice.text
        finish_reason = choice.finish_reason
    except IndexError:
        raise InvalidResponseError("not a completion (no choices)") from None
    except (AttributeError, KeyError, TypeError) as exc:
        raise InvalidResponseError(f"not a completion ({type(exc).__name__})") from None
    if text is not None and not isinstance(text, str):
        raise InvalidResponseError("completion text is not a string")
    return Answer(text=text or "", finish_reason=finish_reason)


def classify(exc: BaseException, secret: str | None) -> Failure:
    """Whether an attempt's exception is worth another attempt, and how long the server asked us to wait."""
    if isinstance(exc, openai.APITimeoutError):
        return Failure("request timed out", retryable=True, kind=UNAVAILABLE)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return Failure(redact(f"connection failed or closed early ({cause})", secret), retryable=True,
                       kind=UNAVAILABLE)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in (408, 409, 429) or status >= 500
        retry_after = retry_after_seconds(exc.response.headers) if retryable else None
        label, kind = _status_label(status)
        detail = _error_detail(exc, secret)
        message = f"{label} (HTTP {status})" + (f": {detail}" if detail else "")
        return Failure(redact(message, secret), retryable, retry_after, kind)
    if isinstance(exc, json.JSONDecodeError):
        # A 200 whose JSON is cut short: a flaky proxy or server, worth another try.
        return Failure(redact(f"invalid response: broken or cut-short JSON ({exc})", secret), retryable=True,
                       kind=INVALID)
    if isinstance(exc, (InvalidResponseError, openai.APIResponseValidationError)):
        return Failure(redact(f"invalid response: {exc}", secret), retryable=True, kind=INVALID)
    return Failure(redact(f"{type(exc).__name__}: {exc}", secret), retryable=False)


def _status_label(status: int) -> tuple[str, str]:
    if status == 429:
        return "rate limited", RATE_LIMITED
    if status >= 500 or status == 408:
        return "server error", UNAVAILABLE
    return "refused", REFUSED


def _error_detail(exc: openai.APIStatusError, secret: str | None) -> str:
    """The server's own error message (OpenAI's {"error": {"message": ...}}), redacted, then cut short."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(message, str) and message.strip():
            # redacted before cutting: a cut through the key would leave a part that no longer matches it
            return redact(message.strip(), secret)[:200]
    return ""


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None when absent."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Attempted:
    """What came of one request after all its attempts."""

    text: str | None = None  # the model's text on success
    finish_reason: str | None = None
    not_json: bool = False  # the server's 200 was not JSON
    failure: str | None = None
    failure_kind: str | None = None  # one of FAILURE_KINDS when `failure` is set
    cancelled: bool = False
    attempts: int = 0


def request_with_retries(
    client: openai.OpenAI,
    chat: bool,
    body: dict[str, Any],
    policy: RetryPolicy,
    cancel: threading.Event,
    secret: str | None,
) -> Attempted:
    """Try up to `policy.max_attempts` times. Never raises for a failed request: the failure is returned."""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            answer = request_once(client, chat, body)
        except Exception as exc:
            failure = classify(exc, secret)
            if not failure.retryable or attempt == policy.max_attempts:
                return Attempted(failure=failure.message, failure_kind=failure.kind, attempts=attempt)
            wait = policy.backoff(attempt)
            if failure.retry_after is not None:
                wait = min(failure.retry_after, policy.retry_after_max)
            if cancel.wait(wait):
                return Attempted(cancelled=True, attempts=attempt)
            continue
        return Attempted(
            text=answer.text,
            finish_reason=answer.finish_reason,
            not_json=answer.text is None,
            attempts=attempt,
        )
    raise AssertionError("unreachable: max_attempts must be at least 1")
