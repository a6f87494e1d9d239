"""Instruction generation against a real HTTP server on 127.0.0.1 through the real `openai` client."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from comfyui_ip2p.dataset import instruction_format as fmt
from comfyui_ip2p.dataset import instructions as ins
from comfyui_ip2p.dataset import llm_client
from comfyui_ip2p.dataset.instruction_cache import InstructionCache
from comfyui_ip2p.dataset.llm_client import PLACEHOLDER_KEY, REDACTED, retry_after_seconds
from comfyui_ip2p.dataset.paths import atomic_write_bytes
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer, RecordedRequest, Reply
from hypothesis import given
from hypothesis import strategies as st

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c1e5b"
KEY_ENV = "IP2P_TEST_LLM_KEY"
# Short enough that the whole file stays fast; the shapes of the waits are what is tested.
FAST_RETRY = ins.RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_max=0.05, retry_after_max=1.0)


@pytest.fixture()
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    # The client must never fall back to a real key or endpoint from the developer's shell.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    return SECRET


def endpoint(server: FakeOpenAIServer, model: str = "fake-model", timeout: float = 5.0) -> ins.Endpoint:
    return ins.Endpoint(model=model, base_url=server.base_url, api_key_env=KEY_ENV, timeout=timeout)


def save_rows_jsonl(rows, path: Path) -> Path:
    """Rows as the reference's generated-prompts jsonl (`input`, `edit`, `output`), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"input": r.input_caption, "edit": r.instruction, "output": r.output_caption} for r in rows]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return path


def run(server: FakeOpenAIServer, captions, **kwargs) -> ins.InstructionResult:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("mode", "completion")
    model = kwargs.pop("model", "fake-model")
    timeout = kwargs.pop("timeout", 5.0)
    return ins.generate_instructions(captions, endpoint(server, model, timeout), **kwargs)


def by_caption(table: dict[str, str]):
    """A responder answering each caption with a fixed text."""
    return lambda request: Reply.ok(table[request.caption()])


def assert_counts_add_up(stats: ins.InstructionStats) -> None:
    per_caption = (
        stats.ok + stats.malformed + stats.dropped_identical + stats.duplicates + stats.failed + stats.cancelled
    )
    assert per_caption == stats.requested


# ---------------------------------------------------------------------------------------------------------
# Request shape
# ---------------------------------------------------------------------------------------------------------


def test_completion_request_is_the_papers_format(server):
    result = run(server, ["a photo of a cat"], mode="completion", model="ft-davinci")

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/v1/completions"
    assert request.body == {
        "model": "ft-davinci",
        "prompt": "a photo of a cat\n##\n",
        "temperature": 0.7,
        "frequency_penalty": 0.1,
        "max_tokens": 256,
        "stop": ["\nEND"],
    }
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert result.rows == [fmt.EditInstruction("a photo of a cat", "add snow", "a photo of a cat, covered in snow")]


