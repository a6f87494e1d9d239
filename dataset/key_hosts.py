"""Which hosts may receive the user's API key.

A shared workflow sets `base_url`, but the key belongs to whoever runs it. Without a rule, a workflow posted
online could point base_url at its author's server and collect the key of everyone who queues it. So a key is
sent only to hosts the user chose outside any workflow: the official OpenAI API, this machine (loopback), the
hosts listed one per line in `user/__ip2p_keys/allowed_hosts.txt` (a folder no HTTP endpoint serves or
writes), and the hosts in the environment variable IP2P_KEY_HOSTS (set by the headless command from its own
--base-url). Keyless requests go anywhere: there is nothing to steal.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

ALLOWED_HOSTS_FILE = "allowed_hosts.txt"
HOSTS_ENV = "IP2P_KEY_HOSTS"
DEFAULT_HOSTS = ("api.openai.com",)


class KeyDestinationError(ValueError):
    pass


def host_of(base_url: str) -> str:
    return (urlsplit(base_url.strip()).hostname or "").lower().rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_hosts(lines: Iterable[str]) -> set[str]:
    """Host names from lines like 'llm.example.com', 'https://llm.example.com:8000/v1' or '.example.com'."""
    hosts = set()
    for line in lines:
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if "//" in entry:
            entry = host_of(entry)
        hosts.add(entry.rstrip("."))
    return hosts


def allowed_hosts(keys_dir: str | os.PathLike | None, environ: dict[str, str] | None = None) -> set[str]:
    environ = os.environ if environ is None else environ
    hosts = set(DEFAULT_HOSTS) | parse_hosts(environ.get(HOSTS_ENV, "").split(","))
    if keys_dir is not None:
        path = Path(keys_dir) / ALLOWED_HOSTS_FILE
        if path.is_file():
            hosts |= parse_hosts(path.read_text(encoding="utf-8").splitlines())
    return hosts


def host_allowed(host: str, allowed: set[str]) -> bool:
    """Exact names, or '.example.com' entries for every subdomain of example.com."""
    if is_loopback(host) or host in allowed:
        return True
    return any(entry.startswith(".") and (host.endswith(entry) or host == entry[1:]) for entry in allowed)


def check_key_destination(base_url: str, keys_dir: str | os.PathLike | None, key_source: str,
                          environ: dict[str, str] | None = None) -> None:
    """Raises KeyDestinationError, saying how to allow the host, when the key may not go to base_url's host."""
    host = host_of(base_url)
    if host_allowed(host, allowed_hosts(keys_dir, environ)):
        return
    where = Path(keys_dir) / ALLOWED_HOSTS_FILE if keys_dir is not None else f"${HOSTS_ENV}"
    raise KeyDestinationError(
        f"this workflow would send your API key ({key_source}) to {host!r}, a host you have not allowed. Keys "
        f"go only to {', '.join(DEFAULT_HOSTS)}, this machine and the hosts listed in {where}. If you trust "
        f"{host!r}, add a line '{host}' to that file; otherwise clear api_key_env and api_key_file, or change "
        "base_url"
    )
