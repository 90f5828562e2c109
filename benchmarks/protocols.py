"""Protocol v2 costs, side by side on one split-mode server (2 CPU workers).

1. **Tensor transport**: a 1080p uint8 image tensor [1, 1080, 1920, 3] (6.2 MB) to a bare
   engine model (a uint8 identity model this script writes) over v2 JSON, v2 binary
   HTTP (Triton's binary tensor extension, binary output asked) and gRPC (raw contents):
   requests/s at concurrency 2 (JSON: a fixed number of requests, each takes seconds).
   Floors: binary >= 5x JSON; gRPC within 20% of binary.
2. **Protocol overhead**: the no-op (examples/noop) at concurrency 1: the plain route
   ``POST /v1/services/noop`` (16 bytes) against ``noop.model`` over v2 binary (the same
   four float32 values) and the ``noop`` service model over v2 binary; p50s. Floor: v2
   binary p50 within 15% of the plain route's.
3. **Scraping**: the plain no-op route at concurrency 16 (the machine saturated), with
   and without a client reading ``/metrics`` every 100 ms. Floor: < 3% fewer requests/s.
   Because that difference drowns in a shared machine's noise, the server's own CPU
   per scrape is also measured (from /proc, all its processes, 200 scrapes on an idle
   server): at 10 Hz it costs 10 x that per second, of the machine's cores.

Bodies are built once; clients are aiohttp (HTTP) and grpc.aio with pre-serialized
messages (gRPC), so client CPU is alike; answers are checked once per configuration,
then read but not decoded. Configurations run in interleaved rounds (the machine is
shared and noisy) and the medians over rounds are reported.

Run: ``python benchmarks/protocols.py [--rounds 3] [--duration 6] [--json PATH]``; only
the no-op floor (about a minute): ``--parts noop``. The per-request Python of each route,
in-process and without the noise of a full server: ``benchmarks/v2_overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import REPO_ROOT, finish_report, free_port, machine, start_server, stop_server
from noop import server_cpu

import splitserve

FRAMES_MODEL = REPO_ROOT / "benchmarks" / "_models" / "identity_u8_image.onnx"
NOOP_MODEL = REPO_ROOT / "examples" / "noop" / "identity.onnx"
SHAPE = (1, 1080, 1920, 3)
NOOP_VALUES = np.arange(4, dtype=np.float32)


class Frames(splitserve.Service):
    """A bare uint8 identity model on image-shaped tensors (called as ``frames.model``)."""

    name = "frames"
    model = splitserve.Model(str(FRAMES_MODEL), max_batch_size=4, max_delay_ms=1)

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        raise splitserve.BadRequest("call frames.model with tensors")


def make_frames_model(path: Path = FRAMES_MODEL) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", "h", "w", 3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["batch", "h", "w", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "frames", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --- request bodies -------------------------------------------------------------------


def v2_json(name: str, arr: np.ndarray, datatype: str) -> tuple[bytes, dict[str, str]]:
    doc = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape),
                "data": arr.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    return json.dumps(doc, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def v2_binary(
    name: str, arr: np.ndarray, datatype: str, output: str = "y"
) -> tuple[bytes, dict[str, str]]:
    raw = arr.tobytes() if arr.dtype != object else _bytes_elements(arr)
    doc = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    header = json.dumps(doc, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + raw, headers


def _bytes_elements(arr: np.ndarray) -> bytes:
    from splitserve.protocol.datatypes import join_bytes

    return join_bytes(arr)


def grpc_request(model: str, name: str, arr: np.ndarray, datatype: str) -> bytes:
    from splitserve.protocol.grpc_v2 import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
    request.raw_input_contents.append(arr.tobytes())
    return request.SerializeToString()


# --- closed loops ----------------------------------------------------------------------


async def closed_loop(
    call: Callable[[], Awaitable[None]], concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """``concurrency`` clients calling ``call`` back to back; the window after warm-up."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    async def client() -> None:
        nonlocal errors
        while True:
            began = time.perf_counter()
            if began >= end:
                return
            try:
                await call()
            except Exception:
                errors += 1
                continue
            done = time.perf_counter()
            if began >= measure_from and done <= end:
                latencies.append((done - began) * 1000)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / duration_s,
        "p50_ms": latencies[n // 2] if n else float("nan"),
        "p90_ms": latencies[int(n * 0.9)] if n else float("nan"),
        "errors": errors,
    }


async def fixed_count(call: Callable[[], Awaitable[None]], concurrency: int, count: int) -> dict:
    """``count`` calls by ``concurrency`` clients (for calls too slow for a time window)."""
    latencies: list[float] = []
    errors = 0
    remaining = count

    async def client() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] if n else float("nan"),
        "p90_ms": latencies[int(n * 0.9)] if n else float("nan"),
        "errors": errors,
    }


def http_call(session: Any, url: str, body: bytes, headers: dict[str, str]) -> Callable:
    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")

    return call


