"""What every child process does first: take a name, die with its parent, stop cleanly."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine
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


_exiting = threading.Lock()
_exiting_thread: int | None = None
_cleanups: list[Callable[[], None]] = []


def on_exit(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` however this process ends short of SIGKILL: normal exit, SIGTERM
    (the supervisor's stop, or its death), or the parent watchdog."""
    _cleanups.append(cleanup)
    atexit.register(cleanup)


def _cleanup_and_exit(code: int) -> None:
    """Run this process's own cleanups (shared memory) and leave at once, from any loop or
    thread. Only ours: this exit must be quick and safe from a signal handler, which
    libraries' atexit hooks (run while their threads still work) are not made to be.

    The SIGTERM handler and the parent watchdog may both get here, and a second signal
    may interrupt the first cleanup on its own thread: the first caller cleans up and
    exits; a nested call on that thread returns to let it finish; another thread waits
    for it (and exits anyway if it never comes).
    """
    global _exiting_thread
    if _exiting_thread == threading.get_ident():
        return
    if _exiting.acquire(blocking=False):
        _exiting_thread = threading.get_ident()
        for cleanup in reversed(_cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        os._exit(code)
    _exiting.acquire(timeout=5.0)
    os._exit(code)


def exit_now(code: int) -> None:
    """Leave at once after this process's own cleanups (shared memory), from any thread."""
    _cleanup_and_exit(code)


def become_child(name: str, parent_pid: int, log_level: str = "INFO") -> None:
    """Name the process, ask the kernel to SIGTERM it when the supervisor dies, and exit
    on SIGTERM after running its cleanups (see ``on_exit``)."""
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
    signal.signal(signal.SIGTERM, lambda *_: _cleanup_and_exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor

    def watchdog() -> None:
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent_pid:  # may beat the SIGTERM handler: clean up too
                _cleanup_and_exit(1)

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
