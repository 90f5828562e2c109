"""What every child process does first: take a name, die with its parent, stop cleanly."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Coroutine
from typing import Any

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1

log = logging.getLogger("splitserve")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(processName)s] %(message)s",
        stream=sys.stderr,
    )


def _exit_now(*_: object) -> None:
    """SIGTERM: run the atexit cleanup (shared memory) and leave at once, from any loop."""
    atexit._run_exitfuncs()
    os._exit(0)


def become_child(name: str, parent_pid: int, log_level: str = "INFO") -> None:
    """Name the process, ask the kernel to SIGTERM it when the supervisor dies, and exit
    on SIGTERM with a normal interpreter shutdown (so atexit cleanup runs)."""
    import multiprocessing

    multiprocessing.current_process().name = name
    configure_logging(log_level)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog below still covers it
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor

    def watchdog() -> None:
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def run_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run a process's asyncio main, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def check_port_free(host: str, port: int) -> None:
    """Fail at once, with a clear message, when the HTTP port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"splitserve: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
