"""What protocol v2 costs in Python per no-op request, in-process and deterministic enough
to compare two versions of the code on a busy machine.

The no-op of benchmarks/protocols.py (four float32 values) without sockets, processes or
an engine, so that only the protocol code is timed:

- **front**: the whole ASGI app of protocol/rest.py (routing, body, parsing, stats,
  response), driven directly with the exact request each client sends, its dispatcher
  a stub answering at once what a CPU worker would (16 bytes, or the output bundle):
  ``POST /v1/services/noop`` (the plain route, 16 bytes) against ``noop.model`` over v2
  binary HTTP (tritonclient's body: binary input and output) and over gRPC (the
  servicer's ``ModelInfer`` on a parsed ``ModelInferRequest``, as grpcio hands it),
  and the ``noop`` service model over v2 binary HTTP (one BYTES element, the 16 bytes).
- **worker**: what a CPU worker runs per request, the engine call a stub returning its
  input: ``invoke_service`` with the no-op service (plain route) against
  ``invoke_model`` (a tensor bundle in and out, v2 on an engine model).

Each point is the median over many calls of one request's time (perf_counter), the
points interleaved in rounds; the figure is the median over rounds. The machine's load
scales every column alike; compare columns of one run, not runs.

With ``--baseline REV`` the same measures also run on the ``src/`` of git revision REV
(extracted to a temporary folder, run in a child process per round, interleaved with
the working tree's), and both columns are printed side by side.

With ``--instructions`` each tree runs once under valgrind (callgrind) and the figures are
instructions per request: deterministic, so they compare trees on a busy machine
(valgrind must be installed; a few minutes at ``--calls 300``).

Run: ``python benchmarks/v2_overhead.py [--baseline REV] [--rounds 5] [--calls 3000]``
or ``python benchmarks/v2_overhead.py --instructions --calls 300 [--baseline REV]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
X = np.arange(4, dtype=np.float32)[None, :]  # the no-op's four values, one row
CLIENT_HEADERS = [  # what aiohttp sends besides the request's own headers
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"Python/3.11 aiohttp/3.9"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
]


def v2_binary_request(name: str, arr: np.ndarray, datatype: str, output: str) -> tuple[bytes, int]:
    """tritonclient.http's body: one binary input, one output asked for as binary data."""
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr, binary_data=True)
    asked = httpclient.InferRequestedOutput(output, binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[asked]
    )
    return body, int(header_length)


class StubDispatcher:
    """Answers every request at once, as a CPU worker would (the engine model ``y = x``)."""

    mode = "split"
    draining = False

    def __init__(self) -> None:
        from splitserve.replies import Reply
        from splitserve.stats import EngineStats, ModelStats, TensorInfo
        from splitserve.tensors import BUNDLE_CONTENT_TYPE, pack_tensors_bundle

        timings = {"front_queue_ms": 0.01, "infer_wait_ms": 0.2, "worker_ms": 0.3}
        self.plain = Reply(200, "application/octet-stream", X.tobytes(), timings)
        self.bundle = Reply(200, BUNDLE_CONTENT_TYPE, pack_tensors_bundle({"y": X}), timings)
        signature = [TensorInfo("x", "float32", (-1, 4))], [TensorInfo("y", "float32", (-1, 4))]
        model = ModelStats("onnxruntime", inputs=signature[0], outputs=signature[1])
        self.engines = [EngineStats(0, os.getpid(), 1.0, {"noop/model": model})]

    def ready(self) -> bool:
        return True

    def engine_stats(self) -> list[Any]:
        return self.engines

    def peer_stats(self) -> list:
        return []  # one front: its counters are the server's

    def begin_drain(self) -> None:
        pass

    def in_flight(self) -> int:
        return 0

    async def dispatch(
        self,
        service: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        deadline: float,
        model: str = "",
    ) -> Any:
        reply = self.bundle if model else self.plain
        return type(reply)(reply.status, reply.content_type, reply.body, dict(reply.timings))


CATALOGUE = {
    "noop": {"models": {"model": {"backend": "onnxruntime", "max_batch_size": 32}}},
}


