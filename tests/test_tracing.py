"""Traces (``--trace``): real servers export to a real OTLP/HTTP receiver in this test,
whose requests are decoded with OpenTelemetry's own protobuf classes; clients send W3C
``traceparent`` headers (HTTP) and metadata (gRPC) and read the one answered."""

from __future__ import annotations

import gzip
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

# Triton's client messages (the server's own inference_pb2 declares the same protobuf
# package, and tritonclient's are loaded in this process by test_v2_clients already)
from tritonclient.grpc import service_pb2 as pb

from splitserve.config import ServerConfig
from splitserve.protocol import tracing
from tests.conftest import Server, free_port

SERVICES = ["tests.services:Echo", "tests.services:Pipeline", "tests.services:Misbehave"]
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# the standard variables: spans leave the front within 50 ms, under this service name
TRACE_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "splitserve-test"}


class OtlpReceiver:
    """An OTLP/HTTP trace collector on 127.0.0.1: keeps every span it is sent, with its
    resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource)
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend((resource, s) for s in scope_spans.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def trace(
        self, trace_id: str, until: Callable[[list[Span]], bool], timeout: float = 20
    ) -> list[Span]:
        """The spans of one trace, once ``until`` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for _, s in self.spans if s.trace_id.hex() == trace_id]
            if until(found):
                return found
            assert time.monotonic() < deadline, f"trace {trace_id}: {[s.name for s in found]}"
            time.sleep(0.05)

    def resources(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r, s in self.spans if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(item: Any) -> dict[str, Any]:
    values = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module", params=["split", "threaded"])
def server(request, receiver: OtlpReceiver) -> Iterator[Server]:
    grpc_port = free_port()
    args = ["--trace", receiver.url, "--grpc-port", str(grpc_port)]
    if request.param == "threaded":
        args += ["--mode", "threaded"]
    # PYTHONVERBOSE: the interpreters log every module they import (see test_off)
    server = Server(SERVICES, *args, env={**TRACE_ENV, "PYTHONVERBOSE": "1"})
    server.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    yield server
    server.stop()


def new_traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def answered(traceparent: str | None) -> tuple[str, str, bool]:
    """The trace id, the span id and the sampled flag of a traceparent answered."""
    assert traceparent is not None, "no traceparent answered"
    match = TRACEPARENT.match(traceparent)
    assert match, traceparent
    return match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)


def by_id(spans: list[Span]) -> dict[bytes, Span]:
    return {s.span_id: s for s in spans}


def children(spans: list[Span], parent: Span, name: str | None = None) -> list[Span]:
    found = [s for s in spans if s.parent_span_id == parent.span_id]
    found = [s for s in found if name is None or s.name == name]
    return sorted(found, key=lambda s: s.start_time_unix_nano)


def names(spans: list[Span]) -> list[str]:
    return [s.name for s in spans]


def check_tree(spans: list[Span], root: Span) -> None:
    """Every span of the trace hangs below ``root``, inside its parent's time."""
    index = by_id(spans)
    for span in spans:
        assert span.start_time_unix_nano <= span.end_time_unix_nano, span.name
        if span is root:
            continue
        parent = index[span.parent_span_id]  # no dangling parent
        assert parent.start_time_unix_nano <= span.start_time_unix_nano, (parent.name, span.name)
        assert span.end_time_unix_nano <= parent.end_time_unix_nano, (parent.name, span.name)
        while parent is not root:
            parent = index[parent.parent_span_id]


def has_compute(count: int) -> Callable[[list[Span]], bool]:
    """Until the trace's server span and ``count`` engine computes arrived."""

    def done(spans: list[Span]) -> bool:
        kinds = [s.kind for s in spans]
        return Span.SPAN_KIND_SERVER in kinds and names(spans).count("engine.compute") >= count

    return done


def check_engine_call(spans: list[Span], infer: Span, mode: str, model: str) -> None:
    assert attributes(infer)["splitserve.model"] == model
    inside = children(spans, infer)
    if mode == "split":  # the engine's own stages, from the engine process
        assert names(inside) == ["engine.queue", "engine.slot_wait", "engine.compute"]
        assert isinstance(attributes(infer)["splitserve.engine"], int)
    else:
        assert names(inside) == ["engine.compute"]
    compute = attributes(inside[-1])
    assert compute["splitserve.batch_size"] >= compute["splitserve.rows"] == 1


