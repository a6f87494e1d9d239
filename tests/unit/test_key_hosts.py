"""Where the API key may be sent: only to hosts the user chose outside the workflow."""

from __future__ import annotations

import pytest
from comfyui_ip2p.dataset.key_hosts import (
    ALLOWED_HOSTS_FILE,
    HOSTS_ENV,
    KeyDestinationError,
    check_key_destination,
    host_allowed,
    parse_hosts,
)


@pytest.mark.parametrize("url", [
    "https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "http://127.5.6.7/v1", "http://localhost:11434/v1",
    "http://[::1]:8000/v1", "https://API.OpenAI.com./v1",
])
def test_official_api_and_this_machine_are_allowed_with_no_setup(url, tmp_path):
    check_key_destination(url, tmp_path, "OPENAI_API_KEY", environ={})


@pytest.mark.parametrize("url", [
    "https://evil.example.com/v1", "https://api.openai.com.evil.example/v1", "http://10.0.0.5:8000/v1",
    "https://openai.com.attacker.net/v1", "http://0.0.0.0:8000/v1", "http://localhost.evil.example/v1",
])
def test_other_hosts_are_refused_with_the_file_to_edit(url, tmp_path):
    with pytest.raises(KeyDestinationError) as error:
        check_key_destination(url, tmp_path, "the environment variable OPENAI_API_KEY", environ={})
    message = str(error.value)
    assert str(tmp_path / ALLOWED_HOSTS_FILE) in message and "add a line" in message
    assert "OPENAI_API_KEY" in message


def test_the_users_file_and_environment_allow_more_hosts(tmp_path):
    (tmp_path / ALLOWED_HOSTS_FILE).write_text(
        "# my servers\nllm.lan  # vLLM box\nhttps://gpu.example.com:8443/v1\n.corp.example\n\n")
    for url in ("http://llm.lan:8000/v1", "https://gpu.example.com/v1", "https://a.b.corp.example/v1",
                "https://corp.example/v1"):
        check_key_destination(url, tmp_path, "k", environ={})
    with pytest.raises(KeyDestinationError):
        check_key_destination("https://notcorp.example/v1", tmp_path, "k", environ={})
    check_key_destination("http://10.0.0.5:8000/v1", tmp_path, "k", environ={HOSTS_ENV: "10.0.0.5, other"})
    with pytest.raises(KeyDestinationError):
        check_key_destination("http://10.0.0.6:8000/v1", tmp_path, "k", environ={HOSTS_ENV: "10.0.0.5"})


def test_hosts_parse_from_names_and_urls():
    assert parse_hosts(["A.Example.", "http://b.example:1/v1", " # c", ""]) == {"a.example", "b.example"}
    assert not host_allowed("example.com.evil", {"example.com"})
