"""Fixtures that run real servers: `splitserve serve` as a subprocess on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_SERVICES = [f"tests.services:{name}" for name in ("Echo", "FixedOne", "Padded", "Pipeline")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def shm_segments(supervisor_pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"splitserve-{supervisor_pid}-*"))


class Server:
    """A running `splitserve serve`, stopped by its pid."""

    def __init__(
        self,
        services: list[str],
        *args: str,
        ready_timeout: float = 120,
        headers: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.mode = "threaded" if "threaded" in args else "split"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"splitserve-{self.port}.log"
        self._log = self.log_path.open("w")
        cmd = [
            sys.executable,
            "-m",
            "splitserve.cli",
            "serve",
            *services,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30, headers=headers)
        self.wait_ready(ready_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health/ready").status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, service: str, **kwargs) -> httpx.Response:
        return self.client.post(f"/v1/services/{service}", **kwargs)

    def children(self) -> dict[str, int]:
        return {process_name(pid): pid for pid in children_of(self.pid)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.client.close()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session", autouse=True)
def test_models() -> None:
    from tests.services import make_models

    make_models()
    from examples.noop.make_model import DEFAULT_PATH, make_identity_model

    if not DEFAULT_PATH.exists():
        make_identity_model(DEFAULT_PATH)


@pytest.fixture(scope="module")
def split_server() -> Iterator[Server]:
    server = Server(TEST_SERVICES, "--cpu-workers", "2", "--max-body-bytes", str(8 << 20))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[Server]:
    server = Server(TEST_SERVICES, "--mode", "threaded", "--max-body-bytes", str(8 << 20))
    yield server
    server.stop()