def test_http_request(server: Server, receiver: OtlpReceiver) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    r = server.post("echo", json={"values": [1, 2]}, headers={"traceparent": traceparent})
    assert r.status_code == 200, r.text
    answered_trace, server_span_id, sampled = answered(r.headers.get("traceparent"))
    assert answered_trace == trace_id and sampled

    spans = receiver.trace(trace_id, has_compute(1))
    (root,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert root.name == "POST /v1/services/{name}"
    assert root.parent_span_id.hex() == client_span  # the client's span is the parent
    assert root.span_id.hex() == server_span_id  # the answer names the server span
    http = attributes(root)
    assert http["http.response.status_code"] == 200
    assert http["url.path"] == "/v1/services/echo"
    check_tree(spans, root)

    (dispatch,) = children(spans, root)
    assert dispatch.name == "dispatch"
    assert attributes(dispatch)["splitserve.service"] == "echo"
    assert names(children(spans, dispatch)) == ["queue", "job"]
    job = children(spans, dispatch, "job")[0]
    assert attributes(job)["splitserve.status"] == 200
    # Echo keeps the default handle: preprocess, the one model, postprocess
    assert names(children(spans, job)) == ["preprocess", "infer", "postprocess"]
    check_engine_call(spans, children(spans, job, "infer")[0], server.mode, "echo/model")
    assert {r["service.name"] for r in receiver.resources(trace_id)} == {"splitserve-test"}
    if server.mode == "split":  # stages of three processes in one trace
        pids = {attributes(s).get("process.pid") for s in spans} - {None}
        assert len(pids) == 2  # the CPU worker's and the engine's (the front is the resource)


def test_pipeline_two_models(server: Server, receiver: OtlpReceiver) -> None:
    traceparent, trace_id, _ = new_traceparent()
    r = server.post("pipeline", json={"values": [1, 2]}, headers={"traceparent": traceparent})
    assert r.status_code == 200, r.text
    assert answered(r.headers["traceparent"])[0] == trace_id

    spans = receiver.trace(trace_id, has_compute(2))
    (root,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    check_tree(spans, root)
    (job,) = [s for s in spans if s.name == "job"]
    calls = children(spans, job)  # its own handle: no preprocess/postprocess to tell apart
    assert names(calls) == ["infer", "infer"]
    for call, model in zip(calls, ["pipeline/first", "pipeline/second"], strict=True):
        check_engine_call(spans, call, server.mode, model)
    assert calls[0].end_time_unix_nano <= calls[1].start_time_unix_nano  # one after the other


def test_grpc_request(server: Server, receiver: OtlpReceiver) -> None:
    """A service model over gRPC with two request elements: two jobs under one span."""
    traceparent, trace_id, client_span = new_traceparent()
    request = pb.ModelInferRequest(model_name="echo")
    request.parameters["content_type"].string_param = "application/json"
    tensor = request.inputs.add(name="request", datatype="BYTES", shape=[2])
    for values in ([1.0], [2.0, 3.0]):
        tensor.contents.bytes_contents.append(json.dumps({"values": values}).encode())
    with grpc.insecure_channel(server.grpc_url) as channel:  # type: ignore[attr-defined]
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response, call = infer.with_call(request, metadata=[("traceparent", traceparent)])
    assert len(response.raw_output_contents) == 1
    metadata = dict(call.initial_metadata())
    answered_trace, server_span_id, _ = answered(metadata.get("traceparent"))
    assert answered_trace == trace_id

    spans = receiver.trace(trace_id, has_compute(2))
    (root,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert root.name == "inference.GRPCInferenceService/ModelInfer"
    assert root.parent_span_id.hex() == client_span and root.span_id.hex() == server_span_id
    assert attributes(root)["rpc.grpc.status_code"] == 0
    check_tree(spans, root)
    dispatches = children(spans, root)
    assert names(dispatches) == ["dispatch", "dispatch"]
    for dispatch in dispatches:
        (job,) = children(spans, dispatch, "job")
        assert names(children(spans, job)) == ["preprocess", "infer", "postprocess"]

    # a refused call: its code on the span, not counted as the server's failure
    traceparent, trace_id, _ = new_traceparent()
    with grpc.insecure_channel(server.grpc_url) as channel:  # type: ignore[attr-defined]
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            infer(pb.ModelInferRequest(model_name="nope"), metadata=[("traceparent", traceparent)])
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert answered(dict(refused.value.initial_metadata()).get("traceparent"))[0] == trace_id
    (root,) = receiver.trace(trace_id, lambda found: len(found) == 1)
    assert attributes(root)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert root.status.code != Status.STATUS_CODE_ERROR


def test_v2_engine_model_and_errors(server: Server, receiver: OtlpReceiver) -> None:
    """A direct engine model call has no pre/postprocess; a failing request's spans are
    marked as errors down to the stage that failed."""
    traceparent, trace_id, _ = new_traceparent()
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    deadline = time.monotonic() + 30  # until an engine reported the model's signature
    while (r := server.client.get("/v2/models/echo.model/ready")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    r = server.client.post(
        "/v2/models/echo.model/infer", json=doc, headers={"traceparent": traceparent}
    )
    assert r.status_code == 200, r.text
    spans = receiver.trace(trace_id, has_compute(1))
    (root,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert root.name == "POST /v2/models/{name}/infer"
    check_tree(spans, root)
    (job,) = [s for s in spans if s.name == "job"]
    assert names(children(spans, job)) == ["infer"]

    # a body the service refuses is the client's error: no span marked failed
    traceparent, trace_id, _ = new_traceparent()
    r = server.post("echo", json={"values": [1], "rows": 0}, headers={"traceparent": traceparent})
    assert r.status_code == 422
    spans = receiver.trace(trace_id, lambda found: len(found) >= 4)
    assert {s.name for s in spans} == {"POST /v1/services/{name}", "dispatch", "queue", "job"}
    assert all(s.status.code != Status.STATUS_CODE_ERROR for s in spans)
    (job,) = [s for s in spans if s.name == "job"]
    assert attributes(job)["splitserve.status"] == 422


def test_server_error(server: Server, receiver: OtlpReceiver) -> None:
    """A 500 marks the spans failed down to the stage that failed: here the engine's
    batch, whose 0-d output cannot be split into rows (split mode's check)."""
    if server.mode == "threaded":
        pytest.skip("threaded mode hands a model's outputs over unchecked")
    traceparent, trace_id, _ = new_traceparent()
    r = server.post("misbehave", json={"scalar": True}, headers={"traceparent": traceparent})
    assert r.status_code == 500, r.text
    spans = receiver.trace(
        trace_id, lambda found: {"infer", "POST /v1/services/{name}"} <= set(names(found))
    )
    failed = {s.name for s in spans if s.status.code == Status.STATUS_CODE_ERROR}
    assert failed == {"POST /v1/services/{name}", "dispatch", "job", "infer"}
    (call,) = [s for s in spans if s.name == "infer"]
    assert attributes(call)["error.type"] == "engine_error"
    assert attributes(call)["splitserve.model"] == "misbehave/scalar"


def test_unsampled_and_new_traces(server: Server, receiver: OtlpReceiver) -> None:
    """An unsampled parent records nothing anywhere (its trace id is answered); no
    traceparent starts a trace of the server's own."""
    unsampled, skipped_trace, _ = new_traceparent(sampled=False)
    r = server.post("echo", json={"values": [1]}, headers={"traceparent": unsampled})
    assert r.status_code == 200
    assert answered(r.headers["traceparent"])[::2] == (skipped_trace, False)

    r = server.post("echo", json={"values": [1]})  # no traceparent
    new_trace, server_span_id, sampled = answered(r.headers["traceparent"])
    assert sampled and new_trace != skipped_trace
    spans = receiver.trace(new_trace, has_compute(1))
    (root,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert root.parent_span_id == b"" and root.span_id.hex() == server_span_id
    # spans leave in the order they end: the unsampled request's would be here by now
    assert receiver.trace(skipped_trace, lambda found: True) == []

    # routes that are not inference are not traced
    r = server.client.get("/health/ready", headers={"traceparent": new_traceparent()[0]})
    assert "traceparent" not in r.headers


def test_import_log_shows_the_exporter(server: Server) -> None:
    """The control of test_off: with tracing on, the interpreters' own import log shows
    the exporter loaded (by the front: import-linter keeps it out of workers and
    engines)."""
    assert re.search(r"^import 'opentelemetry\.exporter", server.log(), re.MULTILINE)


def test_off() -> None:
    """Tracing off (the default): no traceparent answered, and no process of the server
    imported any OpenTelemetry module (PYTHONVERBOSE: the interpreter logs each import)."""
    server = Server(["tests.services:Echo"], env={"PYTHONVERBOSE": "1"})
    try:
        traceparent, _, _ = new_traceparent()
        r = server.post("echo", json={"values": [1]}, headers={"traceparent": traceparent})
        assert r.status_code == 200
        assert "traceparent" not in r.headers
        log = server.log()
        assert re.search(r"^import 'numpy'", log, re.MULTILINE)  # the log is the import log
        assert not re.search(r"^import 'opentelemetry", log, re.MULTILINE)
    finally:
        server.stop()


def test_settings() -> None:
    assert ServerConfig().trace == "off"
    with pytest.raises(ValueError, match="trace must be"):
        ServerConfig(trace="yes")
    assert tracing.endpoint("on") is None  # the exporter reads OTEL_EXPORTER_OTLP_*
    assert tracing.endpoint("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.endpoint("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert tracing.inference_route("/v1/services/echo") == "/v1/services/{name}"
    assert tracing.inference_route("/v2/models/m/versions/1/infer") == (
        "/v2/models/{name}/versions/{version}/infer"
    )
    assert tracing.inference_route("/v1/stats") is None
    assert tracing.inference_route("/v2/models/m/ready") is None