def front_calls() -> dict[str, Callable[[], Awaitable[None]]]:
    """One call per route, each a whole request through the app (or the gRPC servicer)."""
    from splitserve.config import ServerConfig
    from splitserve.protocol import metrics
    from splitserve.protocol.grpc_server import InferenceServicer
    from splitserve.protocol.grpc_v2 import inference_pb2 as pb
    from splitserve.protocol.rest import create_app

    dispatcher = StubDispatcher()
    cfg = ServerConfig()
    app = create_app(dispatcher, cfg, CATALOGUE)

    def http(path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Callable:
        headers = [*CLIENT_HEADERS, (b"content-length", str(len(body)).encode()), *headers]

        async def call() -> None:
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": list(headers),
                "client": ("127.0.0.1", 40000),
                "server": ("127.0.0.1", 8000),
                "state": {},
            }
            pending = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list[dict[str, Any]] = []
            disconnected = asyncio.get_running_loop().create_future()  # never, here

            async def receive() -> dict[str, Any]:
                if pending:
                    return pending.pop()
                return await disconnected

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            if sent[0]["status"] != 200:
                raise RuntimeError(f"{path}: {sent}")

        return call

    octet = (b"content-type", b"application/octet-stream")
    if hasattr(metrics, "FrontCounters"):  # this tree: one set of counters per front
        servicer = InferenceServicer(dispatcher, cfg, CATALOGUE, metrics.FrontCounters())
    else:  # a baseline from before several fronts
        from splitserve.stats import RequestStats

        counters = (metrics.InferenceStats(), RequestStats())
        servicer = InferenceServicer(dispatcher, cfg, CATALOGUE, *counters)
    message = pb.ModelInferRequest(model_name="noop.model")
    message.inputs.add(name="x", datatype="FP32", shape=X.shape)
    message.outputs.add(name="y")
    message.raw_input_contents.append(X.tobytes())
    wire = message.SerializeToString()

    async def grpc_call() -> None:
        await servicer.ModelInfer(pb.ModelInferRequest.FromString(wire), StubContext())

    def v2(model: str, *request: Any) -> Callable:
        body, header_length = v2_binary_request(*request)
        length = (b"inference-header-content-length", str(header_length).encode())
        return http(f"/v2/models/{model}/infer", body, [octet, length])

    elements = np.array([X.tobytes()], dtype=object)  # the service model: one request body
    return {
        "plain /v1 route": http("/v1/services/noop", X.tobytes(), [octet]),
        "v2 binary HTTP, noop.model": v2("noop.model", "x", X, "FP32", "y"),
        "gRPC ModelInfer, noop.model": grpc_call,
        "v2 binary HTTP, noop service": v2("noop", "request", elements, "BYTES", "response"),
    }


class StubContext:
    """What ``ModelInfer`` asks of grpcio's context."""

    def invocation_metadata(self) -> tuple:
        return (("user-agent", "grpc-python/1.6"),)

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"aborted: {code} {message}")


def worker_calls() -> dict[str, Callable[[], Awaitable[None]]]:
    from examples.noop.service import Noop
    from splitserve.runtime.invoke import invoke_model, invoke_service
    from splitserve.service import Request
    from splitserve.tensors import pack_tensors_bundle

    service = Noop()
    body = X.tobytes()
    bundle = pack_tensors_bundle({"x": X})
    headers = {k.decode(): v.decode() for k, v in CLIENT_HEADERS}

    async def infer(model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}

    async def plain() -> None:
        request = Request(body, "application/octet-stream", headers)
        reply = await invoke_service(service, request, infer)
        if reply.status != 200:
            raise RuntimeError(reply)

    async def model() -> None:
        reply = await invoke_model("model", bundle, infer)
        if reply.status != 200:
            raise RuntimeError(reply)

    return {"invoke_service (plain route)": plain, "invoke_model (v2 engine model)": model}


async def median_us(call: Callable[[], Awaitable[None]], calls: int) -> float:
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        await call()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def all_points() -> dict[str, Callable[[], Awaitable[None]]]:
    points = {f"front/{k}": v for k, v in front_calls().items()}
    points.update({f"worker/{k}": v for k, v in worker_calls().items()})
    return points