def grpc_call(channel: Any, message: bytes) -> Callable:
    method = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def call() -> None:
        await method(message)  # bytes in, bytes out: no client-side (de)serialization

    return call


async def check_http(session: Any, url: str, body: bytes, headers: dict[str, str]) -> bytes:
    async with session.post(url, data=body, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {data[:300]!r}")
        return data


# --- the benchmark ---------------------------------------------------------------------


async def measure_all(args: argparse.Namespace, port: int, grpc_port: int) -> dict[str, Any]:
    import aiohttp
    import grpc

    base = f"http://127.0.0.1:{port}"
    limit = 64 << 20
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{grpc_port}",
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    connector = aiohttp.TCPConnector(limit=0)
    results: dict[str, list[dict[str, Any]]] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        noop_binary, noop_headers = v2_binary("x", NOOP_VALUES[None, :], "FP32")
        service_binary, service_headers = v2_binary(
            "request", np.array([NOOP_VALUES.tobytes()], dtype=object), "BYTES", "response"
        )
        plain = (
            f"{base}/v1/services/noop",
            NOOP_VALUES.tobytes(),
            {"Content-Type": "application/octet-stream"},
        )

        # correctness, once each
        await check_http(session, *plain[:1], plain[1], plain[2])
        await check_http(session, f"{base}/v2/models/noop.model/infer", noop_binary, noop_headers)
        await check_http(session, f"{base}/v2/models/noop/infer", service_binary, service_headers)
        tensor = await tensor_calls(session, channel, base) if "tensor" in args.parts else {}
        noop = {
            "plain /v1 route": http_call(session, *plain),
            "v2 binary, noop.model": http_call(
                session, f"{base}/v2/models/noop.model/infer", noop_binary, noop_headers
            ),
            "v2 binary, noop service": http_call(
                session, f"{base}/v2/models/noop/infer", service_binary, service_headers
            ),
        }
        scrape_stop = asyncio.Event()

        async def scraper() -> None:
            while not scrape_stop.is_set():
                async with session.get(f"{base}/metrics") as resp:
                    await resp.read()
                await asyncio.sleep(0.1)

        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name, call in rotate(tensor, r) if "tensor" in args.parts else ():
                if "JSON" in name:  # seconds per request: a fixed count, not a window
                    row = await fixed_count(call, 2, args.json_requests)
                else:
                    row = await closed_loop(call, 2, args.duration, 1.0)
                results.setdefault(f"tensor/{name}", []).append(row)
                report(f"tensor/{name}", row)
            for name, call in rotate(noop, r) if "noop" in args.parts else ():
                row = await closed_loop(call, 1, args.duration, 1.0)
                results.setdefault(f"noop/{name}", []).append(row)
                report(f"noop/{name}", row)
            scrape_points = {"no scrape": False, "scrape 10 Hz": True}
            for scraping in rotate(scrape_points, r) if "metrics" in args.parts else ():
                task = None
                if scraping[1]:
                    scrape_stop.clear()
                    task = asyncio.create_task(scraper())
                row = await closed_loop(noop["plain /v1 route"], 16, args.duration, 1.0)
                if task is not None:
                    scrape_stop.set()
                    await task
                results.setdefault(f"metrics/{scraping[0]}", []).append(row)
                report(f"metrics/{scraping[0]}", row)
        if "metrics" in args.parts:
            results["scrape_cpu"] = [await scrape_cpu(session, base, args.server_pid)]
    await channel.close()
    return results


async def tensor_calls(session: Any, channel: Any, base: str) -> dict[str, Callable]:
    """The image-tensor calls (bodies built and answers checked once: seconds for JSON)."""
    from splitserve.protocol.grpc_v2 import inference_pb2 as pb

    image = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    frames_url = f"{base}/v2/models/frames.model/infer"
    json_body, json_headers = v2_json("x", image, "UINT8")
    binary_body, binary_headers = v2_binary("x", image, "UINT8")
    answer = await check_http(session, frames_url, binary_body, binary_headers)
    header_len = len(answer) - image.nbytes
    assert np.array_equal(np.frombuffer(answer[header_len:], np.uint8).reshape(SHAPE), image)
    doc = json.loads(await check_http(session, frames_url, json_body, json_headers))
    assert doc["outputs"][0]["data"][:8] == image.ravel()[:8].tolist()
    message = grpc_request("frames.model", "x", image, "UINT8")
    reply = pb.ModelInferResponse.FromString(
        await channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message)
    )
    assert reply.raw_output_contents[0] == image.tobytes()
    return {
        "v2 JSON": http_call(session, frames_url, json_body, json_headers),
        "v2 binary HTTP": http_call(session, frames_url, binary_body, binary_headers),
        "gRPC raw": grpc_call(channel, message),
    }


