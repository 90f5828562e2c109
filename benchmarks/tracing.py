"""What tracing costs a request, measured in-process on the project's own code.

- off: ``tracing.recording()`` (the one check a request makes), and the headers' size
  with the ``traced`` flag and the empty stage lists;
- on, CPU worker and engine: the stages of a request through one engine call
  (``Stage`` objects) and their encoding in the ``InferReply`` and ``JobReply``;
- on, the front: a SERVER span from a client's traceparent, the traceparent answered,
  and the job's 9 spans (``record_dispatch``: the stages of a request through the Echo
  service), with the export thread kept idle (a schedule delay of an hour): what
  the request path pays; exporting runs in the processor's thread.

With ``--requests N``, the same end to end: the no-op service in split mode (1 CPU
worker, 1 engine) served twice, tracing off and on (exporting to a sink on 127.0.0.1
that answers every export 200), each sent N sequential requests in interleaved rounds,
and the traced one also N requests whose traceparent says unsampled; the CPU time each
process spends per request (from /proc, the export thread included) and the median
round trip.

Run: ``python benchmarks/tracing.py [--iterations N] [--requests N]`` (needs the
``trace`` extra).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from splitserve.config import ServerConfig
from splitserve.protocol import tracing
from splitserve.replies import Reply, Stage
from splitserve.runtime import messages as msg


def per_call_us(fn: Callable[[], object], iterations: int) -> float:
    """The best of five runs of ``iterations`` calls, in µs per call."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, time.perf_counter() - began)
    return best / iterations * 1e6


def engine_stages(t: float) -> list[Stage]:
    where = {"splitserve.model": "echo/model", "process.pid": 1234}
    sizes = {"splitserve.batch_size": 4, "splitserve.rows": 1}
    return [
        Stage("engine.queue", t + 0.0004, t + 0.0006, where),
        Stage("engine.slot_wait", t + 0.0006, t + 0.00061, where),
        Stage("engine.compute", t + 0.00061, t + 0.0008, {**where, **sizes}),
    ]


