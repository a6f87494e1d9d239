"""A real HTTP server on 127.0.0.1 that speaks the part of the OpenAI API our instruction generator uses.

Tests (unit and end-to-end workflow tests) point the official `openai` client at it, so every byte goes
through the real client and the real HTTP stack; nothing is mocked. It serves

    POST /v1/completions         text completions (the paper's fine-tuned GPT-3 format)
    POST /v1/chat/completions    chat completions
    GET  /v1/models              a one-model list

and is scriptable per test: replies queued with `enqueue` are served first, in order, to whichever request
comes next; once the queue is empty a `responder` function answers (by default `snow_responder`, which
writes a valid edit for any caption; `ScriptedResponder` answers each caption in a scripted order of named
kinds: good, malformed, not JSON, empty, identical, too long, cut at max_tokens, echoing the key).
Every request is recorded (path, headers, JSON body, arrival time),
and the server tracks how many requests were in flight at once.

    with FakeOpenAIServer() as server:
        server.enqueue(Reply.rate_limited(retry_after=0.1), Reply.server_error(), Reply.ok("...\\n%%\\n..."))
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_ID = "fake-model"
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the decoded JSON body, or None when there was none or it was not JSON
    raw_body: bytes
    received_at: float  # time.monotonic() on arrival

    @property
    def is_chat(self) -> bool:
        return self.path == CHAT_PATH

    def caption(self) -> str:
        """The caption this request asks about: the last user message, or the prompt's last `##` block."""
        if not isinstance(self.body, dict):
            return ""
        if self.is_chat:
            users = [m.get("content", "") for m in self.body.get("messages", []) if m.get("role") == "user"]
            return str(users[-1]) if users else ""
        prompt = str(self.body.get("prompt", ""))
        # A few-shot prompt holds earlier examples; the caption asked about is the last line before `##`.
        return prompt.removesuffix("\n##\n").rsplit("\n", 1)[-1]


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Build with the class methods; `after(seconds)` delays any of them."""

    kind: str  # "content", "raw" or "disconnect"
    status: int = 200
    content: str = ""
    finish_reason: str = "stop"
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0

    @classmethod
    def ok(cls, content: str, finish_reason: str = "stop") -> Reply:
        """A successful answer, shaped as a completion or a chat completion to match the request's path."""
        return cls(kind="content", content=content, finish_reason=finish_reason)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(
            kind="raw",
            status=status,
            body=json.dumps(payload).encode(),
            headers=tuple((headers or {}).items()),
        )

    @classmethod
    def error(cls, status: int, message: str = "scripted error", headers: dict[str, str] | None = None) -> Reply:
        payload = {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}
        return cls.json(payload, status=status, headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: float | None = None) -> Reply:
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        return cls.error(429, "rate limited", headers=headers)

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls.error(status, "internal error")

    @classmethod
    def malformed_json(cls) -> Reply:
        """A 200 that claims JSON but is cut short."""
        return cls(
            kind="raw",
            body=b'{"id": "cmpl-1", "choices": [{"text": "make it',
            content_type="application/json",
        )

    @classmethod
    def garbage(cls, text: str = "<html><body>502 upstream said hello</body></html>") -> Reply:
        """A 200 with a non-JSON body, as a misconfigured proxy sends."""
        return cls(kind="raw", body=text.encode(), content_type="text/plain; charset=utf-8")

    @classmethod
    def disconnect(cls) -> Reply:
        """Send the headers and half the body of a valid answer, then close the connection."""
        return cls(kind="disconnect")

    def after(self, seconds: float) -> Reply:
        return replace(self, delay=seconds)


Responder = Callable[[RecordedRequest], Reply]


def snow_responder(request: RecordedRequest) -> Reply:
    """A valid edit for any caption, distinct per caption: "add snow" / "<caption>, covered in snow"."""
    return Reply.ok(f"add snow\n%%\n{request.caption()}, covered in snow")


# Named answers for `scripted`: what a misbehaving model or server sends for a caption.
SCRIPT_KINDS = ("good", "malformed", "not_json", "empty", "identical", "too_long", "cut", "echo_key")


def scripted_reply(kind: str, request: RecordedRequest) -> Reply:
    """The reply of kind `kind` (SCRIPT_KINDS) to `request`."""
    caption = request.caption()
    if kind == "good":
        return snow_responder(request)
    if kind == "malformed":
        return Reply.ok(f"add snow to {caption}")  # no separator
    if kind == "not_json":
        return Reply.garbage()
    if kind == "empty":
        return Reply.ok("")
    if kind == "identical":
        return Reply.ok(f"keep it as it is\n%%\n{caption.upper()}.")
    if kind == "too_long":
        return Reply.ok("add snow\n%%\n" + "snow " * 200)
    if kind == "cut":
        return Reply.ok("add snow\n%%\na photo covered in", finish_reason="length")
    if kind == "echo_key":
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        return Reply.ok(f"add {' '.join(key)}\n%%\n{caption}, covered in snow")
    raise ValueError(f"unknown scripted reply {kind!r}; use one of {SCRIPT_KINDS}")


