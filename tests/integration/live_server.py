"""A real `loraplex serve` in a subprocess on 127.0.0.1, and small HTTP helpers for the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-inference-key"
ADMIN_KEY = "test-admin-key"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A port nothing listens on now (the server binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """`python -m server.cli serve` over a model and a data dir; start, stop, restart."""

    model_dir: Path
    data_dir: Path
    args: list[str] = field(default_factory=list)  # extra `serve` flags
    env: dict[str, str] = field(default_factory=dict)  # extra environment (fault points)
    api_key: str | None = API_KEY
    admin_key: str | None = ADMIN_KEY
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, admin: bool = False) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def client(self, admin: bool = False, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(admin), timeout=timeout)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(self.model_dir)]
        cmd += ["--quantize", "none", "--dtype", "float32", "--device", "cpu"]
        cmd += ["--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.admin_key:
            cmd += ["--admin-api-key", self.admin_key]
        return cmd + self.args

    def start(self) -> LiveServer:
        """Launch and wait for /ready; on failure the server's log is in the error."""
        assert self.proc is None, "already running"
        self.port = free_port()
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        env = dict(os.environ)
        # The server shares the machine's cores with the test process (see tests/conftest.py).
        env["OMP_NUM_THREADS"] = os.environ.get("LORAPLEX_TEST_THREADS", "2")
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.update(self.env)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown runs the app's shutdown), then SIGKILL."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def wait_killed(self, timeout: float = 60.0) -> int:
        """Wait for a server that kills itself (a fault point); its exit status."""
        assert self.proc is not None, "not running"
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def restart(self) -> LiveServer:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> Metrics:
        """A scrape of /metrics (with the inference key), parsed by prometheus_client."""
        response = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=30)
        assert response.status_code == 200, response.text
        return Metrics(response.text)


class Metrics:
    """Parsed samples of one scrape: value(name, **labels), 0 for a series not there yet."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{name} {labels} matches {len(found)} series"
        return found[0] if found else 0.0

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The `data:` payloads of a server-sent event stream: parsed JSON, or "[DONE]"."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        yield data if data == "[DONE]" else json.loads(data)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll predicate() until it is true or the timeout passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