def test_chat_request_has_system_prompt_and_few_shot_in_the_same_contract(server):
    result = run(server, ["a photo of a cat"], mode="chat", model="chat-model")

    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    body = request.body
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "chat-model",
        "temperature": 0.7,
        "frequency_penalty": 0.1,
        "max_tokens": 256,
        "stop": ["\nEND"],
    }
    messages = body["messages"]
    assert messages[0] == {"role": "system", "content": fmt.SYSTEM_PROMPT}
    assert messages[-1] == {"role": "user", "content": "a photo of a cat"}
    shots = messages[1:-1]
    assert 4 <= len(shots) // 2 <= 6
    assert [m["role"] for m in shots] == ["user", "assistant"] * (len(shots) // 2)
    for user, assistant in zip(shots[::2], shots[1::2], strict=True):
        instruction, edited = fmt.parse_completion(assistant["content"])
        assert assistant["content"] == f"{instruction}\n%%\n{edited}"
        assert not fmt.is_identical_edit(user["content"], edited)
    assert result.rows[0].instruction == "add snow"


def test_sampling_overrides_and_omissions_reach_the_body(server):
    sampling = fmt.Sampling(temperature=1.1, frequency_penalty=None, max_tokens=64, stop=("\nEND", "\n\n"), seed=7)
    run(server, ["a dog"], sampling=sampling)

    assert server.requests[0].body == {
        "model": "fake-model",
        "prompt": "a dog\n##\n",
        "temperature": 1.1,
        "max_tokens": 64,
        "stop": ["\nEND", "\n\n"],
        "seed": 7,
    }


def test_completion_few_shot_prefix_keeps_the_caption_last(server):
    run(server, ["a dog"], completion_few_shot=True)

    prompt = server.requests[0].body["prompt"]
    assert prompt.endswith("\n\na dog\n##\n")
    assert prompt.count("\n##\n") == len(fmt.CHAT_EXAMPLES) + 1
    assert prompt.count("\nEND\n") == len(fmt.CHAT_EXAMPLES)


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("make it winter\n%%\na snowy street", ("make it winter", "a snowy street")),
        (" make it winter \n%%\n a snowy street \n", ("make it winter", "a snowy street")),
        ("make it winter\r\n%%\r\na snowy street", ("make it winter", "a snowy street")),
        ("make it winter\n%%\na snowy street\nEND", ("make it winter", "a snowy street")),
        ("make it winter\n%%\na snowy street\nEND\nmore rambling\n%%\nx", ("make it winter", "a snowy street")),
        ("make it winter\n  %%  \na snowy street", ("make it winter", "a snowy street")),
        ("\nmake it winter\n%%\na snowy street\n\n", ("make it winter", "a snowy street")),
    ],
)
def test_parse_accepts(text, expected):
    assert fmt.parse_completion(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no separator"),
        ("make it winter", "no separator"),
        ("make it winter %% a snowy street", "no separator"),
        ("make it winter\n##\na snowy street", "no separator"),
        ("make it winter\n%%\n", "empty part"),
        ("\n%%\na snowy street", "empty part"),
        ("%%\na snowy street", "empty part"),
        ("   \n%%\n   ", "empty part"),
        ("a\n%%\nb\n%%\nc", "multiple separators"),
        ("make it\nwinter\n%%\na snowy street", "multi-line part"),
        ("make it winter\n%%\n" + "very " * 100 + "snowy", "too long"),
    ],
)
def test_parse_rejects(text, reason):
    with pytest.raises(fmt.MalformedOutputError, match=reason):
        fmt.parse_completion(text)


_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\x85"),
    min_size=1,
    max_size=60,
).filter(lambda s: s.strip() and s.strip() != "%%" and "\nEND" not in s)


@given(_line, _line)
def test_parse_inverts_format(instruction, edited):
    text = fmt.format_completion(instruction, edited)
    assert fmt.parse_completion(text) == (instruction.strip(), edited.strip())


@given(st.text(max_size=300))
def test_parse_never_raises_anything_but_malformed(text):
    try:
        instruction, edited = fmt.parse_completion(text)
    except fmt.MalformedOutputError:
        return
    assert instruction and edited and "\n" not in instruction + edited


@pytest.mark.parametrize(
    ("caption", "edited", "identical"),
    [
        ("A cat on a mat.", "a cat on a mat", True),
        ("a cat on a mat", "A Cat On A Mat!!", True),
        ("a cat on a mat", "  a cat on a mat ?", True),
        ("a cat on a mat", "a dog on a mat", False),
        ("a cat on a mat", "a cat, on a mat", False),
    ],
)
def test_identical_edit(caption, edited, identical):
    assert fmt.is_identical_edit(caption, edited) is identical


