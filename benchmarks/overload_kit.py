"""What the overload and chaos benchmarks share: one record per request from a small
aiohttp client, the server's process tree read from /proc, and its shared memory.

The client keeps every answer's send and completion time, status, timings header and
error message, which the package's load loops (``splitserve.bench``) summarise away;
it is cheap enough at these rates (tens of requests per second) to share two cores
with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

TIMINGS_HEADER = "X-Splitserve-Timings"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Set in the server's environment (its children inherit it), so that a process of this
# run is found after its parent is gone, and never one of another server on the machine.
RUN_MARKER_VAR = "SPLITSERVE_BENCH_RUN"


# --- requests ---------------------------------------------------------------------------


@dataclass
class Answer:
    """One request: times in seconds on ``time.perf_counter``; status -1 when no HTTP
    answer came (the exception's type is in ``error``)."""

    sent: float
    done: float
    status: int
    error: str = ""  # "type: message" of a JSON error body, or the exception's type
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_timings(raw: str) -> dict[str, float]:
    """``k=v,k=v`` (ms) as a dict; malformed fields are skipped."""
    out: dict[str, float] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep:
            with contextlib.suppress(ValueError):
                out[key.strip()] = float(value)
    return out


def _error_text(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err.get('type', '')}: {err.get('message', '')}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    """A client session with at most ``limit`` connections, each request bounded."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        skip_auto_headers=("User-Agent",),
    )


async def send(client: aiohttp.ClientSession, url: str, body: bytes, content_type: str) -> Answer:
    """POST ``body``; the answer's record (never raises for a failed request)."""
    sent = time.perf_counter()
    try:
        async with client.post(url, data=body, headers={"Content-Type": content_type}) as resp:
            data = await resp.read()
            raw = resp.headers.get(TIMINGS_HEADER, "")
            error = "" if resp.status == 200 else _error_text(data)
            return Answer(sent, time.perf_counter(), resp.status, error, parse_timings(raw))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Answer(sent, time.perf_counter(), -1, type(exc).__name__)


async def closed_loop(
    url: str,
    bodies: list[tuple[bytes, str]],
    clients: int,
    until: float,
    timeout_s: float,
    max_requests: int,
    stop: Callable[[], bool] | None = None,
    pause_after_error_s: float = 0.1,
    answers: list[Answer] | None = None,
    think_s: float = 0.0,
) -> list[Answer]:
    """``clients`` clients, each sending its next request when the last one is answered,
    until ``until`` (perf_counter), ``max_requests`` in all, or ``stop()``. Answers are
    appended to ``answers`` as they come (a caller's ``stop`` may read them).

    After an answer other than 200 a client waits ``pause_after_error_s``, so that fast
    errors (503 at once) do not turn it into a busy loop that takes the server's cores;
    after any answer it waits ``think_s`` (a steady, moderate load).
    """
    answers = [] if answers is None else answers
    issued = 0

    async def run_client(first: int, client: aiohttp.ClientSession) -> None:
        nonlocal issued
        index = first
        while time.perf_counter() < until and issued < max_requests:
            if stop is not None and stop():
                return
            issued += 1
            data, content_type = bodies[index % len(bodies)]
            answer = await send(client, url, data, content_type)
            answers.append(answer)
            index += clients
            pause = think_s + (pause_after_error_s if answer.status != 200 else 0.0)
            if pause > 0:
                await asyncio.sleep(pause)

    async with session(clients, timeout_s) as client:
        await asyncio.gather(*(run_client(k, client) for k in range(clients)))
    return answers


# --- server processes -------------------------------------------------------------------


def new_run_marker() -> str:
    """A fresh value for ``RUN_MARKER_VAR``; put it in ``os.environ`` before the server
    starts."""
    return uuid.uuid4().hex


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie is not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        fields = _stat_fields(other)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(other)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def named_children(pid: int) -> dict[int, str]:
    """``pid``'s live descendants and their process names."""
    return {child: process_name(child) for child in descendants(pid)}


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(summed RSS of ``pid`` and all its descendants, number of processes). Pages shared
    between them (shared-memory tensors, the parent's copy-on-write pages) count once per
    process that maps them: an upper bound of the memory the server holds."""
    pids = [pid, *descendants(pid)]
    return sum(rss_bytes(p) for p in pids), len(pids)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (a process that has
    died takes its time with it)."""
    total = 0
    for p in (pid, *descendants(pid)):
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def marked_processes(marker: str) -> dict[int, str]:
    """Live processes whose environment carries this run's marker, and their names."""
    needle = f"{RUN_MARKER_VAR}={marker}".encode()
    found: dict[int, str] = {}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and alive(pid):
            found[pid] = process_name(pid)
    return found


def shm_segments(supervisor_pid: int, owner_pid: int | None = None) -> list[str]:
    """Shared-memory segments of a server (or of one of its processes) in /dev/shm."""
    pattern = f"splitserve-{supervisor_pid}-" + (f"{owner_pid}-*" if owner_pid else "*")
    return sorted(p.name for p in Path("/dev/shm").glob(pattern))


# --- /v1/stats --------------------------------------------------------------------------


async def fetch_json(client: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The JSON at ``url``, or None."""
    try:
        async with client.get(url) as resp:
            if resp.status != 200:
                return None
            return await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


def service_names(port: int) -> list[str]:
    """The services a server on 127.0.0.1:PORT serves (``GET /v1/services``)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/services", timeout=10) as resp:
        return sorted(json.loads(resp.read())["services"])


def busy_s(stats: dict[str, Any] | None) -> float:
    """Engine compute seconds summed over every model (cumulative)."""
    models = (stats or {}).get("models") or {}
    return sum(float(m.get("busy_s", 0.0)) for m in models.values() if isinstance(m, dict))


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """What the server counted between two ``/v1/stats`` snapshots: answers by status,
    the mean of each stage's time (ms) and engine busy seconds per model."""
    if not before or not after:
        return {}
    statuses_before = (before.get("requests") or {}).get("by_status") or {}
    statuses_after = (after.get("requests") or {}).get("by_status") or {}
    by_status = {
        s: int(n) - int(statuses_before.get(s, 0)) for s, n in sorted(statuses_after.items())
    }
    stages: dict[str, float | None] = {}
    for name, stage in (after.get("stages_ms") or {}).items():
        old = (before.get("stages_ms") or {}).get(name) or {}
        count = stage.get("count", 0) - old.get("count", 0)
        total = stage.get("sum", 0.0) - old.get("sum", 0.0)
        stages[name] = total / count if count > 0 else None
    models = {}
    for name, m in (after.get("models") or {}).items():
        old = ((before.get("models") or {}).get(name)) or {}
        models[name] = round(float(m.get("busy_s", 0.0)) - float(old.get("busy_s", 0.0)), 3)
    return {
        "by_status": {s: n for s, n in by_status.items() if n},
        "stages_ms_mean": stages,
        "busy_s": models,
        "busy_s_total": round(busy_s(after) - busy_s(before), 3),
    }