def job_tree(t: float) -> Stage:
    call = Stage("infer", t + 0.0003, t + 0.001, {"splitserve.model": "echo/model"})
    call.children = engine_stages(t)
    children = [
        Stage("preprocess", t, t + 0.0003),
        call,
        Stage("postprocess", t + 0.001, t + 0.0011),
    ]
    where = {"splitserve.worker": 0, "process.pid": 1235, "splitserve.status": 200}
    return Stage("job", t, t + 0.0011, where, children)


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads every export and answers 200."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def end_to_end(requests: int, rounds: int = 3) -> None:
    """CPU per request of each process, and the round trip: tracing off, on, and on with
    the requests' own traceparent unsampled."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loadgen import free_port, start_server, stop_server
    from noop import BODY, CONTENT_TYPE, ensure_model, server_cpu

    ensure_model()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    base = ["examples.noop.service:Noop", "--cpu-workers", "1", "--engine-replicas", "1"]
    configs = {"off": base, "on": [*base, "--trace", f"http://127.0.0.1:{sink.server_port}"]}
    servers = {
        name: (port := free_port(), start_server(args, port)) for name, args in configs.items()
    }
    sampled = {"Content-Type": CONTENT_TYPE, "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}
    unsampled = {**sampled, "traceparent": sampled["traceparent"][:-2] + "00"}
    runs = {"off": ("off", sampled), "on": ("on", sampled), "on, unsampled": ("on", unsampled)}
    cpu: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    latency: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(rounds):
            for name, (server, headers) in runs.items():
                port, proc = servers[server]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                before = server_cpu(proc.pid)
                for _ in range(requests):
                    began = time.perf_counter()
                    conn.request("POST", "/v1/services/noop", BODY, headers)
                    response = conn.getresponse()
                    response.read()
                    assert response.status == 200
                    latency[name].append(time.perf_counter() - began)
                time.sleep(0.2)  # the exports of the last requests, off the request path
                after = server_cpu(proc.pid)
                conn.close()
                for role, seconds in after.items():
                    used = (seconds - before.get(role, 0.0)) / requests * 1e6
                    cpu[name].setdefault(role, []).append(used)
    finally:
        for _, proc in servers.values():
            stop_server(proc)
        sink.shutdown()
    print(f"\nEnd to end, {rounds} rounds of {requests} sequential requests (medians):")
    for name in runs:
        per_role = ", ".join(
            f"{role} {statistics.median(v):.0f} µs" for role, v in sorted(cpu[name].items())
        )
        p50 = statistics.median(latency[name]) * 1e3
        print(f"  tracing {name:<13}  round trip p50 {p50:.2f} ms; CPU per request: {per_role}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=0)
    options = parser.parse_args()
    n = options.iterations
    results: dict[str, float] = {}

    results["off: recording() per request"] = per_call_us(tracing.recording, n * 10)
    untraced = len(msg.encode(msg.Job(1, "echo", "application/json", 1.0, {}, "")))
    reply = len(msg.encode(msg.InferReply(1, [], None, 0.1, 0.2, 1)))

    now = time.monotonic()
    results["on, engine: 3 stages"] = per_call_us(lambda: engine_stages(now), n)
    results["on, worker: the job's stage tree"] = per_call_us(lambda: job_tree(now), n)
    traced_reply = msg.InferReply(1, [], None, 0.1, 0.2, 1, stages=engine_stages(now))
    results["on, engine: InferReply encoded"] = per_call_us(lambda: msg.encode(traced_reply), n)
    job_reply = msg.JobReply(1, 200, "application/json", {"worker_ms": 1.0}, {}, [job_tree(now)])
    results["on, worker: JobReply encoded"] = per_call_us(lambda: msg.encode(job_reply), n)
    results["on, front: JobReply decoded"] = per_call_us(
        lambda: msg.front_decoder.decode(msg.encode(job_reply)), n
    )

    if options.requests:  # first: the servers inherit this process's environment
        end_to_end(options.requests)

    # the export thread stays asleep: only what a request's own path does is measured
    saved = dict(os.environ)
    os.environ.update(
        OTEL_BSP_SCHEDULE_DELAY=str(3_600_000),
        OTEL_BSP_MAX_QUEUE_SIZE=str(10 * n + 10),
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE=str(10 * n + 10),
    )
    tracing.start(ServerConfig(trace="http://127.0.0.1:9/"))  # never reached: see the end
    os.environ.clear()
    os.environ.update(saved)
    otel = tracing._otel
    assert otel is not None
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    served = Reply(200, "application/json", b"{}", stages=[job_tree(now)])

    def request() -> None:
        with otel.serve("POST /v1/services/{name}", carrier, {"url.path": "/v1/x"}) as span:
            otel.naming(span)
            tracing.record_dispatch("echo", "", now, served, now + 0.00005)

    results["on, front: server span + traceparent + 9 spans"] = per_call_us(request, n // 10)
    unsampled = {"traceparent": carrier["traceparent"][:-2] + "00"}

    def unsampled_request() -> None:
        with otel.serve("POST /v1/services/{name}", unsampled, {"url.path": "/v1/x"}) as span:
            otel.naming(span)
            assert not tracing.recording()

    results["on, front: an unsampled request (traceparent ...-00)"] = per_call_us(
        unsampled_request, n
    )
    parent = otel.trace.set_span_in_context(otel.tracer.start_span("parent"))
    results["on, front: one span (the SDK's start + end)"] = per_call_us(
        lambda: otel.tracer.start_span("x", parent).end(), n
    )
    width = max(map(len, results))
    print(f"Job header, untraced: {untraced} bytes; InferReply, untraced: {reply} bytes")
    for name, value in results.items():
        print(f"{name:<{width}}  {value:8.2f} µs")
    sys.stdout.flush()
    os._exit(0)  # the spans queued here are not worth sending anywhere


if __name__ == "__main__":
    main()
