"""Which hosts may receive the user's API key, and how.

A shared workflow sets `base_url`, but the key belongs to whoever runs it. Without a rule, a workflow posted
online could point base_url at its author's server and collect the key of everyone who queues it. So a key is
sent only to hosts the user chose outside any workflow: the official OpenAI API, this machine, the hosts listed
one per line in `user/__ip2p_keys/allowed_hosts.txt` (a folder no HTTP endpoint serves or writes), and the hosts
in the environment variable IP2P_KEY_HOSTS (set by the headless command from its own --base-url). Keyless
requests go anywhere: there is nothing to steal.

"This machine" is decided from the URL's text alone, never by a name lookup: a literal loopback address
(127.0.0.0/8, ::1) or exactly `localhost`, which `connect_url` turns into 127.0.0.1 before any connection, so
that no resolver (DNS, mDNS, a search domain) is ever asked about it. `x.localhost` and `localhost.` are
ordinary unknown names: resolving them goes through DNS, and whoever answers that lookup would get the key.
Names are compared exactly as written (lower-cased): a trailing dot makes another name.

A key to any host other than this machine travels only over https: over plain http anyone on the path reads it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ALLOWED_HOSTS_FILE = "allowed_hosts.txt"
HOSTS_ENV = "IP2P_KEY_HOSTS"
DEFAULT_HOSTS = ("api.openai.com",)
LOCALHOST = "localhost"
LOCALHOST_ADDRESS = "127.0.0.1"


class KeyDestinationError(ValueError):
    pass


def host_of(base_url: str) -> str:
    """The URL's host, lower-cased, exactly as written otherwise (a trailing dot is kept: it is another name)."""
    return (urlsplit(base_url.strip()).hostname or "").lower()


def is_loopback(host: str) -> bool:
    """True only for `localhost` itself and literal loopback addresses; never looks a name up."""
    if host == LOCALHOST:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def connect_url(base_url: str) -> str:
    """`base_url` with the name `localhost` replaced by 127.0.0.1, so connecting needs no name lookup at all."""
    parts = urlsplit(base_url.strip())
    if (parts.hostname or "").lower() != LOCALHOST:
        return base_url.strip()
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = LOCALHOST_ADDRESS + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, f"{userinfo}@{netloc}" if userinfo else netloc, parts.path, parts.query,
                       parts.fragment))


def parse_hosts(lines: Iterable[str]) -> set[str]:
    """Host names from lines like 'llm.example.com', 'https://llm.example.com:8000/v1' or '.example.com'."""
    hosts = set()
    for line in lines:
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if "//" in entry:
            entry = host_of(entry)
        hosts.add(entry)
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
    """Raises KeyDestinationError, saying what to change, when the key may not go to base_url.

    Decided from the text of base_url and the user's lists only: no name is resolved here.
    """
    host = host_of(base_url)
    where = Path(keys_dir) / ALLOWED_HOSTS_FILE if keys_dir is not None else f"${HOSTS_ENV}"
    if not host_allowed(host, allowed_hosts(keys_dir, environ)):
        raise KeyDestinationError(
            f"this workflow would send your API key ({key_source}) to {host!r}, a host you have not allowed. Keys "
            f"go only to {', '.join(DEFAULT_HOSTS)}, this machine (localhost, 127.0.0.1, ::1) and the hosts listed "
            f"in {where}. If you trust {host!r}, add a line '{host}' to that file; otherwise clear api_key_env and "
            "api_key_file, or change base_url"
        )
    scheme = urlsplit(base_url.strip()).scheme.lower()
    if scheme != "https" and not is_loopback(host):
        raise KeyDestinationError(
            f"this workflow would send your API key ({key_source}) to {host!r} over {scheme or 'no'}:// — "
            "unencrypted, so anyone on the way could read it. A key goes to another machine only over https: "
            f"change base_url to https://{host}..., or reach the server through this machine (e.g. an SSH tunnel "
            "to http://127.0.0.1:PORT/v1), or clear api_key_env and api_key_file if it needs no key"
        )
