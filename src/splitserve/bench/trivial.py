"""A minimal asyncio HTTP/1.1 server that answers 200 "ok": the load generator's target
when measuring the client itself (``splitserve bench --selftest``) and in its tests.

It does as little as a server can (one process, uvloop when installed, a hand-written
parser, a pre-built answer), so the requests/s it sustains bound what the client can
drive. Knobs for the tests: ``--fail-every N`` answers every Nth request with
``--fail-status`` (503), ``--delay-ms`` delays answers (``--fail-fast``: not the
failures, as a server that refuses a body at once), ``--chunked`` and ``--close``
change the answer's framing, ``--record`` counts the bodies it got (``GET /_received``),
and ``--fake-stats`` serves a made-up ``/v1/stats`` whose model is SIMULATED.

It listens on 127.0.0.1 only and prints ``listening PORT`` once it does.

Run: ``python -m splitserve.bench.trivial [--port 0] [--fail-every N] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
import time
from collections import Counter
from typing import Any

HOST = "127.0.0.1"


def _answer(status: int, body: bytes, *, chunked: bool = False, close: bool = False) -> bytes:
    reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, "Error")
    ctype = b"application/json" if body.startswith(b"{") else b"text/plain"
    head = f"HTTP/1.1 {status} {reason}\r\n".encode() + b"Content-Type: " + ctype + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    if chunked:
        return (
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n"
            % (
                len(body),
                body,
            )
        )
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class State:
    """What the server counts, shared by its connections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.count = 0
        self.by_status: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.ok = _answer(200, b"ok", chunked=args.chunked, close=args.close)
        self.fail = _answer(
            args.fail_status, b'{"error": {"type": "Unavailable"}}', close=args.close
        )

    def stats(self) -> dict[str, Any]:
        """A made-up /v1/stats in splitserve's shape: per request, 1 row in batches of 2,
        every stage 1 ms (0.5 ms engine queue), the engine busy a quarter of the time."""
        n = self.count
        uptime = time.monotonic() - self.started
        stage = {"count": n, "sum": float(n)}
        return {
            "mode": "fake",
            "uptime_s": uptime,
            "requests": {"total": n, "by_status": dict(self.by_status)},
            "stages_ms": {
                "front_queue": stage,
                "worker": stage,
                "infer_wait": stage,
                "engine_queue": {"count": n, "sum": n * 0.5},
                "engine_compute": stage,
            },
            "models": {
                "fake/model": {
                    "backend": "simulated",
                    "simulated": True,
                    "batches": (n + 1) // 2,
                    "rows": n,
                    "busy_s": n * 0.001,
                    "queue_ms_sum": n * 0.5,
                    "batch_sizes": {"2": n // 2, "1": n % 2},
                }
            },
            "engines": {"0": {"busy_s": uptime / 4, "uptime_s": uptime}},
        }

    def respond(self, method: bytes, target: bytes, ctype: bytes, body: bytes) -> bytes:
        args = self.args
        if method == b"GET" and target == b"/v1/stats":
            if args.fake_stats:
                return _answer(200, json.dumps(self.stats()).encode(), close=args.close)
            return _answer(404, b'{"error": {"type": "NotFound"}}', close=args.close)
        if method == b"GET" and target == b"/_received":
            return _answer(200, json.dumps(self.received).encode(), close=args.close)
        self.count += 1
        if args.record:
            key = f"{ctype.decode('latin-1')} {hashlib.sha1(body).hexdigest()[:12]}"
            self.received[key] += 1
        if args.fail_every and self.count % args.fail_every == 0:
            self.by_status[str(args.fail_status)] += 1
            return self.fail
        self.by_status["200"] += 1
        return self.ok


class Connection(asyncio.Protocol):
    """One client connection: parse requests (Content-Length bodies), answer each."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            length, ctype = 0, b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"content-type":
                    ctype = value.strip()
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            method, target = lines[0].split(b" ")[:2]
            answer = self.state.respond(method, target, ctype, body)
            delay = self.state.args.delay_ms
            if self.state.args.fail_fast and answer is self.state.fail:
                delay = 0.0
            if delay:
                asyncio.get_running_loop().call_later(delay / 1000.0, self._send, answer)
            else:
                self._send(answer)

    def _send(self, answer: bytes) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.state.args.close:
            self.transport.close()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    state = State(args)
    server = await loop.create_server(lambda: Connection(state), HOST, args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--fail-every", type=int, default=0, help="every Nth request fails")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--fail-fast", action="store_true", help="no delay for failures")
    parser.add_argument("--chunked", action="store_true", help="chunked answers")
    parser.add_argument("--close", action="store_true", help="close after each answer")
    parser.add_argument("--record", action="store_true", help="count bodies: GET /_received")
    parser.add_argument("--fake-stats", action="store_true", help="a SIMULATED /v1/stats")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
