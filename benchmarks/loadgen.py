"""A small closed-loop HTTP load generator, and helpers to run a ``splitserve`` server.

Closed loop: ``concurrency`` clients, each on its own keep-alive connection (aiohttp,
one ``TCPConnector(limit=1)`` per client), send a request, wait for the answer, send
the next. Latencies are taken with ``time.perf_counter()`` around each request; the
``X-Splitserve-Timings`` header of each answer is kept raw and parsed after the run, so
the client spends as little CPU as possible per request (it shares the cores with the
server). The client's own CPU time per request is reported too.

Every loop is bounded: by ``duration_s`` (plus ``warmup_s``) and by ``max_requests``.

``start_server`` runs ``splitserve serve ... --host 127.0.0.1 --port PORT`` from the
repository root and waits for ``GET /health/ready``; ``stop_server`` sends SIGINT to that
process (by pid), waits, and kills it after 10 s.

Run directly for a one-off load test against a running server::

    python benchmarks/loadgen.py http://127.0.0.1:8000/v1/services/noop --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMINGS_HEADER = "X-Splitserve-Timings"
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Result:
    """What one closed-loop run measured (latencies in ms)."""

    url: str
    concurrency: int
    client: str
    requests: int  # answered in the measured window (any status)
    warmup_requests: int  # sent during the warm-up (not measured)
    ok: int  # answered 2xx
    duration_s: float  # the measured window
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]  # status (or exception type) -> count, non-2xx only
    timings_ms: dict[str, float]  # median of each X-Splitserve-Timings field
    client_cpu_ms_per_req: float  # this process's user+sys CPU per answered request
    # Per answered request of the measured window: (latency ms, status, raw timings
    # header); not in to_dict().
    samples: list[tuple[float, int, str]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["samples"]
        return out

    def parsed_samples(self) -> list[tuple[float, dict[str, float]]]:
        """(latency ms, timings) of the 2xx answers."""
        return [(lat, parse_timings(raw)) for lat, st, raw in self.samples if 200 <= st < 300]

    def median_of(self, fn: Any) -> float:
        """Median over the answered requests of ``fn(latency_ms, timings)`` (None skipped)."""
        values = [v for lat, t in self.parsed_samples() if (v := fn(lat, t)) is not None]
        return statistics.median(values) if values else float("nan")


def parse_timings(raw: str) -> dict[str, float]:
    """``k=v,k=v`` (ms) as a dict; malformed fields are skipped."""
    out: dict[str, float] = {}
    if not raw:
        return out
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep:
            with contextlib.suppress(ValueError):
                out[key.strip()] = float(value)
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _AiohttpClient:
    """One client of the loop: an aiohttp session with one keep-alive connection."""

    def __init__(self, url: str, content_type: str) -> None:
        self.url = url
        self.headers = {"Content-Type": content_type}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            skip_auto_headers=("User-Agent",),
        )

    async def post(self, body: bytes) -> tuple[int, str]:
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            await resp.read()
            return resp.status, resp.headers.get(TIMINGS_HEADER, "")

    async def close(self) -> None:
        await self.session.close()


class _RawProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client (Content-Length answers only)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, str]] | None = None
        self.transport: Any = None  # asyncio's or uvloop's transport (not a subclass)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buf[:end]).split(b"\r\n")
        length, timings = 0, ""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"x-splitserve-timings":
                timings = value.strip().decode()
            elif name == b"transfer-encoding":
                waiter.set_exception(ConnectionError("chunked answers are not supported"))
                return
        total = end + 4 + length
        if len(self.buf) < total:
            return
        del self.buf[:total]
        waiter.set_result((int(lines[0].split()[1]), timings))


class _RawClient:
    """One client of the loop on a raw asyncio connection (much cheaper than aiohttp)."""

    def __init__(self, url: str, content_type: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: {content_type}\r\n"
        ).encode()
        self.requests: dict[int, bytes] = {}
        self.protocol: _RawProtocol | None = None

    async def post(self, body: bytes) -> tuple[int, str]:
        if self.protocol is None or self.protocol.transport is None:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(_RawProtocol, self.host, self.port)
        data = self.requests.get(id(body))
        if data is None:
            data = self.requests[id(body)] = (
                self.head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
        protocol = self.protocol
        assert protocol.transport is not None
        protocol.waiter = asyncio.get_running_loop().create_future()
        protocol.transport.write(data)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await protocol.waiter
        except BaseException:
            protocol.transport.close()  # the connection's state is unknown now
            self.protocol = None
            raise

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


CLIENTS = ("aiohttp", "raw")


async def closed_loop(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    client: str = "aiohttp",
) -> Result:
    """Run ``concurrency`` clients for ``warmup_s`` + ``duration_s`` (or ``max_requests``).

    Requests that start during the warm-up are not counted; the measured window runs
    from the end of the warm-up until ``duration_s`` later or until ``max_requests``
    measured requests have been sent, whichever comes first. Bodies are used round-robin.
    ``client``: ``aiohttp`` (the default) or ``raw`` (a minimal HTTP/1.1 client on an
    asyncio protocol, to show how much of the latency is the client's own cost).
    """
    if concurrency < 1 or not bodies or max_requests < 1:
        raise ValueError("need concurrency >= 1, at least one body and max_requests >= 1")
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
    kind = _AiohttpClient if client == "aiohttp" else _RawClient
    clients = [kind(url, content_type) for _ in range(concurrency)]
    samples: list[tuple[float, int, str]] = []
    errors: Counter[str] = Counter()
    issued = 0  # measured requests sent
    warmup_sent = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    window_end = measure_from
    cpu_at_measure: list[float] = []
    # Completion times inside the measured window, whenever the request started: the
    # throughput counts these, so requests sent during the warm-up that finish in the
    # window are not lost (they would bias requests/s down when latency is long).
    completions: list[float] = []

    async def run_client(index: int, conn: _AiohttpClient | _RawClient) -> None:
        nonlocal issued, warmup_sent, window_end
        i = index
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            measured = now >= measure_from
            if measured:
                if not cpu_at_measure:
                    cpu_at_measure.append(_cpu_s())
                if issued >= max_requests:
                    return
                issued += 1
            else:
                if warmup_sent >= max_requests:  # the warm-up is bounded in count too
                    await asyncio.sleep(measure_from - now)
                    continue
                warmup_sent += 1
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                status, raw = await conn.post(body)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status, raw = -1, ""
                if measured:
                    errors[type(exc).__name__] += 1
            t1 = time.perf_counter()
            if measure_from <= t1 <= stop_at:
                completions.append(t1)
            if not measured:
                continue
            if status != -1:
                samples.append(((t1 - t0) * 1000.0, status, raw))
                if not 200 <= status < 300:
                    errors[str(status)] += 1
            window_end = max(window_end, t1)

    try:
        await asyncio.gather(*(run_client(k, c) for k, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    cpu_end = _cpu_s()
    answered = len(samples)
    ok_samples = [(lat, raw) for lat, status, raw in samples if 200 <= status < 300]
    window = max(window_end - measure_from, 1e-9)
    # Throughput window: to stop_at, or to the last answer when max_requests ended it early.
    rate_end = min(stop_at, window_end)
    # Latency percentiles are over the 2xx answers (over all answers when none was 2xx).
    lat_ok = sorted(lat for lat, _ in ok_samples) or sorted(lat for lat, _, _ in samples)
    fields: dict[str, list[float]] = {}
    for _, raw in ok_samples:
        for k, v in parse_timings(raw).items():
            fields.setdefault(k, []).append(v)
    cpu_used = cpu_end - (cpu_at_measure[0] if cpu_at_measure else cpu_end)
    return Result(
        url=url,
        concurrency=concurrency,
        client=client,
        requests=answered,
        warmup_requests=warmup_sent,
        ok=len(ok_samples),
        duration_s=window,
        rps=sum(1 for t in completions if t <= rate_end) / max(rate_end - measure_from, 1e-9),
        p50_ms=percentile(lat_ok, 50),
        p90_ms=percentile(lat_ok, 90),
        p99_ms=percentile(lat_ok, 99),
        max_ms=lat_ok[-1] if lat_ok else float("nan"),
        mean_ms=statistics.fmean(lat_ok) if lat_ok else float("nan"),
        errors=dict(errors),
        timings_ms={k: statistics.median(v) for k, v in sorted(fields.items())},
        client_cpu_ms_per_req=cpu_used * 1000.0 / answered if answered else float("nan"),
        samples=samples,
    )


def run_closed_loop(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    client: str = "aiohttp",
) -> Result:
    """``closed_loop`` on a fresh event loop (uvloop when installed: a cheaper client)."""
    coro = closed_loop(
        url, bodies, content_type, concurrency, duration_s, warmup_s, max_requests, client
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- running a server -------------------------------------------------------------------


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
    """In the server's process: get SIGINT if this benchmark dies (Linux), so no server
    outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG


def start_server(
    args: list[str], port: int, ready_timeout_s: float = 120.0, log_path: Path | None = None
) -> subprocess.Popen:
    """``splitserve serve *args --host 127.0.0.1 --port PORT`` from the repo root.

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
            cwd=REPO_ROOT,
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


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGINT to the server's pid, wait ``grace_s``, then SIGKILL; returns its exit code.

    A temporary log (``start_server`` without ``log_path``) is deleted after a clean
    stop (exit code 0, or death by the SIGINT itself: threaded mode re-raises it).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5.0)
    log_path = getattr(proc, "log_path", None)
    if getattr(proc, "temporary_log", False) and proc.returncode in (0, -signal.SIGINT):
        with contextlib.suppress(OSError):
            Path(log_path).unlink()  # type: ignore[arg-type]
    return proc.returncode


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), ""
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg_1_5_15": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": _numpy_version(),
    }


def _numpy_version() -> str:
    try:
        import numpy
    except ImportError:
        return ""
    return numpy.__version__


# --- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/services/noop")
    parser.add_argument("--body-bytes", type=int, default=16, help="zero bytes per body")
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    parser.add_argument("--quick", action="store_true", help="0.5 s, for a smoke test")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 0.5, 0.1
    result = run_closed_loop(
        args.url,
        [bytes(args.body_bytes)],
        args.content_type,
        args.concurrency,
        args.duration,
        args.warmup,
        args.max_requests,
        args.client,
    )
    out = result.to_dict()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
