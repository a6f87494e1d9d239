"""The LLM API key goes to the endpoint and nowhere else: not into saved workflows (UI or API format), PNG
metadata, dataset files of any format, the answer cache, /history, the server's log, our logs, error messages
(also when a hostile endpoint echoes the key in its 401 body) or what the headless builder prints and writes.
Every file under the base folder is grepped for the key, its random part and its base64 form. api_key_env can
only name *_API_KEY variables, so a workflow cannot send other secrets (PATH, HOME, cloud credentials) anywhere."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.cli.workflow import ui_to_api
from comfyui_ip2p.dataset.instructions import RetryPolicy
from comfyui_ip2p.dataset.llm_client import PLACEHOLDER_KEY
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer, RecordedRequest, Reply, snow_responder
from comfyui_ip2p.testing.workflow_builder import UIWorkflow
from PIL import Image

CHUNK = 16 << 20


class Secret:
    """A distinctive key and the forms a leak of it could take."""

    def __init__(self, prefix: str = "sk-test-") -> None:
        self.random = uuid.uuid4().hex
        self.key = f"{prefix}{self.random}"
        # fragments too: a message cut in the middle of the key, or a server echoing part of it
        fragments = [self.random[i:i + 12].encode() for i in (0, 10, 20)]
        self.forms = [self.key.encode(), self.random.encode(), base64.b64encode(self.key.encode()),
                      base64.b64encode(self.key.encode()).rstrip(b"="), base64.urlsafe_b64encode(self.key.encode()),
                      *fragments]

    def found_in(self, data: bytes | str) -> bool:
        data = data.encode() if isinstance(data, str) else data
        return any(form in data for form in self.forms)


def files_holding(secret: Secret, *roots: Path) -> list[str]:
    """Every file under `roots` (big ones read in overlapping chunks) that holds any form of the secret."""
    found = []
    for root in roots:
        for here, _, files in os.walk(root, followlinks=False):
            for name in files:
                path = Path(here) / name
                # regular files only: a FIFO left by another test would block the read forever
                if stat.S_ISREG(path.lstat().st_mode) and holds(path, secret):
                    found.append(str(path))
    return found


def holds(path: Path, secret: Secret) -> bool:
    overlap = max(len(form) for form in secret.forms)
    tail = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            if secret.found_in(tail + chunk):
                return True
            tail = chunk[-overlap:]
    return False


def keyed_responder(key: str):
    """An endpoint that requires the key, and (like some real servers) echoes a wrong one in its 401 body."""

    def respond(request: RecordedRequest) -> Reply:
        sent = request.headers.get("authorization", "")
        if sent != f"Bearer {key}":
            return Reply.error(401, f"Incorrect API key provided: {sent.removeprefix('Bearer ')}")
        return snow_responder(request)

    return respond


def echoing_401(request: RecordedRequest) -> Reply:
    """A hostile endpoint: refuses every request, quoting the whole Authorization header back in its body."""
    sent = request.headers.get("authorization", "")
    return Reply.json({"error": {"message": f"Incorrect API key provided: {sent}", "type": "invalid_request_error",
                                 "code": "invalid_api_key", "header": sent}}, status=401,
                      headers={"WWW-Authenticate": f"Bearer realm={sent}"})


@pytest.fixture()
def key_file(comfy_base):
    """A fresh secret in user/__ip2p_keys/<name> (the only place key files are read from)."""
    secret = Secret()
    folder = comfy_base / "user" / "__ip2p_keys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"secret_{secret.random[:8]}.key"
    path.write_text(secret.key + "\n")
    yield secret, path.name
    path.unlink()


@pytest.fixture()
def quick_retries(monkeypatch):
    from comfyui_ip2p.pipeline import instructions as instruction_work
    monkeypatch.setattr(instruction_work, "LLM_RETRY", RetryPolicy(max_attempts=2, backoff_base=0.01, backoff_max=0.02))
    monkeypatch.setattr(instruction_work, "LLM_TIMEOUT_S", 2.0)


def instruction_inputs(base_url: str, **overrides) -> dict:
    return {"captions": f"a red car {uuid.uuid4().hex[:6]}\na blue house {uuid.uuid4().hex[:6]}",
            "captions_file": "none", "base_url": base_url, "model": "fake-model", "mode": "chat",
            "api_key_env": "", "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1, "max_tokens": 256,
            "concurrency": 1, "cache": True, "request_seed": 0, **overrides}


def instruction_graph(base_url: str, **overrides) -> dict:
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": instruction_inputs(base_url, **overrides)},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def partial_echo(cut: str):
    """A hostile endpoint whose 401 quotes the key padded so that a 200-character cut falls inside it, or
    only a part of it."""

    def respond(request: RecordedRequest) -> Reply:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        text = {"padded": "x" * 170 + key, "head": f"key {key[:20]}... is wrong",
                "middle": f"bad key ...{key[9:30]}..."}[cut]
        return Reply.json({"error": {"message": text}}, status=401)

    return respond


# --- In-process, through the executor: errors, logs, the cache --------------------------------------------------

def test_a_401_that_echoes_the_key_leaks_it_nowhere(comfy_nodes, comfy_base, key_file, quick_retries, caplog,
                                                     capfd):
    secret, name = key_file
    caplog.set_level(logging.DEBUG)  # stricter than ComfyUI's INFO: not even debug logs may hold the key
    with FakeOpenAIServer(responder=echoing_401) as llm:
        result = run_prompt(instruction_graph(llm.base_url, api_key_file=name))
        sent = {r.headers["authorization"] for r in llm.requests}
    assert sent == {f"Bearer {secret.key}"}, "the endpoint must have received (and echoed) the real key"
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("GenerateEditInstructions: no usable instructions") and "HTTP 401" in message
    assert "[redacted]" in message, "the echoed key is replaced, so the user still sees what went wrong"
    assert not secret.found_in(json.dumps(result.error)), "the key is in the error (message or traceback)"
    assert not secret.found_in(json.dumps([data for _, data in result.events], default=str))
    # Debug logs of the HTTP stack print response headers, where this endpoint echoes the key.
    assert not secret.found_in(caplog.text), [line for line in caplog.text.splitlines() if secret.found_in(line)]
    out, err = capfd.readouterr()
    assert not secret.found_in(out + err)
    assert files_holding(secret, comfy_base / "output", comfy_base / "temp") == []


@pytest.mark.parametrize("cut", ["padded", "head", "middle"])
def test_a_401_echoing_part_of_the_key_leaks_no_part(comfy_nodes, comfy_base, key_file, quick_retries, cut):
    secret, name = key_file
    with FakeOpenAIServer(responder=partial_echo(cut)) as llm:
        result = run_prompt(instruction_graph(llm.base_url, api_key_file=name))
        assert llm.requests, "the endpoint must have received the key"
    assert not result.ok and "HTTP 401" in result.error["exception_message"]
    assert "[redacted]" in result.error["exception_message"]
    assert not secret.found_in(json.dumps(result.error)), result.error["exception_message"]
    assert files_holding(secret, comfy_base / "output", comfy_base / "temp") == []


def test_a_workflow_cannot_send_the_key_to_a_host_the_user_did_not_allow(comfy_nodes, comfy_base, key_file):
    """A shared workflow sets base_url; the key goes only where the user allowed, in a file no workflow writes,
    and to another machine only over https (test_key_hosts checks a listed https host is let through).

    0.0.0.0 reaches this machine's server on Linux but is not a loopback name, so it stands for any other host.
    """
    secret, name = key_file
    allowed = comfy_base / "user" / "__ip2p_keys" / "allowed_hosts.txt"
    with FakeOpenAIServer(responder=keyed_responder(secret.key)) as llm:
        url = f"http://0.0.0.0:{llm.port}/v1"
        refused = run_prompt(instruction_graph(url, api_key_file=name))
        assert not refused.ok and not llm.requests, "no request may leave before the host is checked"
        message = refused.error["exception_message"]
        assert message.startswith("GenerateEditInstructions: ") and "'0.0.0.0'" in message
        assert str(allowed) in message and "add a line" in message
        assert not secret.found_in(json.dumps(refused.error))
        # keyless, the same workflow may go anywhere: there is nothing to steal (this endpoint then says 401)
        keyless = run_prompt(instruction_graph(url))
        assert "HTTP 401" in keyless.error["exception_message"] and "allowed_hosts" not in str(keyless.error)
        assert {r.headers["authorization"] for r in llm.requests} == {f"Bearer {PLACEHOLDER_KEY}"}
        llm.reset()
        # Listing the host is not enough over plain http: the key would cross the network unencrypted.
        allowed.write_text("# hosts I trust with my keys\n0.0.0.0\n")
        try:
            listed = run_prompt(instruction_graph(url, api_key_file=name))
        finally:
            allowed.unlink()
        assert not listed.ok and not llm.requests, "a key goes to another machine only over https"
        message = listed.error["exception_message"]
        assert message.startswith("GenerateEditInstructions: ") and "only over https" in message, message
        assert not secret.found_in(json.dumps(listed.error))


def test_a_key_that_is_not_one_header_token_is_refused_without_quoting_it(comfy_nodes, comfy_base, monkeypatch,
                                                                         caplog, capfd):
    """A key file with a comment line used to fail inside the HTTP client as "Illegal header value
    b'Bearer <key>\\n# comment'": the escaped key slipped past redaction into the error, log and /history."""
    caplog.set_level(logging.DEBUG)
    keys = comfy_base / "user" / "__ip2p_keys"
    keys.mkdir(parents=True, exist_ok=True)
    cases = {"second line": "{key}\n# my key for the LLM box", "space inside": "{key} extra",
             "tab inside": "{key}\tx", "non-ascii": "{key}\u00e9"}
    with FakeOpenAIServer() as llm:
        for case, text in cases.items():
            secret = Secret()
            (keys / "odd.key").write_text(text.format(key=secret.key))
            result = run_prompt(instruction_graph(llm.base_url, api_key_file="odd.key"))
            assert not result.ok, case
            message = result.error["exception_message"]
            assert message.startswith("GenerateEditInstructions: the API key in api_key_file 'odd.key' is not one "
                                      "line"), message
            assert "put only the key, on one line" in message
            assert not secret.found_in(json.dumps(result.error) + caplog.text), case
        # The same from an environment variable.
        secret = Secret()
        monkeypatch.setenv("IP2P_ODD_API_KEY", f"{secret.key}\nsecond")
        result = run_prompt(instruction_graph(llm.base_url, api_key_env="IP2P_ODD_API_KEY"))
        message = result.error["exception_message"]
        assert "the API key in the environment variable IP2P_ODD_API_KEY is not one line" in message
        assert not secret.found_in(json.dumps(result.error) + caplog.text)
        assert llm.requests == [], "a malformed key must be refused before any request"
    (keys / "odd.key").unlink()
    out, err = capfd.readouterr()
    assert "Illegal header value" not in out + err