def test_rows_are_filtered_counted_and_in_input_order(server):
    captions = ["c0 a red car", "c1 a boat", "c2 a tree", "c0 a red car", "c3 a house", "c4 a lamp"]
    server.set_responder(
        by_caption(
            {
                "c0 a red car": "make the car blue\n%%\nc0 a blue car",
                "c1 a boat": "sink it",  # no separator
                "c2 a tree": "do nothing\n%%\nC2 A Tree.",  # identical after normalising
                "c3 a house": "a\n%%\nb\n%%\nc",  # multiple separators
                "c4 a lamp": "turn it on\n%%\nc4 a lit lamp",
            }
        )
    )
    result = run(server, captions, concurrency=3)

    assert result.rows == [
        fmt.EditInstruction("c0 a red car", "make the car blue", "c0 a blue car"),
        fmt.EditInstruction("c4 a lamp", "turn it on", "c4 a lit lamp"),
    ]
    stats = result.stats
    assert (stats.requested, stats.ok, stats.malformed, stats.dropped_identical, stats.duplicates) == (6, 2, 2, 1, 1)
    # The repeated caption is one request, not two; each unusable answer is asked ANSWER_ATTEMPTS times in all.
    assert stats.fetched == 2
    assert len(server.requests) == 2 + 3 * ins.ANSWER_ATTEMPTS == stats.http_requests
    assert stats.reasked == 3 * (ins.ANSWER_ATTEMPTS - 1)
    assert "malformed output: no separator" in stats.reasons
    assert stats.skipped == {"malformed output: no separator": 1, "malformed output: multiple separators": 1,
                             ins.IDENTICAL: 1}
    assert sorted(stats.skipped_captions) == sorted([["c1 a boat", "malformed output: no separator"],
                                                     ["c3 a house", "malformed output: multiple separators"],
                                                     ["c2 a tree", ins.IDENTICAL]])
    assert stats.retryable == 2, "malformed answers are asked again on the next run; identical ones are the model's"
    assert_counts_add_up(stats)


