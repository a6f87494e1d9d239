"""Faults of the LLM endpoint, end to end: GenerateEditInstructions run by ComfyUI's executor against a real HTTP
server (FakeOpenAIServer) that misbehaves for some captions. The run degrades and says why, every answer that
arrived stays in the disk cache, and a rerun after the endpoint recovers asks only for what is missing."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Callable

import pytest
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset.instructions import RetryPolicy
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer, RecordedRequest, Reply, snow_responder

TIMEOUT_S = 0.5  # the node's per-request timeout during these tests (60 s in production)
RETRY = RetryPolicy(max_attempts=3, backoff_base=0.02, backoff_max=0.05, retry_after_max=1.0)

# fault name -> (the reply the endpoint sends for a faulty caption, words the summary must use for it)
FAULTS: dict[str, tuple[Reply, str]] = {
    "429 with Retry-After": (Reply.rate_limited(retry_after=0.05), "rate limited (HTTP 429)"),
    "429 without Retry-After": (Reply.rate_limited(), "rate limited (HTTP 429)"),
    "500": (Reply.server_error(500), "server error (HTTP 500)"),
    "502": (Reply.server_error(502), "server error (HTTP 502)"),
    "503": (Reply.server_error(503), "server error (HTTP 503)"),
    "timeout": (Reply.ok("late\n%%\ntoo late").after(TIMEOUT_S + 0.5), "timed out"),
    "closed mid-response": (Reply.disconnect(), "connection"),
    "malformed JSON": (Reply.malformed_json(), "invalid response"),
    "HTML garbage": (Reply.garbage(), "not JSON"),
    "no choices": (Reply.json({"id": "x", "object": "chat.completion", "choices": []}), "not a completion"),
    "empty content": (Reply.ok(""), "empty answer"),
}


@pytest.fixture()
def fast_llm_settings(comfy_nodes, monkeypatch):
    # The module ComfyUI loaded the pack from (custom_nodes/), not a second import of it under another name.
    work = sys.modules[comfy_nodes["GenerateEditInstructions"].__module__].instructions
    monkeypatch.setattr(work, "LLM_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(work, "LLM_RETRY", RETRY)


@pytest.fixture()
def llm(fast_llm_settings):
    with FakeOpenAIServer() as server:
        yield server


def graph(server: FakeOpenAIServer, captions: list[str], cache: bool = True) -> dict:
    inputs = {"captions": "\n".join(captions), "captions_file": "none", "base_url": server.base_url,
              "model": "fake-model", "mode": "chat", "api_key_env": "", "api_key_file": "", "temperature": 0.7,
              "frequency_penalty": 0.1, "max_tokens": 256, "concurrency": 2, "cache": cache, "request_seed": 0}
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def summary_of(result) -> str:
    assert result.ok, result.error
    return result.outputs["2"]["text"][0]


def faulty_for(bad: set[str], reply: Reply) -> Callable[[RecordedRequest], Reply]:
    """The endpoint fails (every attempt) for the captions in `bad` and answers the others."""
    return lambda request: reply if request.caption() in bad else snow_responder(request)


def captions_of(tag: str, count: int) -> list[str]:
    return [f"a photo of thing {i} {tag}" for i in range(count)]


def cache_lines(comfy_base) -> list[dict]:
    """The cache's whole lines. The session's cache is shared with test_disk_full, which leaves one line torn
    by a full disk on purpose (the cache skips it too), so a line that is not JSON is passed over here."""
    path = comfy_base / "output" / "ip2p_cache" / "instructions.jsonl"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


@pytest.mark.parametrize("fault", list(FAULTS))
def test_partial_failure_degrades_reports_and_a_rerun_asks_only_for_the_missing(comfy_nodes, comfy_base, llm,
                                                                                 fault):
    reply, words = FAULTS[fault]
    captions = captions_of(uuid.uuid4().hex[:8], 4)
    bad = {captions[1], captions[3]}
    llm.set_responder(faulty_for(bad, reply))

    summary = summary_of(run_prompt(graph(llm, captions)))
    assert summary.startswith("2 rows from 4 captions"), summary
    assert "failed 2" in summary or "malformed 2" in summary, summary
    assert "2 captions got no usable answer" in summary, summary
    assert words in summary, summary
    assert "asked again on the next run" in summary, summary
    asked = {r.caption() for r in llm.requests}
    assert asked == set(captions)

    cached = [line for line in cache_lines(comfy_base) if line.get("caption") in set(captions)]
    assert {line["caption"] for line in cached} == set(captions) - bad, "only real answers are cached"
    before = {line["key"]: line for line in cached}

    llm.reset()
    llm.set_responder(snow_responder)  # the endpoint recovers
    summary = summary_of(run_prompt(graph(llm, captions)))
    assert summary.startswith("4 rows from 4 captions (2 cached, 2 fetched)"), summary
    assert sorted(r.caption() for r in llm.requests) == sorted(bad), "only the missing captions are asked for"
    after = {line["key"]: line for line in cache_lines(comfy_base) if line.get("caption") in set(captions)}
    assert len(after) == 4
    assert all(after[key] == line for key, line in before.items()), "answers already cached are kept unchanged"


def test_an_answer_cut_at_max_tokens_is_asked_again_reported_and_never_cached(comfy_nodes, comfy_base, llm):
    from comfyui_ip2p.dataset.instructions import ANSWER_ATTEMPTS

    captions = captions_of(uuid.uuid4().hex[:8], 3)
    cut = Reply.ok("add snow\n%%\na photo covered in", finish_reason="length")
    llm.set_responder(faulty_for({captions[0]}, cut))
    summary = summary_of(run_prompt(graph(llm, captions)))
    assert summary.startswith("2 rows from 3 captions") and "malformed 1" in summary, summary
    assert "truncated at max_tokens" in summary and "raise max_tokens" in summary, summary
    assert sum(r.caption() == captions[0] for r in llm.requests) == ANSWER_ATTEMPTS
    assert captions[0] not in {line.get("caption") for line in cache_lines(comfy_base)}
    # A cut answer is no real answer: it is not cached, and the rerun asks for it again.
    llm.reset()
    llm.set_responder(snow_responder)
    summary = summary_of(run_prompt(graph(llm, captions)))
    assert [r.caption() for r in llm.requests] == [captions[0]] and "(2 cached, 1 fetched)" in summary, summary


@pytest.mark.parametrize(("fault", "advice"), [
    ("503", "wait and run again"),
    ("429 without Retry-After", "lower concurrency"),
    ("timeout", "wait and run again"),
    ("HTML garbage", "check base_url"),
])
def test_nothing_succeeded_fails_naming_the_node_and_what_to_do(comfy_nodes, llm, fault, advice):
    reply, words = FAULTS[fault]
    captions = captions_of(uuid.uuid4().hex[:8], 2)
    llm.set_responder(lambda request: reply)
    result = run_prompt(graph(llm, captions))
    assert not result.ok
    message = result.error["exception_message"]
    assert result.error["node_type"] == "GenerateEditInstructions"
    assert message.startswith("GenerateEditInstructions: no usable instructions: 0 rows from 2 captions"), message
    assert words in message and advice in message, message


def test_nothing_succeeded_reaches_a_program_as_data_the_builder_counts(comfy_nodes, llm, caplog):
    """The canvas shows the message above; a program gets the same failure as data: the error's class (matched
    by name: ComfyUI runs its own copy of the pack) and the counts it carries. The builder reads nothing else."""
    from comfyui_ip2p.cli import build_dataset as bd
    from comfyui_ip2p.dataset.instructions import NoUsableInstructionsError

    captions = captions_of(uuid.uuid4().hex[:8], 2)
    llm.set_responder(lambda request: Reply.server_error(503))
    with caplog.at_level(logging.ERROR):
        result = run_prompt(graph(llm, captions), handled=(NoUsableInstructionsError,))
    assert not result.ok and result.error["exception_type"].endswith("IP2PNodeError"), result.error
    assert result.error["exception_message"].startswith("GenerateEditInstructions: no usable instructions")
    empty = result.raised(NoUsableInstructionsError)
    assert empty is not None, result.exception
    assert (empty.stats["requested"], empty.stats["failed"], empty.stats["unanswered"]) == (2, 2, 2)
    outcome = bd.chunk_outcome(result, {bd.LLM: "1"})
    assert (outcome.complete, outcome.new_rows, outcome.unanswered, outcome.fetched) == (False, 0, 2, 0)
    assert "server error (HTTP 503)" in outcome.note, outcome.note
    assert "Exception during processing" not in caplog.text, "a failure the caller handles is not logged as a crash"


def test_retry_after_is_waited_for_then_the_answer_arrives(comfy_nodes, llm):
    captions = captions_of(uuid.uuid4().hex[:8], 1)
    llm.enqueue(Reply.rate_limited(retry_after=0.4), Reply.server_error(503))
    summary = summary_of(run_prompt(graph(llm, captions, cache=False)))
    assert summary.startswith("1 rows from 1 captions"), summary
    first, second, third = llm.requests
    assert second.received_at - first.received_at >= 0.35, "Retry-After: 0.4 must be honoured"
    assert third.received_at - second.received_at < 0.35
