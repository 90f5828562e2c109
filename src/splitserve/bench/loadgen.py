"""Closed- and open-loop HTTP load loops: the measuring core of ``splitserve bench``.

Closed loop: ``concurrency`` clients, each on its own keep-alive connection, send a
request, wait for the answer, send the next. Open loop: requests arrive at ``rate`` per
second with exponential gaps (a Poisson process), each on an idle connection of a pool;
at most ``max_inflight`` are in flight, and an arrival beyond that is dropped and
counted (an unbounded client queue would measure the client, not the server). Open-loop
latency runs from the scheduled arrival, so a client that falls behind shows up in the
numbers (and in ``lag_p99_ms``) instead of hiding the server's queueing.

The client shares the cores with the server, so each request costs it as little as
possible: the ``raw`` client writes pre-built request bytes on an asyncio protocol and
parses only the status line and headers (Content-Length, chunked, or close-delimited
answers); ``X-Splitserve-Timings`` headers are kept raw and parsed after the run;
aiohttp (``client="aiohttp"``) is there for comparison and for https. The client's own
CPU time per request is reported, so a reader can tell when it was the bottleneck.

Every loop is bounded: by ``warmup_s`` + ``duration_s`` and by ``max_requests`` (the
warm-up by ``max_requests`` too), and each request by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import statistics
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from splitserve.bench import server_stats
from splitserve.bench.bodies import OCTET_STREAM, Payload
from splitserve.replies import TIMINGS_HEADER

REQUEST_TIMEOUT_S = 30.0
CLIENTS = ("raw", "aiohttp")
PROGRESS_INTERVAL_S = 0.25

StatsFetch = Callable[[], dict[str, Any] | None]


@dataclass
class Result:
    """What one load level measured (latencies in ms)."""

    url: str
    concurrency: int  # closed loop: clients; open loop: the max_inflight bound
    client: str
    requests: int  # answered in the measured window (any status)
    warmup_requests: int  # sent during the warm-up (not measured)
    ok: int  # answered 2xx
    duration_s: float  # the measured window
    rps: float  # completions inside the measured window / its length
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]  # status (or exception type) -> count, non-2xx only
    timings_ms: dict[str, float]  # median of each X-Splitserve-Timings field
    client_cpu_ms_per_req: float  # this process's user+sys CPU per answered request
    mode: str = "closed"  # "closed" or "open"
    rate: float | None = None  # open loop: the target arrival rate (req/s)
    offered_rps: float | None = None  # open loop: arrivals / window (sent + dropped)
    dropped: int = 0  # open loop: arrivals not sent because max_inflight were in flight
    peak_inflight: int = 0
    lag_p99_ms: float | None = None  # open loop: send time - scheduled arrival, p99
    statuses: dict[str, int] = field(default_factory=dict)  # every status, 2xx included
    server: dict[str, Any] | None = None  # /v1/stats deltas over the window (splitserve)
    # Per answered request of the measured window: (latency ms, status, raw timings
    # header); not in to_dict().
    samples: list[tuple[float, int, str]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}

    @property
    def label(self) -> str:
        """How the level is named in tables and plots: ``c=4`` or ``50/s``."""
        if self.mode == "open":
            return f"{self.rate:g}/s"
        return f"c={self.concurrency}"

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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Progress(Protocol):
    """Told a few times a second how a level is going (a progress bar)."""

    def update(self, elapsed_s: float, answered: int, errors: int) -> None: ...


# --- clients ----------------------------------------------------------------------------

_CHUNKED = -1
_UNTIL_CLOSE = -2


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no answer within the request timeout"))


class _RawProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client connection: one request at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None  # asyncio's or uvloop's transport (not a subclass)
        self.closed = False
        self.waiter: asyncio.Future[tuple[int, str]] | None = None
        self.in_body = False
        self.status = 0
        self.timings = ""
        self.length = 0
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.in_body and self.length == _UNTIL_CLOSE:
                self.waiter = None
                waiter.set_result((self.status, self.timings))
            else:
                waiter.set_exception(ConnectionResetError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self.closed = True
            self.transport.close()
            if not waiter.done():
                waiter.set_exception(ValueError(f"bad HTTP answer: {exc}"))

    def _parse(self) -> None:
        buf = self.buf
        if not self.in_body:
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                status = int(lines[0].split(None, 2)[1])
                if 100 <= status < 200:
                    continue  # an interim answer; the real one follows
                length, timings = _UNTIL_CLOSE, ""
                keep = not lines[0].startswith(b"HTTP/1.0")
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        if length != _CHUNKED:
                            length = int(value)
                    elif name == b"x-splitserve-timings":
                        timings = value.strip().decode("latin-1")
                    elif name == b"transfer-encoding":
                        if b"chunked" in value.lower():
                            length = _CHUNKED
                    elif name == b"connection":
                        token = value.strip().lower()
                        keep = token == b"keep-alive" or (keep and token != b"close")
                if status in (204, 304):
                    length = 0
                if length == _UNTIL_CLOSE:
                    keep = False
                self.status, self.timings, self.length, self.keep = status, timings, length, keep
                self.in_body = True
                break
        if self.length >= 0:
            if len(buf) < self.length:
                return
            del buf[: self.length]
        elif self.length == _CHUNKED:
            if not self._chunks():
                return
        else:
            buf.clear()  # the body ends when the server closes the connection
            return
        self._finish()

    def _chunks(self) -> bool:
        """Consume complete chunks; True once the last one (and its trailers) is in."""
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) < eol + 4:
                    return False
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    del buf[: eol + 4]
                    return True
                end = buf.find(b"\r\n\r\n", eol + 2)
                if end < 0:
                    return False
                del buf[: end + 4]
                return True
            need = eol + 2 + size + 2
            if len(buf) < need:
                return False
            del buf[:need]

    def _finish(self) -> None:
        waiter = self.waiter
        assert waiter is not None
        self.waiter = None
        self.in_body = False
        if not self.keep:
            self.closed = True
            self.transport.close()
        waiter.set_result((self.status, self.timings))


class _Client(Protocol):
    async def request(self, index: int) -> tuple[int, str]: ...

    async def close(self) -> None: ...


class _RawClient:
    """One connection that sends pre-built requests (reconnecting when it was closed)."""

    def __init__(self, host: str, port: int, wires: list[bytes], timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.wires = wires
        self.timeout_s = timeout_s
        self.protocol: _RawProtocol | None = None

    async def request(self, index: int) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        protocol = self.protocol
        if protocol is None or protocol.closed:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_RawProtocol, self.host, self.port), self.timeout_s
            )
            self.protocol = protocol
        fut: asyncio.Future[tuple[int, str]] = loop.create_future()
        protocol.waiter = fut
        protocol.in_body = False
        protocol.buf.clear()
        protocol.transport.write(self.wires[index])
        timer = loop.call_later(self.timeout_s, _expire, fut)
        try:
            return await fut
        except BaseException:
            protocol.closed = True  # the connection's state is unknown now
            protocol.transport.close()
            self.protocol = None
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


class _AiohttpClient:
    """One client on aiohttp: a session with one keep-alive connection."""

    def __init__(self, url: str, payloads: list[Payload], method: str, timeout_s: float) -> None:
        import aiohttp

        self.url = url
        self.method = method
        self.payloads = payloads
        self.headers = [{"Content-Type": p.content_type} for p in payloads]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            skip_auto_headers=("User-Agent",),
        )

    async def request(self, index: int) -> tuple[int, str]:
        body = self.payloads[index].data
        async with self.session.request(
            self.method, self.url, data=body or None, headers=self.headers[index]
        ) as resp:
            await resp.read()
            return resp.status, resp.headers.get(TIMINGS_HEADER, "")

    async def close(self) -> None:
        await self.session.close()


def as_payloads(bodies: Sequence[bytes | Payload], content_type: str) -> list[Payload]:
    """Bodies as payloads: plain bytes get ``content_type``."""
    return [b if isinstance(b, Payload) else Payload(bytes(b), content_type) for b in bodies]


def _client_factory(
    url: str, payloads: list[Payload], client: str, method: str, timeout_s: float
) -> Callable[[], _Client]:
    """A maker of clients; the raw client's request bytes are built once, here."""
    if client == "aiohttp":
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("client 'aiohttp' needs aiohttp: pip install aiohttp") from exc
        return lambda: _AiohttpClient(url, payloads, method, timeout_s)
    if client != "raw":
        raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"the raw client speaks plain http only (use --client aiohttp): {url}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1")
    wires = []
    for p in payloads:
        if not p.data and method in ("GET", "HEAD", "DELETE"):
            wires.append(head + b"\r\n")
        else:
            extra = f"Content-Type: {p.content_type}\r\nContent-Length: {len(p.data)}\r\n\r\n"
            wires.append(head + extra.encode("latin-1") + p.data)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    return lambda: _RawClient(host, port, wires, timeout_s)