class ScriptedResponder:
    """Answers each caption's requests in a scripted order, e.g. {"a cat": ["malformed", "not_json", "good"]}:
    the first request about "a cat" gets a malformed answer, the second one not JSON, the third a good one, and
    every later one the last kind again. Captions not in the script get `default`. Per caption, so the order
    holds whatever the concurrency; `asked` counts the requests per caption."""

    def __init__(self, script: dict[str, list[str]], default: str = "good") -> None:
        for kinds in script.values():
            unknown = set(kinds) - set(SCRIPT_KINDS)
            if not kinds or unknown:
                raise ValueError(f"script entries must be non-empty lists of {SCRIPT_KINDS}, got {kinds}")
        self.script = {caption: list(kinds) for caption, kinds in script.items()}
        self.default = default
        self.asked: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Reply:
        caption = request.caption()
        with self._lock:
            count = self.asked.get(caption, 0)
            self.asked[caption] = count + 1
        kinds = self.script.get(caption, [self.default])
        return scripted_reply(kinds[min(count, len(kinds) - 1)], request)


@dataclass
class _State:
    responder: Responder
    delay: float
    queue: deque[Reply] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class FakeOpenAIServer:
    """Threaded HTTP server on 127.0.0.1 and a free port. Use as a context manager."""

    def __init__(self, responder: Responder = snow_responder, delay: float = 0.0) -> None:
        """`delay` is added before every reply (on top of a reply's own), to keep requests in flight."""
        self._state = _State(responder=responder, delay=delay)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self._state))
        httpd.daemon_threads = True
        # Handler threads may sit in a scripted delay; shutting down must not wait for them.
        httpd.block_on_close = False
        self._httpd = httpd
        # A short poll interval: `shutdown` waits for one poll, and tests stop a server each.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- scripting and inspection -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        with self._state.lock:
            self._state.queue.extend(replies)

    def set_responder(self, responder: Responder) -> None:
        with self._state.lock:
            self._state.responder = responder

    def set_delay(self, seconds: float) -> None:
        with self._state.lock:
            self._state.delay = seconds

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def max_in_flight(self) -> int:
        with self._state.lock:
            return self._state.max_in_flight

    @property
    def pending_replies(self) -> int:
        with self._state.lock:
            return len(self._state.queue)

    def reset(self) -> None:
        """Forget recorded requests and the in-flight peak (not the queue or the responder)."""
        with self._state.lock:
            self._state.requests.clear()
            self._state.max_in_flight = self._state.in_flight


def _handler_class(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.state = state
    return Handler


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as real servers do; the client's connection pool is part of what the tests exercise.
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(self.rfile.read(length) if length else b"")

    def _serve(self, raw_body: bytes) -> None:
        request = self._record(raw_body)
        state = self.state
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            reply = self._choose_reply(request)
            # An Event wait, not time.sleep, so stopping the server cuts a scripted delay short.
            if state.stopping.wait(state.delay + reply.delay):
                self.close_connection = True
                return
            self._send(reply, request)
        except OSError:
            # The client gave up (its timeout) while we were delaying; nothing to answer.
            self.close_connection = True
        finally:
            with state.lock:
                state.in_flight -= 1

    def _record(self, raw_body: bytes) -> RecordedRequest:
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        request = RecordedRequest(
            method=self.command,
            path=self.path.split("?", 1)[0],
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw_body=raw_body,
            received_at=time.monotonic(),
        )
        with self.state.lock:
            self.state.requests.append(request)
        return request

    def _choose_reply(self, request: RecordedRequest) -> Reply:
        if request.path == MODELS_PATH and request.method == "GET":
            return Reply.json({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "fake"}]})
        if request.method != "POST" or request.path not in (COMPLETIONS_PATH, CHAT_PATH):
            return Reply.error(404, f"no route for {request.method} {request.path}")
        with self.state.lock:
            if self.state.queue:
                return self.state.queue.popleft()
            responder = self.state.responder
        return responder(request)

    def _send(self, reply: Reply, request: RecordedRequest) -> None:
        if reply.kind == "raw":
            self._write(reply.status, reply.body, reply.content_type, reply.headers)
        elif reply.kind == "content":
            body = json.dumps(_success_payload(reply, request)).encode()
            self._write(200, body, reply.content_type, reply.headers)
        elif reply.kind == "disconnect":
            self._disconnect_midway(json.dumps(_success_payload(Reply.ok("x\n%%\ny"), request)).encode())
        else:
            raise ValueError(f"unknown reply kind {reply.kind!r}")

    def _write(self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _disconnect_midway(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _success_payload(reply: Reply, request: RecordedRequest) -> dict[str, Any]:
    model = request.body.get("model", MODEL_ID) if isinstance(request.body, dict) else MODEL_ID
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    if request.is_chat:
        message = {"role": "assistant", "content": reply.content}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": reply.content, "finish_reason": reply.finish_reason, "logprobs": None}
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
