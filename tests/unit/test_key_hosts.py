"""Where the API key may be sent: only to hosts the user chose outside the workflow, never after a name lookup
for "this machine", and to other machines only over https."""

from __future__ import annotations

import socket

import pytest
from comfyui_ip2p.dataset.key_hosts import (
    ALLOWED_HOSTS_FILE,
    HOSTS_ENV,
    KeyDestinationError,
    check_key_destination,
    connect_url,
    host_allowed,
    is_loopback,
    parse_hosts,
)


@pytest.fixture()
def lookups(monkeypatch) -> list:
    """Every name resolution asked of the system (DNS included) while the test runs."""
    asked = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    monkeypatch.setattr(socket, "gethostbyname", lambda host: asked.append(host) or "127.0.0.1")
    return asked


@pytest.mark.parametrize("url", [
    "https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "http://127.5.6.7/v1", "http://localhost:11434/v1",
    "http://LOCALHOST:11434/v1", "http://[::1]:8000/v1", "http://[::ffff:127.0.0.1]:8000/v1",
])
def test_official_api_and_this_machine_are_allowed_with_no_setup(url, tmp_path, lookups):
    check_key_destination(url, tmp_path, "OPENAI_API_KEY", environ={})
    assert lookups == [], "deciding must not resolve any name"


@pytest.mark.parametrize("url", [
    "https://evil.example.com/v1", "https://api.openai.com.evil.example/v1", "https://10.0.0.5:8000/v1",
    "https://openai.com.attacker.net/v1", "http://0.0.0.0:8000/v1", "http://localhost.evil.example/v1",
    # Names that look like this machine but are resolved through DNS: whoever answers gets the key.
    "http://evil.localhost:8000/v1", "http://a.b.localhost/v1", "http://localhost.:8000/v1",
    "https://API.OpenAI.com./v1",
])
def test_other_hosts_are_refused_with_the_file_to_edit(url, tmp_path, lookups):
    with pytest.raises(KeyDestinationError) as error:
        check_key_destination(url, tmp_path, "the environment variable OPENAI_API_KEY", environ={})
    message = str(error.value)
    assert str(tmp_path / ALLOWED_HOSTS_FILE) in message and "add a line" in message
    assert "OPENAI_API_KEY" in message
    assert lookups == [], "a refused name must never be looked up"


@pytest.mark.parametrize("url", ["http://api.openai.com:8080/v1", "http://api.openai.com/v1",
                                 "http://llm.lan:8000/v1", "http://10.0.0.5:8000/v1"])
def test_a_key_to_another_machine_goes_only_over_https(url, tmp_path, lookups):
    (tmp_path / ALLOWED_HOSTS_FILE).write_text("llm.lan\n10.0.0.5\n")
    with pytest.raises(KeyDestinationError) as error:
        check_key_destination(url, tmp_path, "OPENAI_API_KEY", environ={})
    message = str(error.value)
    assert "over http://" in message and "only over https" in message and "https://" in message
    check_key_destination(url.replace("http://", "https://"), tmp_path, "OPENAI_API_KEY", environ={})
    assert lookups == []


def test_the_users_file_and_environment_allow_more_hosts(tmp_path):
    (tmp_path / ALLOWED_HOSTS_FILE).write_text(
        "# my servers\nllm.lan  # vLLM box\nhttps://gpu.example.com:8443/v1\n.corp.example\nbox.lan.\n\n")
    for url in ("https://llm.lan:8000/v1", "https://gpu.example.com/v1", "https://a.b.corp.example/v1",
                "https://corp.example/v1", "https://box.lan./v1"):
        check_key_destination(url, tmp_path, "k", environ={})
    for url in ("https://notcorp.example/v1", "https://llm.lan./v1", "https://box.lan/v1"):
        with pytest.raises(KeyDestinationError):
            check_key_destination(url, tmp_path, "k", environ={})
    check_key_destination("https://10.0.0.5:8000/v1", tmp_path, "k", environ={HOSTS_ENV: "10.0.0.5, other"})
    with pytest.raises(KeyDestinationError):
        check_key_destination("https://10.0.0.6:8000/v1", tmp_path, "k", environ={HOSTS_ENV: "10.0.0.5"})


def test_hosts_parse_from_names_and_urls():
    # Exactly as written: a trailing dot is another name (resolved differently, e.g. without search domains).
    assert parse_hosts(["A.Example.", "http://b.example:1/v1", " # c", ""]) == {"a.example.", "b.example"}
    assert not host_allowed("example.com.evil", {"example.com"})


def test_loopback_is_decided_from_the_text_alone(lookups):
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not any(is_loopback(name) for name in ("localhost.", "x.localhost", "localhost.localdomain", "0.0.0.0",
                                                  "127.0.0.1.nip.io"))
    assert lookups == []


def test_localhost_is_connected_as_127_0_0_1():
    assert connect_url("http://localhost:8000/v1") == "http://127.0.0.1:8000/v1"
    assert connect_url("http://LocalHost/v1?x=1") == "http://127.0.0.1/v1?x=1"
    assert connect_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    assert connect_url("http://x.localhost:1/v1") == "http://x.localhost:1/v1"