# --- the measured window ----------------------------------------------------------------


class _Window:
    """Bookkeeping both loops share: what is measured and what completed when."""

    def __init__(self, warmup_s: float, duration_s: float, max_requests: int) -> None:
        self.start = time.perf_counter()
        self.measure_from = self.start + warmup_s
        self.stop_at = self.measure_from + duration_s
        self.max_requests = max_requests
        self.window_end = self.measure_from
        self.samples: list[tuple[float, int, str]] = []
        self.errors: Counter[str] = Counter()
        # Completion times inside the measured window, whenever the request started: the
        # throughput counts these, so requests sent during the warm-up that finish in the
        # window are not lost (they would bias requests/s down when latency is long).
        self.completions: list[float] = []
        self.issued = 0  # measured requests sent
        self.warmup_sent = 0
        self.cpu_at_measure: float | None = None
        self.cpu_end = 0.0
        self.answered_all = 0  # warm-up included: for the progress bar
        self.errors_all = 0
        self.finished = asyncio.Event()

    def record(
        self, t0: float, t1: float, measured: bool, status: int, raw: str, exc: str | None
    ) -> None:
        if self.measure_from <= t1 <= self.stop_at:
            self.completions.append(t1)
        if exc is None:
            self.answered_all += 1
            if not 200 <= status < 300:
                self.errors_all += 1
        else:
            self.errors_all += 1
        if not measured:
            return
        if exc is not None:
            self.errors[exc] += 1
        else:
            self.samples.append(((t1 - t0) * 1000.0, status, raw))
            if not 200 <= status < 300:
                self.errors[str(status)] += 1
        if t1 > self.window_end:
            self.window_end = t1

    def result(self, url: str, concurrency: int, client: str, **extra: Any) -> Result:
        samples = self.samples
        answered = len(samples)
        ok_samples = [(lat, raw) for lat, status, raw in samples if 200 <= status < 300]
        window = max(self.window_end - self.measure_from, 1e-9)
        # Throughput window: to stop_at, or to the last answer when max_requests ended it.
        rate_end = min(self.stop_at, self.window_end)
        done = sum(1 for t in self.completions if t <= rate_end)
        # Latency percentiles are over the 2xx answers (over all answers when none was 2xx).
        lat_ok = sorted(lat for lat, _ in ok_samples) or sorted(lat for lat, _, _ in samples)
        fields_: dict[str, list[float]] = {}
        for _, raw in ok_samples:
            for k, v in parse_timings(raw).items():
                fields_.setdefault(k, []).append(v)
        cpu_from = self.cpu_at_measure if self.cpu_at_measure is not None else self.cpu_end
        cpu_used = self.cpu_end - cpu_from
        return Result(
            url=url,
            concurrency=concurrency,
            client=client,
            requests=answered,
            warmup_requests=self.warmup_sent,
            ok=len(ok_samples),
            duration_s=window,
            rps=done / max(rate_end - self.measure_from, 1e-9),
            p50_ms=percentile(lat_ok, 50),
            p90_ms=percentile(lat_ok, 90),
            p99_ms=percentile(lat_ok, 99),
            max_ms=lat_ok[-1] if lat_ok else float("nan"),
            mean_ms=statistics.fmean(lat_ok) if lat_ok else float("nan"),
            errors=dict(self.errors),
            timings_ms={k: statistics.median(v) for k, v in sorted(fields_.items())},
            client_cpu_ms_per_req=cpu_used * 1000.0 / answered if answered else float("nan"),
            statuses=dict(sorted(Counter(str(s) for _, s, _ in samples).items())),
            samples=samples,
            **extra,
        )


