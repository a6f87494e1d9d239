"""Issue 12 ("Trust"), the LLM part: the key only where it is meant to go, only real answers cached, failures
retried and never recorded as done, one bad row never stopping a build.

Everything goes over real HTTP to the pack's fake OpenAI server on 127.0.0.1 (testing/openai_server.py), through
ComfyUI's executor in this process, a real ComfyUI server, or the headless builder as a subprocess, with real
files. An endpoint that misbehaves per request is scripted with ScriptedResponder (per caption, in order).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from comfyui_ip2p.cli import build_dataset as bd
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset import sharding as sh
from comfyui_ip2p.dataset.formats import load_rows
from comfyui_ip2p.dataset.instruction_cache import cache_key
from comfyui_ip2p.dataset.instruction_format import Sampling, build_request
from comfyui_ip2p.dataset.instructions import ANSWER_ATTEMPTS, EMPTY, IDENTICAL, NOT_JSON, QUOTED_KEY, RetryPolicy
from comfyui_ip2p.dataset.node_stats import STATS_KEY
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer, RecordedRequest, Reply, ScriptedResponder
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip

TOO_LONG = "malformed output: too long (over 400 characters)"
NO_SEPARATOR = "malformed output: no separator"
RETRY = RetryPolicy(max_attempts=2, backoff_base=0.01, backoff_max=0.02)


# --- helpers -------------------------------------------------------------------------------------------------------

_NOT_ALNUM = bytes(b for b in range(256) if not (48 <= b <= 57 or 97 <= b <= 122))


def letters(data: bytes | str) -> bytes:
    """Only the ASCII letters and digits, lower-cased: spacing, line breaks, escapes and case no longer matter.
    (bytes.translate: files under the base folder include checkpoints of many megabytes.)"""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return raw.lower().translate(None, _NOT_ALNUM)


def holds_key(data: bytes | str, key: str) -> bool:
    """Whether `data` holds any 12-letter run of the key, in any spacing, split or case."""
    body, wanted = letters(data), letters(key)
    return any(wanted[i:i + 12] in body for i in range(len(wanted) - 11))


def files_holding_key(key: str, *roots: Path) -> list[str]:
    return [str(path) for root in roots for path in root.rglob("*")
            if path.is_file() and not path.is_symlink() and holds_key(path.read_bytes(), key)]


def graph(base_url: str, captions: list[str], **overrides) -> dict:
    inputs = {"captions": "\n".join(captions), "captions_file": "none", "base_url": base_url, "model": "fake-model",
              "mode": "chat", "api_key_env": "", "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1,
              "max_tokens": 256, "concurrency": 2, "cache": True, "request_seed": 0, **overrides}
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def cache_file(comfy_base: Path) -> Path:
    return comfy_base / "output" / "ip2p_cache" / "instructions.jsonl"


def cache_lines(comfy_base: Path) -> list[dict]:
    lines = []
    for line in cache_file(comfy_base).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # test_disk_full leaves a torn line in the session's shared cache on purpose
    return lines


def node_key(base_url: str, caption: str) -> str:
    """The cache key the node uses for `caption` with graph()'s settings."""
    sampling = Sampling(temperature=0.7, frequency_penalty=0.1, max_tokens=256, seed=None)
    return cache_key("chat", base_url, build_request("chat", "fake-model", caption, sampling))


@pytest.fixture()
def quick(comfy_nodes, monkeypatch):
    """The dataset nodes' module as ComfyUI loaded it (custom_nodes/), its LLM retries and timeout shortened."""
    nodes_module = sys.modules[comfy_nodes["GenerateEditInstructions"].__module__]
    monkeypatch.setattr(nodes_module.instructions, "LLM_RETRY", RETRY)
    monkeypatch.setattr(nodes_module.instructions, "LLM_TIMEOUT_S", 2.0)
    return nodes_module