@pytest.mark.parametrize("variable", ["PATH", "HOME", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "aws_secret_access_key",
                                      "OPENAI_API_KEY_BACKUP", "API_KEY_AWS", "X=1 OPENAI_API_KEY", "$OPENAI_API_KEY",
                                      "OPENAI_API_KEY\nAWS_SECRET_ACCESS_KEY"])
def test_api_key_env_cannot_name_other_secrets(comfy_nodes, monkeypatch, variable, caplog):
    value = f"not-an-llm-key-{uuid.uuid4().hex}"
    for name in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "aws_secret_access_key", "OPENAI_API_KEY_BACKUP",
                 "API_KEY_AWS"):
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as llm:
        result = run_prompt(instruction_graph(llm.base_url, api_key_env=variable))
        assert llm.requests == [], "nothing may be sent when the variable name is refused"
    message = result.error["exception_message"]
    assert message.startswith("GenerateEditInstructions: api_key_env must be the NAME of an environment variable "
                              "ending in API_KEY"), message
    for leaked in (value, os.environ["PATH"]):
        assert leaked not in json.dumps(result.error) and leaked not in caplog.text


# --- The real server, end to end ---------------------------------------------------------------------------------

def build_graph(object_info: dict, llm_url: str, key_name: str, ckpt: str, tag: str) -> dict:
    """The UI workflow the canvas would save: captions -> LLM -> pairs -> a dataset in every format + PNGs."""
    ui = UIWorkflow(object_info)
    gen = ui.add("GenerateEditInstructions", captions=f"a photo of a cat {tag}\na photo of a dog {tag}",
                 base_url=llm_url, model="fake-model", api_key_env="OPENAI_API_KEY", api_key_file=key_name,
                 concurrency=2)
    ckpt_node = ui.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pairs = ui.add("P2PPairGenerator", samples_per_pair=1, steps=1, width=64, height=64, batch_size=2)
    ui.connect(gen, 0, pairs, "rows")
    for slot, kind in enumerate(("model", "clip", "vae")):
        ui.connect(ckpt_node, slot, pairs, kind)
    for fmt in ("reference", "diffusers", "public"):
        save = ui.add("SaveEditDataset", dataset_name=f"secrets/{tag}_{fmt}", format=fmt, image_format="png")
        ui.connect(pairs, 0, save, "rows")
    image = ui.add("SaveImage", filename_prefix=f"secrets_{tag}")
    ui.connect(pairs, 2, image, "images")
    summary = ui.add("PreviewAny")
    ui.connect(gen, 1, summary, "source")
    return ui.build()


