"""Starting and stopping the servers a benchmark measures: ``splitserve serve`` and the
trivial server. Each listens on 127.0.0.1, gets SIGINT if the benchmark dies (Linux),
and is stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from splitserve.runtime.process import set_parent_death_signal


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _splitserve_command() -> list[str]:
    script = Path(sys.executable).with_name("splitserve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "splitserve.cli"]


def _die_with_parent() -> None:
    """In the server's process: get SIGINT if the benchmark dies, so no server outlives it."""
    set_parent_death_signal(signal.SIGINT)


def start_server(
    args: list[str],
    port: int,
    ready_timeout_s: float = 120.0,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """``splitserve serve *args --host 127.0.0.1 --port PORT`` (in ``cwd``).

    Returns once ``GET /health/ready`` answers 200; raises (after stopping the server)
    if it exits or is not ready within ``ready_timeout_s``. Its output goes to
    ``log_path`` (default: a temporary file, named in the error when it fails).
    """
    temporary_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"splitserve-bench-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    cmd = [*_splitserve_command(), "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the benchmark reaches us, not the server
            preexec_fn=_die_with_parent,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.temporary_log = temporary_log  # type: ignore[attr-defined]
    deadline = time.monotonic() + ready_timeout_s
    url = f"http://127.0.0.1:{port}/health/ready"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before it was ready; see {log_path}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() >= deadline:
            stop_server(proc)
            raise RuntimeError(f"server not ready after {ready_timeout_s:.0f}s; see {log_path}")
        time.sleep(0.1)


def interrupt_then_kill(proc: subprocess.Popen, grace_s: float, kill_wait_s: float = 10.0) -> None:
    """SIGINT to ``proc`` by pid; SIGKILL if it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(kill_wait_s)


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGINT to the server's pid, wait ``grace_s``, then SIGKILL; returns its exit code.

    A temporary log (``start_server`` without ``log_path``) is deleted after a clean
    stop (exit code 0, or death by the SIGINT itself: threaded mode re-raises it).
    """
    interrupt_then_kill(proc, grace_s)
    log_path = getattr(proc, "log_path", None)
    if getattr(proc, "temporary_log", False) and proc.returncode in (0, -signal.SIGINT):
        with contextlib.suppress(OSError):
            Path(log_path).unlink()  # type: ignore[arg-type]
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def start_trivial(*options: str, ready_timeout_s: float = 20.0) -> tuple[subprocess.Popen, int]:
    """The trivial server (``splitserve.bench.trivial``) on a free port of 127.0.0.1;
    returns it and its port once it listens. Stop it with ``stop_server``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.bench.trivial", "--port", "0", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + ready_timeout_s
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        chunk = os.read(proc.stdout.fileno(), 256) if ready else b""
        if not chunk:
            stop_server(proc)
            raise RuntimeError(f"trivial server did not start (exit code {proc.returncode})")
        line += chunk
    word, _, port = line.decode().strip().partition(" ")
    if word != "listening":
        stop_server(proc)
        raise RuntimeError(f"trivial server said {line!r}")
    return proc, int(port)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
