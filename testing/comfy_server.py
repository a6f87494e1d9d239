"""A real ComfyUI server in a subprocess on 127.0.0.1, for tests and benchmarks.

The server runs ComfyUI's own main.py with a given base directory (models/, input/, output/, custom_nodes/);
`stop()` always ends the process group, so a failing test never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from ..cli.runtime import prepare_base


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def link_pack(base_dir: Path) -> Path:
    """Makes `base_dir/custom_nodes/comfyui_ip2p` point at this pack's folder (plus ComfyUI's folders)."""
    prepare_base(Path(base_dir))
    return Path(base_dir) / "custom_nodes" / "comfyui_ip2p"


class ComfyServer:
    def __init__(self, comfy_dir: Path, base_dir: Path, extra_args: list[str] | None = None,
                 python: str = sys.executable) -> None:
        self.comfy_dir = Path(comfy_dir)
        self.base_dir = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.python = python
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / f"comfyui-server-{self.port}.log"

    def start(self, timeout: float = 120.0) -> ComfyServer:
        link_pack(self.base_dir)
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:", *self.extra_args,
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"POST {path} -> {error.code}: {error.read().decode(errors='replace')}") from error

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Waits for a queued prompt; returns its /history entry or raises with ComfyUI's error message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'))[-3000:]}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)


def upload(server, data: bytes, filename: str, subfolder: str) -> dict:
    """ComfyUI's own /upload/image (it stores any file in input/): how a remote user plants a dataset. Returns
    the server's answer after checking that the file went where asked."""
    boundary = uuid.uuid4().hex
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\n{subfolder}\r\n').encode(),
             (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n",
             f"--{boundary}--\r\n".encode()]
    request = urllib.request.Request(server.url + "/upload/image", data=b"".join(parts),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["subfolder"] == subfolder, answer
    return answer
