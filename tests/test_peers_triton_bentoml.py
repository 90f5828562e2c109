"""Triton and BentoML as peers: each serves the OCR service, answers as RapidOCR does,
listens on 127.0.0.1 only, takes a short load without errors and leaves no process
behind; and the load generator really sends the extra headers Triton's requests need.

The Triton test needs its own virtual environment (``make peers-venvs``), the BentoML
one the peers extra; each is skipped, saying so, where that is missing.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from benchmarks.peers import run_peers
from benchmarks.peers.common import HeaderPayload, payload_headers
from splitserve.bench.loadgen import run_closed_loop

# A short run, measured from the first request: 20 s hold a few answers even when other
# work shares the machine (one image takes ~0.6 s of both cores alone, over 10 s then).
SHORT_RUN = ("--images", "3", "--concurrency", "2", "--duration", "20", "--warmup", "0")


def _quick_run(name: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A short ``run_peers --only NAME``: (its start record, its whole output)."""
    code = run_peers.main([*SHORT_RUN, "--only", name, "--out", str(tmp_path)])
    out = json.loads((tmp_path / "peers.json").read_text())
    assert code == 0, json.dumps(out["starts"], indent=2)
    (start,) = out["starts"]
    assert "error" not in start, start.get("error")
    assert start["check"]["equivalent"], start["check"]
    assert start["listening"] and start["listening_beyond_loopback"] == [], start
    assert start["stop"]["left_running"] == [], start["stop"]
    (row,) = out["rows"]
    assert row["ok"] > 0 and row["errors"] == {}, row
    return start, out


@pytest.mark.skipif(
    not run_peers.venv_python(run_peers.TRITON_VENV).exists(),
    reason=f"Triton runs in its own venv {run_peers.TRITON_VENV}/, not built here "
    "(make peers-venvs)",
)
def test_quick_run_of_triton(tmp_path: Path) -> None:
    start, out = _quick_run("triton", tmp_path)
    assert start["server"]["name"] == "triton" and start["server"]["version"], start
    # HTTP, gRPC and metrics: every port Triton opens is on 127.0.0.1.
    assert len([s for s in start["listening"] if "tritonserver" in s]) == 3, start
    assert out["versions"][run_peers.TRITON_VENV]["nvidia-pytriton"]


@pytest.mark.skipif(
    importlib.util.find_spec("bentoml") is None,
    reason="BentoML is not installed (the peers extra: pip install -e '.[peers]')",
)
def test_quick_run_of_bentoml(tmp_path: Path) -> None:
    start, out = _quick_run("bentoml", tmp_path)
    assert len(start["processes"]) == 2  # both workers loaded the models
    assert out["versions"]["bentoml"]
    assert "worker_ms" in out["rows"][0]["timings_ms"]  # the reply's headers came back


class _HeaderEcho(BaseHTTPRequestHandler):
    """Answers 200 when the request carries ``X-Extra: <its body>``, 400 otherwise."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server calls it by this name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.headers.get("X-Extra") == body.decode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_payload_headers_reach_the_server() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeaderEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        bodies = [HeaderPayload(b, "text/plain", (("X-Extra", b.decode()),)) for b in (b"a", b"b")]
        with payload_headers():
            sent = run_closed_loop(url, bodies, "text/plain", 2, 0.5, 0.0, 20)
        assert sent.ok == sent.requests > 0 and sent.errors == {}, sent
        # Without the context the headers are not sent: the server says so.
        plain = run_closed_loop(url, bodies, "text/plain", 1, 0.3, 0.0, 5)
        assert plain.ok == 0 and plain.errors.get("400") == plain.requests > 0, plain
    finally:
        server.shutdown()
        server.server_close()