async def _tick(win: _Window, progress: Progress) -> None:
    while True:
        progress.update(time.perf_counter() - win.start, win.answered_all, win.errors_all)
        await asyncio.sleep(PROGRESS_INTERVAL_S)


async def _probe(
    win: _Window, fetch: StatsFetch
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Server statistics at both edges of the measured window (the second one at its
    end, or earlier when the loop ended early)."""
    await asyncio.sleep(max(0.0, win.measure_from - time.perf_counter()))
    before = await asyncio.to_thread(fetch)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(win.finished.wait(), max(0.0, win.stop_at - time.perf_counter()))
    after = await asyncio.to_thread(fetch)
    return before, after


async def _run(
    win: _Window,
    body: Coroutine[Any, Any, None],
    progress: Progress | None,
    stats: StatsFetch | None,
) -> dict[str, Any] | None:
    """Run a loop's body with its progress ticker and its statistics probe; the server
    statistics' deltas over the window (None when not asked or not available)."""
    ticker = asyncio.create_task(_tick(win, progress)) if progress is not None else None
    probe = asyncio.create_task(_probe(win, stats)) if stats is not None else None
    ok = False
    try:
        await body
        win.cpu_end = _cpu_s()
        ok = True
    finally:
        win.finished.set()
        if ticker is not None and progress is not None:
            ticker.cancel()
            progress.update(time.perf_counter() - win.start, win.answered_all, win.errors_all)
        if probe is not None and not ok:
            probe.cancel()  # the body failed: do not wait for the window's end
    if probe is None:
        return None
    before, after = await probe
    return server_stats.delta(before, after)


# --- the loops --------------------------------------------------------------------------


async def closed_loop(
    url: str,
    bodies: Sequence[bytes | Payload],
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    client: str = "aiohttp",
    *,
    method: str = "POST",
    timeout_s: float = REQUEST_TIMEOUT_S,
    stats: StatsFetch | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run ``concurrency`` clients for ``warmup_s`` + ``duration_s`` (or ``max_requests``).

    Requests that start during the warm-up are not counted; the measured window runs
    from the end of the warm-up until ``duration_s`` later or until ``max_requests``
    measured requests have been sent, whichever comes first. Bodies are used round-robin
    (plain bytes are sent with ``content_type``). ``client``: ``aiohttp`` (the default,
    as the benchmarks in docs/benchmarks.md were measured with it) or ``raw``.
    ``stats``: a fetcher of the server's ``/v1/stats``, read at both edges of the window.
    """
    if concurrency < 1 or not bodies or max_requests < 1:
        raise ValueError("need concurrency >= 1, at least one body and max_requests >= 1")
    payloads = as_payloads(bodies, content_type)
    make = _client_factory(url, payloads, client, method, timeout_s)
    win = _Window(warmup_s, duration_s, max_requests)
    clients = [make() for _ in range(concurrency)]
    n_bodies = len(payloads)

    async def run_client(index: int, conn: _Client) -> None:
        i = index
        while True:
            now = time.perf_counter()
            if now >= win.stop_at:
                return
            measured = now >= win.measure_from
            if measured:
                if win.cpu_at_measure is None:
                    win.cpu_at_measure = _cpu_s()
                if win.issued >= max_requests:
                    return
                win.issued += 1
            else:
                if win.warmup_sent >= max_requests:  # the warm-up is bounded in count too
                    await asyncio.sleep(win.measure_from - now)
                    continue
                win.warmup_sent += 1
            t0 = time.perf_counter()
            try:
                status, raw = await conn.request(i % n_bodies)
                exc = None
            except Exception as e:  # any failure of one request is counted, not fatal
                status, raw, exc = -1, "", type(e).__name__
            win.record(t0, time.perf_counter(), measured, status, raw, exc)
            i += concurrency

    async def body() -> None:
        try:
            await asyncio.gather(*(run_client(k, c) for k, c in enumerate(clients)))
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    server = await _run(win, body(), progress, stats)
    return win.result(url, concurrency, client, mode="closed", server=server)


async def open_loop(
    url: str,
    bodies: Sequence[bytes | Payload],
    content_type: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    max_inflight: int,
    client: str = "raw",
    *,
    method: str = "POST",
    timeout_s: float = REQUEST_TIMEOUT_S,
    seed: int | None = None,
    stats: StatsFetch | None = None,
    progress: Progress | None = None,
) -> Result:
    """Poisson arrivals at ``rate`` req/s for ``warmup_s`` + ``duration_s``.

    At most ``max_inflight`` requests are in flight (one connection each, reused); an
    arrival beyond that is dropped and counted in ``dropped``. The measured window ends
    at ``duration_s`` or when ``max_requests`` measured requests have been sent; then the
    requests in flight are awaited (each bounded by ``timeout_s``). Latency is measured
    from the scheduled arrival time.
    """
    if rate <= 0 or max_inflight < 1 or not bodies or max_requests < 1:
        raise ValueError("need rate > 0, max_inflight >= 1, a body and max_requests >= 1")
    payloads = as_payloads(bodies, content_type)
    make = _client_factory(url, payloads, client, method, timeout_s)
    win = _Window(warmup_s, duration_s, max_requests)
    rng = random.Random(seed)
    n_bodies = len(payloads)
    idle: list[_Client] = []
    conns: list[_Client] = []
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    counts = {"inflight": 0, "peak": 0, "dropped": 0, "arrivals": 0, "sent": 0}
    arrival_end = win.stop_at

    async def one(conn: _Client, index: int, scheduled: float, measured: bool) -> None:
        sent = time.perf_counter()
        try:
            status, raw = await conn.request(index)
            exc = None
        except Exception as e:  # any failure of one request is counted, not fatal
            status, raw, exc = -1, "", type(e).__name__
        t1 = time.perf_counter()
        counts["inflight"] -= 1
        idle.append(conn)
        if measured:
            lags.append(sent - scheduled)
        win.record(scheduled, t1, measured, status, raw, exc)

    async def body() -> None:
        nonlocal arrival_end
        loop = asyncio.get_running_loop()
        next_t = win.start
        try:
            while True:
                now = time.perf_counter()
                while next_t <= now and next_t < win.stop_at:
                    measured = next_t >= win.measure_from
                    if measured:
                        if win.cpu_at_measure is None:
                            win.cpu_at_measure = _cpu_s()
                        if win.issued >= max_requests:
                            arrival_end = next_t
                            next_t = win.stop_at  # ends the loop
                            break
                        counts["arrivals"] += 1
                    elif win.warmup_sent >= max_requests:  # the warm-up is bounded in count
                        next_t = win.measure_from
                        continue
                    if counts["inflight"] >= max_inflight:
                        if measured:
                            counts["dropped"] += 1
                    else:
                        if measured:
                            win.issued += 1
                        else:
                            win.warmup_sent += 1
                        if idle:
                            conn = idle.pop()
                        else:
                            conn = make()
                            conns.append(conn)
                        counts["inflight"] += 1
                        counts["peak"] = max(counts["peak"], counts["inflight"])
                        task = loop.create_task(
                            one(conn, counts["sent"] % n_bodies, next_t, measured)
                        )
                        counts["sent"] += 1
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    next_t += rng.expovariate(rate)
                if next_t >= win.stop_at:
                    break
                await asyncio.sleep(next_t - time.perf_counter())
            if tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    server = await _run(win, body(), progress, stats)
    window = max(min(arrival_end, win.stop_at) - win.measure_from, 1e-9)
    lags.sort()
    return win.result(
        url,
        max_inflight,
        client,
        mode="open",
        rate=rate,
        offered_rps=counts["arrivals"] / window,
        dropped=counts["dropped"],
        peak_inflight=counts["peak"],
        lag_p99_ms=percentile(lags, 99) * 1000.0 if lags else None,
        server=server,
    )


def run(coro: Coroutine[Any, Any, Result]) -> Result:
    """Run a loop on a fresh event loop (uvloop when installed: a cheaper client)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_closed_loop(
    url: str,
    bodies: Sequence[bytes | Payload],
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    client: str = "aiohttp",
    **kwargs: Any,
) -> Result:
    """``closed_loop`` on a fresh event loop (uvloop when installed)."""
    return run(
        closed_loop(
            url,
            bodies,
            content_type,
            concurrency,
            duration_s,
            warmup_s,
            max_requests,
            client,
            **kwargs,
        )
    )


def run_open_loop(
    url: str,
    bodies: Sequence[bytes | Payload],
    content_type: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    max_inflight: int,
    client: str = "raw",
    **kwargs: Any,
) -> Result:
    """``open_loop`` on a fresh event loop (uvloop when installed)."""
    return run(
        open_loop(
            url,
            bodies,
            content_type,
            rate,
            duration_s,
            warmup_s,
            max_requests,
            max_inflight,
            client,
            **kwargs,
        )
    )


__all__ = [
    "CLIENTS",
    "OCTET_STREAM",
    "REQUEST_TIMEOUT_S",
    "TIMINGS_HEADER",
    "Payload",
    "Progress",
    "Result",
    "closed_loop",
    "open_loop",
    "parse_timings",
    "percentile",
    "run_closed_loop",
    "run_open_loop",
]