@pytest.fixture()
def key_file(comfy_base):
    key = f"sk-trust-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
    folder = comfy_base / "user" / "__ip2p_keys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trust_{uuid.uuid4().hex[:8]}.key"
    path.write_text(key + "\n")
    yield key, path.name
    path.unlink()


@pytest.fixture()
def lookups(monkeypatch) -> list[str]:
    """Every host name this process asks the system to resolve."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        asked.append(host.decode() if isinstance(host, bytes) else str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return asked


# --- the key: only where it is meant to go --------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.localhost", "localhost.", "a.b.localhost"])
def test_names_that_dns_would_resolve_never_get_the_key_nor_a_lookup(quick, key_file, lookups, host):
    _, name = key_file
    with FakeOpenAIServer() as llm:
        result = run_prompt(graph(f"http://{host}:{llm.port}/v1", ["a cat"], api_key_file=name))
        assert llm.requests == []
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("GenerateEditInstructions: ") and "a host you have not allowed" in message, message
    assert f"add a line '{host}'" in message
    assert not any(host.rstrip(".") in asked.rstrip(".") for asked in lookups), lookups


def test_localhost_gets_the_key_without_any_name_lookup(quick, key_file, lookups):
    key, name = key_file
    with FakeOpenAIServer() as llm:
        result = run_prompt(graph(f"http://localhost:{llm.port}/v1", [f"a cat {uuid.uuid4().hex[:6]}"],
                                  api_key_file=name, cache=False))
        sent = {r.headers["authorization"] for r in llm.requests}
    assert result.ok, result.error
    assert sent == {f"Bearer {key}"}
    assert "localhost" not in lookups and set(lookups) <= {"127.0.0.1"}, lookups


@pytest.mark.parametrize("url", ["http://api.openai.com:8080/v1", "http://0.0.0.0:{port}/v1"])
def test_a_key_over_plain_http_to_another_machine_is_refused_even_when_listed(quick, key_file, comfy_base, url):
    key, name = key_file
    allowed = comfy_base / "user" / "__ip2p_keys" / "allowed_hosts.txt"
    allowed.write_text("api.openai.com\n0.0.0.0\n")
    try:
        with FakeOpenAIServer() as llm:
            result = run_prompt(graph(url.format(port=llm.port), ["a cat"], api_key_file=name))
            assert llm.requests == []
    finally:
        allowed.unlink()
    message = result.error["exception_message"]
    assert message.startswith("GenerateEditInstructions: ") and "only over https" in message, message
    assert "change base_url to https://" in message and not holds_key(message, key)


# --- the key echoed back: in no form anywhere -----------------------------------------------------------------------

ECHOES = {
    "spaced 401": lambda key: Reply.error(401, f"bad key: {' '.join('Bearer ' + key)}"),
    "split 401": lambda key: Reply.error(401, f"bad key: {key[:14]}\n  {key[14:30]}\r\n{key[30:]}"),
    "upper-case 401": lambda key: Reply.error(401, f"bad key: {key.upper()}"),
    "spaced in the answer": lambda key: Reply.ok(f"add {' '.join(key)}\n%%\na cat in snow"),
    "upper-case in the answer": lambda key: Reply.ok(f"add snow\n%%\na cat in snow by {key.upper()}"),
}


@pytest.mark.parametrize("echo", list(ECHOES))
def test_an_endpoint_echoing_the_key_in_any_form_leaks_it_nowhere(quick, comfy_base, key_file, caplog, capfd, echo):
    key, name = key_file
    caplog.set_level(logging.DEBUG)

    def respond(request: RecordedRequest) -> Reply:
        return ECHOES[echo](request.headers.get("authorization", "").removeprefix("Bearer "))

    with FakeOpenAIServer(responder=respond) as llm:
        result = run_prompt(graph(llm.base_url, [f"a cat {uuid.uuid4().hex[:6]}"], api_key_file=name))
        assert {r.headers["authorization"] for r in llm.requests} == {f"Bearer {key}"}
    assert not result.ok
    message = result.error["exception_message"]
    assert "no usable instructions" in message
    assert ("HTTP 401" in message and "[redacted]" in message) or QUOTED_KEY in message, message
    seen = json.dumps(result.error) + json.dumps(result.outputs) + json.dumps([d for _, d in result.events],
                                                                             default=str)
    assert not holds_key(seen, key), seen
    assert not holds_key(caplog.text, key)
    out, err = capfd.readouterr()
    assert not holds_key(out + err, key)
    assert files_holding_key(key, comfy_base / "output", comfy_base / "temp") == []


@pytest.mark.server
def test_over_http_a_spaced_echo_of_the_key_stays_out_of_history_and_files(comfy_server, comfy_base, key_file):
    key, name = key_file

    def respond(request: RecordedRequest) -> Reply:
        sent = request.headers.get("authorization", "")
        return Reply.json({"error": {"message": f"Incorrect API key provided: {' '.join(sent)}"}}, status=401,
                          headers={"WWW-Authenticate": " ".join(sent)})

    with FakeOpenAIServer(responder=respond) as llm:
        prompt_id = comfy_server.queue(graph(llm.base_url, [f"a dog {uuid.uuid4().hex[:6]}"], api_key_file=name,
                                             concurrency=1))
        deadline = time.monotonic() + 120
        while not (entry := comfy_server.get(f"/history/{prompt_id}").get(prompt_id)):
            assert time.monotonic() < deadline, "the prompt did not finish"
            time.sleep(0.3)
        assert llm.requests
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and "[redacted]" in errors[0]["exception_message"]
    assert not holds_key(json.dumps(comfy_server.get("/history")), key)
    key_path = str(comfy_base / "user" / "__ip2p_keys" / name)
    assert files_holding_key(key, comfy_base) == [key_path], "the server log is under the base too"


@pytest.mark.server
def test_over_http_unknown_loopback_names_and_plain_http_never_get_the_key(comfy_server, comfy_base, key_file):
    """Rows 7 and 8 of the issue through a real server: `*.localhost`, a trailing-dot `localhost.` and http to a
    listed remote host are all refused before any request, and the key is in no message."""
    key, name = key_file
    allowed = comfy_base / "user" / "__ip2p_keys" / "allowed_hosts.txt"
    allowed.write_text("api.openai.com\n")
    try:
        with FakeOpenAIServer() as llm:
            urls = {f"http://evil.localhost:{llm.port}/v1": "a host you have not allowed",
                    f"http://localhost.:{llm.port}/v1": "a host you have not allowed",
                    "http://api.openai.com:8080/v1": "only over https"}
            for url, expected in urls.items():
                prompt_id = comfy_server.queue(graph(url, [f"a cat {uuid.uuid4().hex[:6]}"], api_key_file=name))
                deadline = time.monotonic() + 120
                while not (entry := comfy_server.get(f"/history/{prompt_id}").get(prompt_id)):
                    assert time.monotonic() < deadline, "the prompt did not finish"
                    time.sleep(0.3)
                errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
                assert errors and expected in errors[0]["exception_message"], (url, errors)
            assert llm.requests == [], "nothing may reach the endpoint"
    finally:
        allowed.unlink()
    assert not holds_key(json.dumps(comfy_server.get("/history")), key)


# --- the cache: only real answers, as parsed rows -------------------------------------------------------------------

def test_only_good_answers_are_cached_and_a_rerun_asks_only_for_the_missing(quick, comfy_base):
    tag = uuid.uuid4().hex[:8]
    c = [f"a photo of thing {i} {tag}" for i in range(7)]
    script = ScriptedResponder({c[0]: ["malformed", "not_json", "good"],  # good on the third ask
                                c[1]: ["malformed"], c[2]: ["not_json"], c[3]: ["empty"], c[4]: ["identical"],
                                c[5]: ["too_long"], c[6]: ["good"]})
    with FakeOpenAIServer(responder=script) as llm:
        result = run_prompt(graph(llm.base_url, c))
        assert result.ok, result.error
        text = result.outputs["1"]["text"][0]
        stats = result.outputs["1"][STATS_KEY][0]
        asked = dict(script.asked)

        assert asked == {c[0]: 3, c[6]: 1, **dict.fromkeys(c[1:6], ANSWER_ATTEMPTS)}, "unusable answers are re-asked"
        assert (stats["ok"], stats["fetched"], stats["cached"], stats["unanswered"]) == (2, 2, 0, 4)
        assert stats["skipped"] == {NO_SEPARATOR: 1, NOT_JSON: 1, EMPTY: 1, IDENTICAL: 1, TOO_LONG: 1}
        # The text says what the data says.
        assert text.startswith("2 rows from 7 captions (0 cached, 2 fetched)"), text
        for reason, count in stats["skipped"].items():
            assert f"{reason} {count}" in text
        assert f"skipped: {c[5]!r}: {TOO_LONG}" in text, "a too-long answer is named, not dropped silently"
        assert "4 captions got no usable answer" in text and "asked again on the next run" in text

        mine = [line for line in cache_lines(comfy_base) if tag in line.get("caption", "")]
        assert sorted(line["caption"] for line in mine) == sorted([c[0], c[6]]), "only real answers are cached"
        assert all(set(line) >= {"key", "instruction", "output"} and "text" not in line for line in mine)

        # The endpoint is fixed: a rerun asks exactly the captions without a cached answer, identical one included
        # (the node never records a caption as answered unless it gave a row).
        llm.reset()
        fixed = ScriptedResponder({})
        llm.set_responder(fixed)
        rerun = run_prompt(graph(llm.base_url, c))
        assert rerun.ok and sorted(fixed.asked) == sorted(c[1:6])
        assert rerun.outputs["1"][STATS_KEY][0]["cached"] == 2
        assert rerun.outputs["1"]["text"][0].startswith("7 rows from 7 captions (2 cached, 5 fetched)")


def test_a_cache_written_by_hand_with_a_malformed_answer_is_ignored(quick, comfy_base):
    tag = uuid.uuid4().hex[:8]
    caption = f"a red barn {tag}"
    with FakeOpenAIServer() as llm:
        key = node_key(llm.base_url, caption)
        path = cache_file(comfy_base)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + json.dumps({"key": key, "text": f"sink it {tag}", "finish_reason": "stop"}) + "\n")
            f.write(json.dumps({"key": key, "instruction": "", "output": caption, "caption": caption}) + "\n")
        result = run_prompt(graph(llm.base_url, [caption]))
        assert result.ok, result.error
        assert [r.caption() for r in llm.requests] == [caption], "the poisoned entries are not an answer"
    assert result.outputs["1"][STATS_KEY][0]["ignored_cache"] == 1
    assert f"sink it {tag}" not in path.read_text(encoding="utf-8"), "raw text of an older version is removed"


# --- one bad row never stops a node -------------------------------------------------------------------------------

def test_p2p_skips_a_caption_the_text_encoder_refuses_and_draws_the_others(quick, tiny_t2i_ckpt):
    tag = uuid.uuid4().hex[:8]
    hostile = "snow " * 2000 + tag
    captions = [f"a red car {tag}", hostile, f"a blue boat {tag}"]

    def respond(request: RecordedRequest) -> Reply:
        caption = request.caption()
        return Reply.ok(f"add snow\n%%\n{caption if len(caption) < 200 else 'a field of snow'}, in snow")

    with FakeOpenAIServer(responder=respond) as llm:
        prompt = {**graph(llm.base_url, captions),
                  "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_t2i_ckpt}},
                  "4": {"class_type": "P2PPairGenerator", "inputs": {
                      "model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2], "rows": ["1", 0], "samples_per_pair": 1,
                      "steps": 1, "width": 64, "height": 64, "seed": 0, "p_min": 0.1, "p_max": 0.9, "cfg_min": 7.5,
                      "cfg_max": 7.5, "sampler_name": "euler", "scheduler": "normal", "batch_size": 4}},
                  "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}}}
        result = run_prompt(prompt)
    assert result.ok, result.error
    stats = result.outputs["4"][STATS_KEY][0]
    assert (stats["pairs"], stats["rows"]) == (3, 2)
    assert stats["skipped"] == {"caption refused by the text encoder": 1}
    assert len(result.outputs["5"]["images"]) == 2, "the two good pairs were drawn"
    text = result.outputs["4"]["text"][0]
    assert text.startswith("2 image pairs from 3 caption pairs; skipped by reason: caption refused by the text "
                           "encoder 1"), text
    assert f"({len(hostile)} characters)': caption refused by the text encoder: the text fills" in text


def test_clip_filter_skips_a_row_whose_image_does_not_decode(quick, comfy_base, tiny_clip):
    from comfyui_ip2p.dataset.clip_filter import ClipFilterConfig
    from comfyui_ip2p.dataset.records import EditRow
    from PIL import Image

    work = quick.clip_work  # pipeline/clip_filter.py as ComfyUI loaded it
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    rows = [EditRow("a red square", "make it blue", "a blue square", image, image, seed=0, group="a"),
            EditRow("a broken file", "fix it", "a fixed file", b"\x89PNG\r\n\x1a\nnot really", image, seed=1,
                    group="b"),
            EditRow("a red square 2", "make it green", "a green square", image, image, seed=2, group="c")]
    kept, report = work.filter_rows(rows, tiny_clip, ClipFilterConfig(-1, -1, -1, -1, None), batch_size=2)
    assert [r.input_caption for r in kept] == ["a red square", "a red square 2"]
    assert "skipped row 1 ('a broken file'): image does not decode" in report, report


# --- the headless builder: partial exits, reruns, one bad row -------------------------------------------------------

def build(base: Path, llm: FakeOpenAIServer, captions: Path, name: str, ckpt: str, clip: str, tmp_path: Path,
          *extra: str) -> subprocess.CompletedProcess:
    key = tmp_path / "key"
    if not key.exists():
        key.write_text(f"sk-build-{uuid.uuid4().hex}")
    cmd = [sys.executable, "-m", "comfyui_ip2p.cli.build_dataset", "--captions", str(captions), "--name", name,
           "--checkpoint", ckpt, "--base-url", llm.base_url, "--model", "fake-model", "--api-key-file", str(key),
           "--clip-weights", clip, "--samples-per-pair", "1", "--steps", "1", "--size", "64", "--batch-size", "4",
           "--min-sim-0", "-1", "--min-sim-1", "-1", "--min-sim-dir", "-1", "--min-sim-image", "-1",
           "--base-dir", str(base), *extra]
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def tiny_clip(comfy_base) -> str:
    return write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip_trust", seed=3)


@pytest.mark.slow
def test_builder_exits_partial_and_a_rerun_asks_exactly_the_missing(comfy_base, tiny_t2i_ckpt, tiny_clip, tmp_path):
    tag = uuid.uuid4().hex[:8]
    c = [f"a photo of a {thing} {tag}" for thing in ("cat", "dog", "bird", "fish")]
    (tmp_path / "captions.txt").write_text("\n".join(c) + "\n")
    name = f"trust/partial_{tag}"
    layout = sh.Layout(comfy_base / "output", name)
    # Chunk 1 holds c0, c1: no usable answer (format), so it is not recorded as done. Chunk 2 holds c2 (an edit
    # identical to its caption after every ask: the paper drops it) and c3 (good): recorded as done.
    script = ScriptedResponder({c[0]: ["malformed"], c[1]: ["not_json", "empty"], c[2]: ["identical"]})
    with FakeOpenAIServer(responder=script) as llm:
        first = build(comfy_base, llm, tmp_path / "captions.txt", name, tiny_t2i_ckpt, tiny_clip, tmp_path,
                      "--chunk-size", "2")
        output = first.stdout + first.stderr
        assert first.returncode == bd.EXIT_PARTIAL, output[-4000:]
        assert "LLM (0 cached, 0 fetched), 2 captions to ask again" in first.stdout, first.stdout
        assert "LLM (0 cached, 1 fetched)" in first.stdout and f"{IDENTICAL} 1" in first.stdout
        assert f"GenerateEditInstructions: {c[0]!r}: {NO_SEPARATOR}" in first.stdout
        assert f"GenerateEditInstructions: {c[1]!r}: {EMPTY}" in first.stdout
        assert f"GenerateEditInstructions: {c[2]!r}: {IDENTICAL}" in first.stdout
        assert "2 captions got no usable LLM answer" in first.stderr and "asks exactly those captions" in first.stderr
        assert sorted({r.input_caption for r in load_rows(layout.merged)}) == [c[3]]
        mine = [line for line in cache_lines(comfy_base) if tag in line.get("caption", "")]
        assert [line["caption"] for line in mine] == [c[3]], "only the good answer is cached"
        assert set(sh.read_json(layout.progress(0))["chunks"]) == {"1"}, "the unanswered chunk is not done"

        llm.reset()
        fixed = ScriptedResponder({})  # the endpoint recovered
        llm.set_responder(fixed)
        second = build(comfy_base, llm, tmp_path / "captions.txt", name, tiny_t2i_ckpt, tiny_clip, tmp_path,
                       "--chunk-size", "2")
    assert second.returncode == bd.EXIT_OK, (second.stdout + second.stderr)[-4000:]
    assert sorted(fixed.asked) == sorted(c[:2]), "the rerun asks exactly the captions without an answer"
    assert sorted({r.input_caption for r in load_rows(layout.merged)}) == sorted([c[0], c[1], c[3]])
    assert "asks exactly" not in second.stderr


@pytest.mark.slow
def test_one_hostile_caption_is_skipped_and_every_other_row_is_merged(comfy_base, tiny_t2i_ckpt, tiny_clip,
                                                                      tmp_path):
    tag = uuid.uuid4().hex[:8]
    hostile = "snow " * 2000 + tag  # 10k characters, ~27 CLIP windows: P2PPairGenerator refuses it
    good = [f"a photo of thing {i} {tag}" for i in range(9)]
    captions = [*good[:4], hostile, *good[4:]]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    name = f"trust/hostile_{tag}"
    layout = sh.Layout(comfy_base / "output", name)

    def respond(request: RecordedRequest) -> Reply:
        # A short, well-formed answer even for the hostile caption, so that a later node has to refuse it.
        caption = request.caption()
        return Reply.ok(f"add snow\n%%\n{caption if len(caption) < 200 else 'a field of snow'}, covered in snow")

    with FakeOpenAIServer(responder=respond) as llm:
        # Chunk 1: four good captions and the hostile one; chunk 2: the other five.
        done = build(comfy_base, llm, tmp_path / "captions.txt", name, tiny_t2i_ckpt, tiny_clip, tmp_path,
                     "--chunk-size", "5")
    output = done.stdout + done.stderr
    assert done.returncode == bd.EXIT_PARTIAL, output[-4000:]
    assert sorted({r.input_caption for r in load_rows(layout.merged)}) == sorted(good), "every other row merged"
    assert "skipped 1 rows, by reason: caption refused by the text encoder 1" in done.stdout, done.stdout
    listed = rf"P2PPairGenerator: 'snow snow .*\({len(hostile)} characters\)': caption refused by the text encoder: "
    assert re.search(listed + r"the text fills \d+ CLIP windows", done.stdout), done.stdout
    assert "1 rows were refused by a node" in done.stderr and "asks exactly" not in done.stderr
    assert len(sh.read_json(layout.progress(0))["chunks"]) == 2, "every chunk ran and was recorded"