def queue_as_the_frontend_does(server, prompt: dict, workflow: dict) -> str:
    """POST /prompt with the UI workflow in extra_pnginfo, which SaveImage writes into every PNG."""
    body = {"prompt": prompt, "client_id": uuid.uuid4().hex, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    return server.post("/prompt", body)["prompt_id"]


def wait_done(server, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.3)
    raise TimeoutError(prompt_id)


@pytest.mark.server
@pytest.mark.slow
def test_end_to_end_the_key_reaches_only_the_endpoint(comfy_server, comfy_base, tiny_t2i_ckpt, key_file):
    secret, name = key_file
    tag = uuid.uuid4().hex[:8]
    with FakeOpenAIServer(responder=keyed_responder(secret.key)) as llm:
        info = comfy_server.get("/object_info")
        workflow = build_graph(info, llm.base_url, name, tiny_t2i_ckpt, tag)
        prompt = ui_to_api(workflow, info)
        entry = wait_done(comfy_server, queue_as_the_frontend_does(comfy_server, prompt, workflow))
        requests = llm.requests
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    assert len(requests) == 2 and {r.headers["authorization"] for r in requests} == {f"Bearer {secret.key}"}

    outputs = comfy_base / "output"
    datasets = [outputs / "secrets" / f"{tag}_{fmt}" for fmt in ("reference", "diffusers", "public")]
    assert all(sum(1 for p in d.rglob("*") if p.is_file()) >= 2 for d in datasets)
    pngs = sorted(outputs.glob(f"secrets_{tag}_*.png"))
    assert pngs, "SaveImage wrote no image"
    metadata = Image.open(pngs[0]).text
    assert {"prompt", "workflow"} <= set(metadata), "the PNG must carry the workflow for this check to mean much"
    assert not secret.found_in(json.dumps(metadata))
    assert (outputs / "ip2p_cache" / "instructions.jsonl").is_file()

    assert not secret.found_in(json.dumps(workflow)) and not secret.found_in(json.dumps(prompt))
    assert not secret.found_in(json.dumps(comfy_server.get("/history")))
    assert not secret.found_in(json.dumps(comfy_server.get("/queue")))
    # Every file under the base: datasets, PNGs, the answer cache, temp previews, user files, the server log.
    assert files_holding(secret, comfy_base) == [name_path(comfy_base, name)]


def name_path(base: Path, name: str) -> str:
    return str(base / "user" / "__ip2p_keys" / name)


@pytest.mark.server
def test_over_http_a_401_echoing_the_key_leaks_it_nowhere(comfy_server, comfy_base, key_file):
    secret, name = key_file
    with FakeOpenAIServer(responder=echoing_401) as llm:
        prompt_id = comfy_server.queue(instruction_graph(llm.base_url, api_key_file=name))
        entry = wait_done(comfy_server, prompt_id, timeout=120)
        assert {r.headers["authorization"] for r in llm.requests} == {f"Bearer {secret.key}"}
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and "HTTP 401" in errors[0]["exception_message"] and "[redacted]" in errors[0]["exception_message"]
    assert not secret.found_in(json.dumps(comfy_server.get("/history")))
    assert files_holding(secret, comfy_base) == [name_path(comfy_base, name)]  # the log is under the base too


@pytest.mark.slow
def test_headless_builder_with_a_key_echoing_endpoint_prints_and_writes_no_key(comfy_base, tiny_t2i_ckpt, tmp_path):
    secret = Secret()
    key_path = tmp_path / "key"
    key_path.write_text(secret.key)
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\na photo of a dog\n")
    name = f"secrets_build/ds_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    with FakeOpenAIServer(responder=echoing_401) as llm:
        done = subprocess.run(
            [sys.executable, "-m", "comfyui_ip2p.cli.build_dataset", "--captions", str(captions), "--name", name,
             "--checkpoint", tiny_t2i_ckpt, "--base-url", llm.base_url, "--model", "fake-model", "--api-key-file",
             str(key_path), "--samples-per-pair", "1", "--steps", "1", "--size", "64", "--base-dir", str(comfy_base)],
            capture_output=True, text=True, timeout=600, env={**env, "PYTHONUNBUFFERED": "1"})
        assert {r.headers["authorization"] for r in llm.requests} == {f"Bearer {secret.key}"}
    assert done.returncode != 0 and "HTTP 401" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert not secret.found_in(done.stdout + done.stderr)
    assert files_holding(secret, comfy_base) == []