async def scrape_cpu(session: Any, base: str, pid: int, scrapes: int = 200) -> dict[str, Any]:
    """The server's CPU time (all processes) per ``/metrics`` scrape, the server idle."""
    await asyncio.sleep(1.0)  # the last load's answers settle
    idle_before = sum(server_cpu(pid).values())
    await asyncio.sleep(2.0)
    idle_s = (sum(server_cpu(pid).values()) - idle_before) / 2.0  # CPU s per s, idle
    before = sum(server_cpu(pid).values())
    started = time.perf_counter()
    for _ in range(scrapes):
        async with session.get(f"{base}/metrics") as resp:
            await resp.read()
    wall = time.perf_counter() - started
    used = sum(server_cpu(pid).values()) - before - idle_s * wall
    per_scrape_ms = used / scrapes * 1000
    return {
        "cpu_ms_per_scrape": per_scrape_ms,
        "cores_at_10hz": per_scrape_ms * 10 / 1000,
        "share_of_machine_at_10hz": per_scrape_ms * 10 / 1000 / (os.cpu_count() or 1),
        "wall_ms_per_scrape": wall / scrapes * 1000,
        "rps": scrapes / wall,
        "p50_ms": wall / scrapes * 1000,
        "errors": 0,
    }


def rotate(items: dict[str, Any], r: int) -> list[tuple[str, Any]]:
    pairs = list(items.items())
    k = r % len(pairs)
    return pairs[k:] + pairs[:k]


def report(name: str, row: dict[str, Any]) -> None:
    print(
        f"  {name:<36} {row['rps']:9.1f} req/s  p50 {row['p50_ms']:8.2f} ms  "
        f"errors {row['errors']}",
        flush=True,
    )


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds, and the ratios and floors of the parts that ran."""
    results = dict(results)
    scrape = results.pop("scrape_cpu", [None])[0]
    med = {
        k: {
            "rps": statistics.median(r["rps"] for r in rows),
            "p50_ms": statistics.median(r["p50_ms"] for r in rows),
            "rounds": [round(r["rps"], 2) for r in rows],
            "errors": sum(r["errors"] for r in rows),
        }
        for k, rows in results.items()
    }
    ratios: dict[str, float] = {}
    floors: dict[str, bool] = {}
    if "tensor/v2 binary HTTP" in med:
        binary = med["tensor/v2 binary HTTP"]["rps"]
        ratios["binary_over_json"] = binary / med["tensor/v2 JSON"]["rps"]
        ratios["grpc_over_binary"] = med["tensor/gRPC raw"]["rps"] / binary
        floors["binary >= 5x JSON"] = ratios["binary_over_json"] >= 5
        floors["gRPC within 20% of binary"] = abs(ratios["grpc_over_binary"] - 1) <= 0.2
    if "noop/plain /v1 route" in med:
        plain = med["noop/plain /v1 route"]["p50_ms"]
        ratios["v2_binary_p50_over_plain"] = med["noop/v2 binary, noop.model"]["p50_ms"] / plain
        ratios["v2_service_p50_over_plain"] = med["noop/v2 binary, noop service"]["p50_ms"] / plain
        floors["v2 binary p50 within 15% of plain"] = ratios["v2_binary_p50_over_plain"] <= 1.15
    if "metrics/no scrape" in med:
        ratios["scrape_rps_change"] = (
            med["metrics/scrape 10 Hz"]["rps"] / med["metrics/no scrape"]["rps"] - 1
        )
        floors["scraping costs < 3% req/s"] = ratios["scrape_rps_change"] > -0.03
    if scrape is not None:
        ratios["scrape_share_of_machine_at_10hz"] = scrape["share_of_machine_at_10hz"]
    return {"medians": med, "ratios": ratios, "floors": floors, "scrape_cpu": scrape}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per point")
    parser.add_argument(
        "--json-requests", type=int, default=4, help="v2 JSON image requests per round"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["tensor", "noop", "metrics"],
        default=["tensor", "noop", "metrics"],
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not NOOP_MODEL.exists():
        from examples.noop.make_model import make_identity_model

        make_identity_model(NOOP_MODEL)
    make_frames_model()
    began = time.monotonic()
    loadavg = machine()["loadavg_1_5_15"]
    port, grpc_port = free_port(), free_port()
    services = ["examples.noop.service:Noop", "benchmarks/protocols.py:Frames"]
    proc = start_server(
        [
            *services,
            "--cpu-workers",
            "2",
            "--grpc-port",
            str(grpc_port),
            "--max-body-bytes",
            str(64 << 20),
        ],
        port,
    )
    args.server_pid = proc.pid
    try:
        results = asyncio.run(measure_all(args, port, grpc_port))
    finally:
        print(f"server stopped (exit code {stop_server(proc)})", flush=True)
    summary = summarise(results)
    print(json.dumps({"ratios": summary["ratios"], "floors": summary["floors"]}, indent=2))
    out = {
        "summary": summary,
        "results": results,
        "machine": machine(),
        "settings": {
            **vars(args),
            "json": str(args.json),
            "loadavg_at_start": loadavg,
            "wall_s": time.monotonic() - began,
        },
    }
    finish_report(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