def test_an_unusable_answer_is_asked_again_with_a_new_sample_then_the_good_one_is_kept(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    server.enqueue(Reply.ok("sink it"), Reply.garbage(), Reply.ok("do nothing\n%%\na cat"),
                   Reply.ok("add snow\n%%\na cat in snow"))
    result = run(server, ["a cat"], cache_path=cache, sampling=fmt.Sampling(seed=7))
    assert result.rows == [fmt.EditInstruction("a cat", "add snow", "a cat in snow")]
    assert [r.body["seed"] for r in server.requests] == [7, 8, 9, 10], "each re-ask is a new sample"
    assert (result.stats.fetched, result.stats.reasked, result.stats.malformed) == (1, 3, 0)
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [(line["instruction"], line["output"]) for line in lines] == [("add snow", "a cat in snow")]
    assert all("text" not in line for line in lines), "only the parsed row is cached, never the raw answer"


def test_a_too_long_answer_is_asked_again_then_reported_by_name(server, tmp_path):
    server.set_responder(lambda request: Reply.ok("add snow\n%%\n" + "snow " * 200))
    result = run(server, ["a cat"], cache_path=tmp_path / "cache.jsonl")
    assert result.rows == [] and len(server.requests) == ins.ANSWER_ATTEMPTS
    assert result.stats.skipped == {"malformed output: too long (over 400 characters)": 1}
    assert "too long" in result.stats.summary()
    assert not (tmp_path / "cache.jsonl").exists()


def test_a_cache_entry_that_is_not_a_usable_row_is_ignored_and_asked_again(server, tmp_path):
    from comfyui_ip2p.dataset.instruction_cache import cache_key

    cache = tmp_path / "cache.jsonl"
    body = fmt.build_request("completion", "fake-model", "a cat")
    key = cache_key("completion", server.base_url, body)
    legacy = {"key": key, "text": "sink it", "finish_reason": "stop"}  # the first version's raw text
    identical = {"key": key, "instruction": "nothing", "output": "A cat."}  # a hand edit
    for poisoned in (legacy, identical):
        cache.write_text(json.dumps(poisoned) + "\n")
        server.reset()
        result = run(server, ["a cat"], cache_path=cache)
        assert result.stats.cached == 0 and len(server.requests) == 1, poisoned
        assert result.rows == [fmt.EditInstruction("a cat", "add snow", "a cat, covered in snow")]
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert all("text" not in line for line in lines), "raw text an older version cached is removed from the file"


def test_garbage_model_text_is_malformed_not_a_crash(server):
    server.set_responder(lambda request: Reply.ok("\x00\x01 lorem ipsum ### %% ???"))
    result = run(server, ["a cat"])
    assert result.rows == []
    assert (result.stats.malformed, result.stats.failed) == (1, 0)
    # A well-formed HTTP answer is not retried by the transport, only asked again for a new sample.
    assert len(server.requests) == ins.ANSWER_ATTEMPTS


def test_garbage_non_json_body_is_malformed_and_not_cached(server, tmp_path):
    server.enqueue(*[Reply.garbage()] * ins.ANSWER_ATTEMPTS)
    cache = tmp_path / "cache.jsonl"
    result = run(server, ["a cat"], cache_path=cache)
    assert result.stats.skipped == {ins.NOT_JSON: 1}
    assert (result.stats.malformed, result.stats.failed, result.stats.fetched) == (1, 0, 0)
    assert not cache.exists()
    # Once the server is sane again, the rerun asks again and gets a real answer.
    assert run(server, ["a cat"], cache_path=cache).stats.ok == 1


def test_output_cut_at_max_tokens_is_asked_again_and_never_cached(server, tmp_path):
    cache = tmp_path / "c.jsonl"
    server.set_responder(lambda request: Reply.ok("add snow\n%%\na cat covered in", finish_reason="length"))
    result = run(server, ["a cat"], cache_path=cache)
    assert (result.stats.ok, result.stats.malformed, result.stats.unanswered) == (0, 1, 1)
    assert "malformed output: truncated at max_tokens" in result.stats.reasons
    assert len(server.requests) == ins.ANSWER_ATTEMPTS and not cache.exists()


def test_wrong_shaped_json_is_retried_then_failed(server):
    server.enqueue(*[Reply.json({"object": "surprise"})] * FAST_RETRY.max_attempts)
    result = run(server, ["a cat"])
    assert result.stats.failed == 1
    assert len(server.requests) == FAST_RETRY.max_attempts
    assert any("not a completion" in reason for reason in result.stats.reasons)


# ---------------------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------------------


def test_retries_429_and_500_then_succeeds(server):
    server.enqueue(Reply.rate_limited(), Reply.server_error(500), Reply.server_error(503))
    result = run(server, ["a cat"])

    assert len(result.rows) == 1
    assert len(server.requests) == 4 == result.stats.http_requests
    assert all(r.body == server.requests[0].body for r in server.requests)
    # Our retries are the only ones: the client's own would announce themselves in this header.
    assert {r.headers.get("x-stainless-retry-count") for r in server.requests} <= {"0", None}


def test_retry_after_is_honoured(server):
    server.enqueue(Reply.rate_limited(retry_after=0.4))
    run(server, ["a cat"])
    first, second = server.requests
    # The back-off alone would be at most 0.05 s.
    assert second.received_at - first.received_at >= 0.35


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_gives_up_after_max_attempts(server):
    server.enqueue(*[Reply.server_error()] * FAST_RETRY.max_attempts, Reply.ok("never\n%%\nreached"))
    result = run(server, ["a cat"])
    assert result.rows == []
    assert result.stats.failed == 1
    assert len(server.requests) == FAST_RETRY.max_attempts
    assert any("HTTP 500" in reason for reason in result.stats.reasons)


def test_client_errors_are_not_retried(server):
    server.enqueue(Reply.error(400, "bad model"))
    result = run(server, ["a cat"])
    assert result.stats.failed == 1
    assert len(server.requests) == 1


def test_timeout_then_success(server):
    server.enqueue(Reply.ok("late\n%%\ntoo late").after(2.0))
    result = run(server, ["a cat"], timeout=0.3)
    assert result.rows == [fmt.EditInstruction("a cat", "add snow", "a cat, covered in snow")]
    assert len(server.requests) == 2


def test_connection_closed_mid_response_then_success(server):
    server.enqueue(Reply.disconnect())
    result = run(server, ["a cat"])
    assert len(result.rows) == 1
    assert len(server.requests) == 2


def test_malformed_json_fails_after_retries_and_the_rest_carries_on(server):
    def responder(request: RecordedRequest) -> Reply:
        if request.caption() == "broken":
            return Reply.malformed_json()
        return Reply.ok(f"add snow\n%%\n{request.caption()} in snow")

    server.set_responder(responder)
    result = run(server, ["a cat", "broken", "a dog"], concurrency=2)

    assert [row.input_caption for row in result.rows] == ["a cat", "a dog"]
    assert result.stats.failed == 1
    assert sum(r.caption() == "broken" for r in server.requests) == FAST_RETRY.max_attempts
    assert any("invalid response" in reason for reason in result.stats.reasons)
    assert_counts_add_up(result.stats)


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------


def test_rerun_is_served_from_cache_with_zero_requests(server, tmp_path):
    cache = tmp_path / "llm_cache.jsonl"
    captions = [f"caption {i}" for i in range(5)]
    first = run(server, captions, cache_path=cache, concurrency=3)
    assert len(server.requests) == 5

    server.reset()
    second = run(server, captions, cache_path=cache, concurrency=3)
    assert server.requests == []
    assert second.rows == first.rows
    assert (second.stats.cached, second.stats.fetched, second.stats.http_requests) == (5, 0, 0)


def test_cache_is_keyed_on_what_determines_the_answer(server, tmp_path):
    cache = tmp_path / "llm_cache.jsonl"
    run(server, ["a cat"], cache_path=cache)
    run(server, ["a cat"], cache_path=cache, model="other-model")
    run(server, ["a cat"], cache_path=cache, sampling=fmt.Sampling(temperature=0.2))
    run(server, ["a cat"], cache_path=cache, mode="chat")
    assert len(server.requests) == 4
    with FakeOpenAIServer() as other:  # another port: another base URL
        run(other, ["a cat"], cache_path=cache)
        assert len(other.requests) == 1


def test_cache_tolerates_a_torn_last_line(server, tmp_path):
    cache = tmp_path / "llm_cache.jsonl"
    run(server, ["a cat", "a dog"], cache_path=cache)
    with open(cache, "ab") as f:
        f.write(b'{"key": "abc", "text": "half a rec')  # a crash mid-append

    server.reset()
    result = run(server, ["a cat", "a dog", "a cow"], cache_path=cache)
    assert [r.caption() for r in server.requests] == ["a cow"]
    assert result.stats.ok == 3
    loaded = InstructionCache(cache)
    assert (len(loaded), loaded.skipped_lines) == (3, 1)


def test_cache_survives_a_restart_mid_run(server, tmp_path):
    """Answers are durable as they arrive: a caller that dies (here: raises) loses none of them."""
    cache = tmp_path / "llm_cache.jsonl"
    captions = [f"caption {i}" for i in range(6)]

    def crash(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(server, captions, cache_path=cache, concurrency=1, progress=crash)
    assert len(server.requests) == 3

    server.reset()
    result = run(server, captions, cache_path=cache, concurrency=2)
    assert result.stats.cached == 3
    assert sorted(r.caption() for r in server.requests) == captions[3:]


# ---------------------------------------------------------------------------------------------------------
# Concurrency, progress, cancel
# ---------------------------------------------------------------------------------------------------------


def test_requests_overlap_up_to_the_limit_and_rows_keep_input_order(server):
    captions = [f"caption {i}" for i in range(10)]

    def responder(request: RecordedRequest) -> Reply:
        # Earlier captions answer later, so completion order differs from input order.
        index = int(request.caption().split()[-1])
        return Reply.ok(f"add snow\n%%\n{request.caption()} in snow").after(0.05 * (10 - index))

    server.set_responder(responder)
    result = run(server, captions, concurrency=4)

    assert server.max_in_flight == 4
    assert [row.input_caption for row in result.rows] == captions


def test_concurrency_one_is_sequential(server):
    server.set_delay(0.02)
    run(server, [f"caption {i}" for i in range(4)], concurrency=1)
    assert server.max_in_flight == 1


def test_progress_reports_every_request_including_cached(server, tmp_path):
    cache = tmp_path / "c.jsonl"
    run(server, ["a", "b"], cache_path=cache)
    calls: list[tuple[int, int]] = []
    run(server, ["a", "b", "c", "d"], cache_path=cache, concurrency=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 4), (3, 4), (4, 4)]
    # Callbacks run on the calling thread.
    seen: set[str] = set()
    run(server, ["e"], progress=lambda d, t: seen.add(threading.current_thread().name))
    assert seen == {threading.current_thread().name}


def test_cancel_keeps_finished_results_and_caches_them(server, tmp_path):
    cache = tmp_path / "c.jsonl"
    captions = [f"caption {i}" for i in range(6)]
    done = [0]

    result = run(
        server,
        captions,
        cache_path=cache,
        concurrency=1,
        progress=lambda d, t: done.__setitem__(0, d),
        should_cancel=lambda: done[0] >= 2,
    )
    assert result.cancelled
    assert [row.input_caption for row in result.rows] == captions[:2]
    assert (result.stats.ok, result.stats.cancelled) == (2, 4)
    assert len(server.requests) == 2
    assert_counts_add_up(result.stats)

    server.reset()
    rerun = run(server, captions, cache_path=cache, concurrency=2)
    assert (rerun.stats.cached, rerun.stats.fetched, rerun.stats.ok) == (2, 4, 6)


def test_cancel_cuts_a_back_off_short(server):
    server.enqueue(Reply.rate_limited(retry_after=30))
    flag = threading.Event()
    threading.Timer(0.3, flag.set).start()
    started = time.monotonic()
    result = run(
        server,
        ["a cat"],
        retry=ins.RetryPolicy(max_attempts=3, retry_after_max=60),
        should_cancel=flag.is_set,
    )
    assert time.monotonic() - started < 5
    assert result.cancelled and result.stats.cancelled == 1
    assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------


def test_the_key_is_never_written_anywhere(server, tmp_path):
    # An endpoint that echoes the bearer token into its error messages, as some proxies do.
    def leaky(request: RecordedRequest) -> Reply:
        if request.caption() == "unauthorised":
            return Reply.error(401, f"invalid key {request.headers['authorization']}")
        if request.caption() == "flaky":
            return Reply.error(503, f"upstream rejected {request.headers['authorization']}")
        return Reply.ok(f"add snow\n%%\n{request.caption()} in snow")

    server.set_responder(leaky)
    cache = tmp_path / "cache" / "llm.jsonl"
    result = run(server, ["a cat", "unauthorised", "flaky", "a dog"], cache_path=cache, mode="chat")
    save_rows_jsonl(result.rows, tmp_path / "out" / "rows.jsonl")

    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # the key was in use
    assert result.stats.failed == 2
    assert all(SECRET not in reason for reason in result.stats.reasons)
    assert any(REDACTED in reason for reason in result.stats.reasons)
    assert SECRET not in repr(result)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} == {"llm.jsonl", "rows.jsonl"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


def test_key_from_a_key_file(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-from-file\n")
    ep = ins.Endpoint(model="m", base_url=server.base_url, api_key_env=KEY_ENV, api_key_file=key_file)
    ins.generate_instructions(["a cat"], ep, retry=FAST_RETRY)
    assert server.requests[0].headers["authorization"] == "Bearer sk-from-file"


def test_keyless_local_server_gets_a_placeholder(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    result = run(server, ["a cat"])
    assert result.stats.ok == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


def test_official_endpoint_without_key_fails_before_any_request(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    ep = ins.Endpoint(model="gpt-4o-mini", api_key_env=KEY_ENV)  # the default base URL, api.openai.com
    with pytest.raises(llm_client.MissingAPIKeyError, match=KEY_ENV):
        ins.generate_instructions(["a cat"], ep)


def test_missing_key_file_names_the_path_only(tmp_path):
    ep = ins.Endpoint(model="m", base_url="http://127.0.0.1:9/v1", api_key_file=tmp_path / "nope.txt")
    with pytest.raises(llm_client.MissingAPIKeyError, match=r"nope\.txt") as info:
        ins.generate_instructions(["a cat"], ep)
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Caption sources and outputs
# ---------------------------------------------------------------------------------------------------------


def test_caption_files(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "c.jsonl").write_text('{"caption": "a cat"}\n\n{"input": "a dog", "other": 1}\n')
    (tmp_path / "c.csv").write_text('id,caption\n1,a cat\n2,"a dog, sleeping"\n', encoding="utf-8-sig")
    assert fmt.read_captions(tmp_path / "c.txt") == ["a cat", "a dog"]
    assert fmt.read_captions(tmp_path / "c.jsonl") == ["a cat", "a dog"]
    assert fmt.read_captions(tmp_path / "c.csv") == ["a cat", "a dog, sleeping"]
    assert fmt.as_captions(str(tmp_path / "c.txt")) == ["a cat", "a dog"]
    assert fmt.as_captions(tmp_path / "c.csv") == ["a cat", "a dog, sleeping"]


def test_caption_text_and_lists():
    assert fmt.as_captions("a cat\n a dog \n\n") == ["a cat", "a dog"]
    assert fmt.as_captions(["a cat", "  ", "a dog"]) == ["a cat", "a dog"]
    with pytest.raises(FileNotFoundError):
        fmt.as_captions("/nowhere/captions.jsonl")
    with pytest.raises(TypeError):
        fmt.as_captions(["a cat", 3])  # type: ignore[list-item]


def test_bad_caption_files_say_where(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"caption": "a cat"}\n{"text": "a dog"}\n')
    (tmp_path / "bad.csv").write_text("id,text\n1,a cat\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        fmt.read_captions(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no 'caption' column"):
        fmt.read_captions(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unsupported"):
        fmt.read_captions(tmp_path / "c.parquet")


def test_save_rows_uses_the_reference_keys(tmp_path):
    rows = [fmt.EditInstruction("a cat", "add a hat", "a cat in a hat")]
    path = save_rows_jsonl(rows, tmp_path / "rows.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"input": "a cat", "edit": "add a hat", "output": "a cat in a hat"}
    ]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["rows.jsonl"]


def test_empty_input_makes_no_requests(server):
    result = run(server, [])
    assert result.rows == [] and result.stats.requested == 0
    assert server.requests == []


def key_forms(key: str) -> dict[str, str]:
    """Ways a hostile endpoint may echo the key so that an exact-match redaction misses it."""
    return {"spaced": " ".join(f"Bearer {key}"), "split": f"{key[:11]}\n   {key[11:]}", "upper": key.upper(),
            "tab-split": "\t".join(key[i:i + 5] for i in range(0, len(key), 5)), "escaped": json.dumps(
                f"{key[:9]}\n{key[9:]}")}


def letters(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


@pytest.mark.parametrize("form", ["spaced", "split", "upper", "tab-split", "escaped"])
def test_an_echoed_key_in_any_form_is_redacted_and_never_kept(server, tmp_path, form):
    def echo(request: RecordedRequest) -> Reply:
        echoed = key_forms(request.headers["authorization"].removeprefix("Bearer "))[form]
        if request.caption() == "refused":
            return Reply.error(401, f"bad key {echoed}")
        return Reply.ok(f"add {echoed}\n%%\n{request.caption()} in snow")  # the key inside a well-formed row

    server.set_responder(echo)
    cache = tmp_path / "cache.jsonl"
    result = run(server, ["refused", "a cat"], cache_path=cache, mode="chat")
    assert result.rows == [] and result.stats.skipped.get(ins.QUOTED_KEY) == 1
    assert any(REDACTED in reason for reason in result.stats.reasons), result.stats.reasons
    seen = letters(json.dumps(result.stats.as_dict()) + repr(result))
    assert all(letters(SECRET)[i:i + 10] not in seen for i in range(len(letters(SECRET)) - 10)), seen
    assert not cache.exists(), "an answer quoting the key is never cached"


def test_localhost_is_reached_without_looking_the_name_up(server, monkeypatch):
    import socket

    asked = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or real(host, *a, **k))
    local = ins.Endpoint(model="fake-model", base_url=f"http://localhost:{server.port}/v1", api_key_env=KEY_ENV)
    result = ins.generate_instructions(["a cat"], local, mode="chat", retry=FAST_RETRY)
    assert result.stats.ok == 1 and server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert "localhost" not in asked and set(asked) <= {"127.0.0.1"}, asked