async def one_round(calls: int) -> dict[str, float]:
    """Every point once, in order (after a short warm-up of each)."""
    points = all_points()
    for call in points.values():
        await median_us(call, 200)
    return {name: await median_us(call, calls) for name, call in points.items()}


async def marked_round(calls: int) -> list[str]:
    """Every point ``calls`` times, each run between two calls of ``getppid`` (callgrind
    dumps its counts there; nothing else here calls it)."""
    points = all_points()
    for call in points.values():
        for _ in range(200):
            await call()
    os.getppid()
    for call in points.values():
        for _ in range(calls):
            await call()
        os.getppid()
    return list(points)


def run_loop(main: Awaitable[Any]) -> Any:
    try:
        import uvloop  # the server's loop when installed

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


def child_env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(REPO_ROOT)])}


def child_round(src: Path, calls: int) -> dict[str, float]:
    """One round in a child process whose ``splitserve`` is the one under ``src``."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--calls", str(calls)],
        env=child_env(src),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    loaded = Path(result.pop("splitserve_from"))
    if not loaded.is_relative_to(src):
        raise RuntimeError(f"the child imported splitserve from {loaded}, not from {src}")
    return result


def child_instructions(src: Path, calls: int) -> dict[str, float]:
    """Instructions per call of each point (valgrind's callgrind, one child process):
    deterministic, so one run per tree, whatever else the machine runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "--child",
                "--marked",
                "--calls",
                str(calls),
            ],
            env={**child_env(src), "PYTHONHASHSEED": "0"},  # the same dict probes each run
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
        names = json.loads(out.stdout.splitlines()[-1])
        dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.suffix[1:]))
        if len(dumps) != len(names) + 1:  # the warm-up's, then one per point
            raise RuntimeError(f"{len(dumps)} callgrind dumps for {len(names)} points")
        totals = [_callgrind_total(path) for path in dumps[1:]]
    return {name: total / calls for name, total in zip(names, totals, strict=True)}


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000, help="calls per point per round")
    parser.add_argument("--baseline", help="a git revision to compare against (its src/)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under valgrind instead of timing (slow: "
        "minutes; use --calls 300)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.marked:
        print(json.dumps(run_loop(marked_round(args.calls))))
        return 0
    if args.child:
        import splitserve

        print(
            json.dumps({**run_loop(one_round(args.calls)), "splitserve_from": splitserve.__file__})
        )
        return 0
    columns: dict[str, Path] = {"this tree": REPO_ROOT / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            archive = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "archive", args.baseline, "src"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            columns = {args.baseline: Path(tmp) / "src", **columns}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
        for r in range(1 if args.instructions else args.rounds):
            for name, src in columns.items():
                if args.instructions:
                    counts = child_instructions(src, args.calls)
                    rounds[name].append({k: v / 1000 for k, v in counts.items()})
                else:
                    rounds[name].append(child_round(src, args.calls))
            print(f"round {r + 1} done", file=sys.stderr, flush=True)
    unit = "thousand instructions per request" if args.instructions else "µs per request"
    medians = {
        name: {point: statistics.median(row[point] for row in rows) for point in rows[0]}
        for name, rows in rounds.items()
    }
    names = list(medians)
    title = unit if args.instructions else f"{unit} (median)"
    print(f"{title:<44}" + "".join(f"{n:>14}" for n in names))
    for point in medians[names[-1]]:
        values = "".join(f"{medians[n].get(point, float('nan')):14.1f}" for n in names)
        print(f"{point:<44}{values}")
    for name in names:
        m = medians[name]
        front = m["front/v2 binary HTTP, noop.model"] - m["front/plain /v1 route"]
        worker = (
            m["worker/invoke_model (v2 engine model)"] - m["worker/invoke_service (plain route)"]
        )
        plain = m["front/plain /v1 route"]
        print(
            f"{name}: v2 binary minus plain: front {front:.1f} (v2 {front / plain + 1:.2f}x "
            f"plain), worker {worker:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
