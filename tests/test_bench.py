"""``splitserve bench`` against real servers on 127.0.0.1: the trivial server (a
subprocess) for the generic parts, and ``splitserve serve`` with ``tests.services:Echo``
for the /v1/stats part. Every level is short and bounded in count."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.bench import server_stats
from splitserve.bench.cli import main as bench_main
from splitserve.bench.servers import free_port, start_trivial, stop_server
from tests.conftest import ROOT, Server

QUICK = ["--duration", "0.6", "--warmup", "0.2", "--no-progress"]


class Trivial:
    """A running trivial server, stopped by its pid."""

    def __init__(self, *options: str) -> None:
        self.proc, self.port = start_trivial(*options)
        self.url = f"http://127.0.0.1:{self.port}/v1/services/x"

    def received(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_received", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        assert stop_server(self.proc) == 0


@pytest.fixture
def trivial_factory() -> Iterator[Any]:
    started: list[Trivial] = []

    def make(*options: str) -> Trivial:
        server = Trivial(*options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def trivial() -> Iterator[Trivial]:
    server = Trivial()
    yield server
    server.stop()


def bench(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    """Run ``splitserve bench`` in this process; its exit code and its --json document."""
    out = tmp_path / "out.json"
    rc = bench_main([*argv, "--json", str(out)])
    return rc, json.loads(out.read_text())


def sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


def test_closed_loop_sweep_reports_every_level(trivial: Trivial, tmp_path, capsys) -> None:
    rc, doc = bench(tmp_path, trivial.url, "--concurrency", "1", "4", *QUICK)
    assert rc == 0
    assert [lv["label"] for lv in doc["levels"]] == ["c=1", "c=4"]
    assert doc["splitserve"] is False and doc["simulated"] == []
    assert doc["machine"]["nproc"] and doc["settings"]["concurrency"] == [1, 4]
    for level in doc["levels"]:
        assert level["mode"] == "closed" and level["client"] == "raw"
        assert level["rps"] > 50 and level["ok"] == level["requests"] > 0
        assert level["errors"] == {} and level["statuses"] == {"200": level["requests"]}
        assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert level["client_cpu_ms_per_req"] > 0
        assert level["warmup_requests"] > 0 and level["server"] is None
        assert 0.5 < level["duration_s"] < 1.0
    out = capsys.readouterr().out
    assert "req/s" in out and "p99 ms" in out and "client cpu ms/req" in out
    assert "no /v1/stats" in out


def test_throughput_counts_completions_inside_the_window(trivial_factory, tmp_path) -> None:
    # 2 clients, 100 ms per answer: 20 req/s, whether a request began in the warm-up or not.
    server = trivial_factory("--delay-ms", "100")
    argv = ["--concurrency", "2", "--duration", "1.0", "--warmup", "0.3", "--no-progress"]
    rc, doc = bench(tmp_path, server.url, *argv)
    assert rc == 0
    level = doc["levels"][0]
    assert 16 <= level["rps"] <= 22, level
    assert 95 <= level["p50_ms"] <= 140


def test_open_loop_poisson_rate(trivial: Trivial, tmp_path) -> None:
    argv = ["--rate", "200", "--duration", "1.0", "--warmup", "0.2", "--seed", "1"]
    rc, doc = bench(tmp_path, trivial.url, *argv, "--no-progress")
    assert rc == 0
    level = doc["levels"][0]
    assert level["mode"] == "open" and level["label"] == "200/s" and level["rate"] == 200
    assert 150 <= level["offered_rps"] <= 250
    assert abs(level["rps"] - level["offered_rps"]) < 0.15 * level["offered_rps"]
    assert level["dropped"] == 0 and level["errors"] == {}
    assert level["lag_p99_ms"] is not None and level["lag_p99_ms"] < 50


def test_open_loop_drops_arrivals_beyond_max_inflight(trivial_factory, tmp_path) -> None:
    # Two requests in flight at most, 200 ms each: at most 10 req/s of the 100 offered.
    server = trivial_factory("--delay-ms", "200")
    argv = ["--rate", "100", "--max-inflight", "2", "--duration", "1.0", "--warmup", "0.2"]
    rc, doc = bench(tmp_path, server.url, *argv, "--no-progress", "--seed", "2")
    assert rc == 0
    level = doc["levels"][0]
    assert level["peak_inflight"] == 2 and level["concurrency"] == 2
    assert level["dropped"] > 40
    assert level["rps"] <= 12
    assert level["p50_ms"] >= 195  # from the scheduled arrival: never less than the delay


def test_errors_by_status(trivial_factory, tmp_path, capsys) -> None:
    server = trivial_factory("--fail-every", "4")
    rc, doc = bench(tmp_path, server.url, "--concurrency", "2", *QUICK)
    assert rc == 0
    level = doc["levels"][0]
    assert set(level["errors"]) == {"503"}
    assert level["errors"]["503"] == level["requests"] - level["ok"]
    assert level["statuses"] == {"200": level["ok"], "503": level["errors"]["503"]}
    assert abs(level["errors"]["503"] / level["requests"] - 0.25) < 0.05
    assert "503:" in capsys.readouterr().out


def test_errors_by_exception_type(trivial_factory, tmp_path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/"
    rc, doc = bench(tmp_path, nobody, "--max-requests", "20", *QUICK)
    assert rc == 1  # nothing answered
    assert doc["levels"][0]["errors"] == {"ConnectionRefusedError": 20}
    slow = trivial_factory("--delay-ms", "400")
    rc, doc = bench(tmp_path, slow.url, "--timeout", "0.1", "--max-requests", "3", *QUICK)
    assert doc["levels"][0]["errors"] == {"TimeoutError": 3}


@pytest.mark.parametrize("framing", ["--chunked", "--close"])
def test_chunked_and_closing_answers(trivial_factory, tmp_path, framing: str) -> None:
    server = trivial_factory(framing)
    rc, doc = bench(tmp_path, server.url, "--concurrency", "2", *QUICK)
    assert rc == 0
    level = doc["levels"][0]
    assert level["errors"] == {} and level["ok"] > 20


def test_body_dir_round_robin_with_guessed_types(trivial_factory, tmp_path) -> None:
    bodies = tmp_path / "bodies"
    (bodies / "sub").mkdir(parents=True)
    files = {
        "a.json": (b'{"values": [1]}', "application/json"),
        "b.png": (b"\x89PNG fake", "image/png"),
        "sub/c.bin": (b"\x00\x01\x02", "application/octet-stream"),
    }
    for name, (data, _) in files.items():
        (bodies / name).write_bytes(data)
    (bodies / ".hidden").write_bytes(b"never sent")
    server = trivial_factory("--record")
    argv = ["--body-dir", str(bodies), "--max-requests", "30", "--warmup", "0", "--no-progress"]
    rc, _ = bench(tmp_path, server.url, *argv)
    assert rc == 0
    expected = {f"{ctype} {sha(data)}": 10 for data, ctype in files.values()}
    assert server.received() == expected


def test_json_body_list_and_object(trivial_factory, tmp_path) -> None:
    server = trivial_factory("--record")
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"values": [1, 2]}, {"values": [3], "rows": 2}], indent=2))
    argv = ["--max-requests", "10", "--warmup", "0", "--no-progress"]
    rc, _ = bench(tmp_path, server.url, "--json-body", str(many), *argv)
    assert rc == 0
    first, second = b'{"values":[1,2]}', b'{"values":[3],"rows":2}'
    assert server.received() == {
        f"application/json {sha(first)}": 5,
        f"application/json {sha(second)}": 5,
    }
    one = tmp_path / "one.json"
    one.write_text('{"values": [7]}')
    server2 = trivial_factory("--record")
    rc, _ = bench(tmp_path, server2.url, "--json-body", str(one), *argv)
    seven = b'{"values":[7]}'
    assert server2.received() == {f"application/json {sha(seven)}": 10}


def test_data_from_file_and_literal(trivial_factory, tmp_path) -> None:
    page = tmp_path / "page.txt"
    page.write_bytes(b"hello file")
    server = trivial_factory("--record")
    argv = ["--max-requests", "4", "--warmup", "0", "--no-progress"]
    bench(tmp_path, server.url, "--data", f"@{page}", *argv)
    bench(tmp_path, server.url, "--data", "literal", "--content-type", "text/x-demo", *argv)
    assert server.received() == {
        f"text/plain {sha(b'hello file')}": 4,
        f"text/x-demo {sha(b'literal')}": 4,
    }


def test_plot_writes_a_png(trivial: Trivial, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    rc, _ = bench(tmp_path, trivial.url, "--concurrency", "1", "2", "--plot", str(png), *QUICK)
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_server_stats_deltas_and_simulated_banner(trivial_factory, tmp_path, capsys) -> None:
    # The trivial server's made-up /v1/stats: every stage 1 ms, batches of 2, SIMULATED.
    server = trivial_factory("--fake-stats")
    rc, doc = bench(tmp_path, server.url, "--concurrency", "2", *QUICK)
    assert rc == 0
    assert doc["splitserve"] is True and doc["simulated"] == ["fake/model"]
    delta = doc["levels"][0]["server"]
    assert delta["mode"] == "fake" and delta["restarted"] is False
    assert 0.5 < delta["wall_s"] < 1.0
    answered = doc["levels"][0]["requests"]
    # The snapshots are taken at the window's edges, the answers counted by start time.
    assert abs(delta["requests"]["total"] - answered) <= max(10, 0.05 * answered)
    assert delta["stages_ms_mean"]["worker"] == pytest.approx(1.0)
    assert delta["stages_ms_mean"]["engine_queue"] == pytest.approx(0.5)
    model = delta["models"]["fake/model"]
    assert model["simulated"] is True and 1.8 <= model["mean_batch"] <= 2.2
    assert delta["engines"]["0"]["busy_fraction"] == pytest.approx(0.25)
    out = capsys.readouterr().out
    assert out.count("SIMULATED ACCELERATOR: fake/model") == 2  # above and below the tables
    assert "batch fake/model [SIMULATED]" in out and "engine 0 busy" in out


def test_stats_delta_of_a_restarted_server() -> None:
    before = {"uptime_s": 100.0, "requests": {"total": 50}}
    after = {"uptime_s": 3.0, "requests": {"total": 2}}
    assert server_stats.delta(before, after)["restarted"] is True
    assert server_stats.delta(None, after) is None


def test_selftest_prints_the_client_ceiling(tmp_path) -> None:
    out = tmp_path / "selftest.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "--selftest", "--no-progress"]
    cmd += ["--concurrency", "1", "8", "--duration", "0.6", "--warmup", "0.2"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "client ceiling (raw client):" in proc.stdout
    assert "ms client CPU per request" in proc.stdout
    doc = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 8]
    assert all(lv["rps"] > 100 for lv in doc["levels"])


def test_serve_subcommand_still_there() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "--cpu-workers" in proc.stdout


def test_benchmarks_loadgen_reexports() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loadgen
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in (
        "closed_loop",
        "run_closed_loop",
        "Result",
        "parse_timings",
        "start_server",
        "stop_server",
        "free_port",
        "machine",
        "REPO_ROOT",
    ):
        assert hasattr(loadgen, name), name
    assert loadgen.parse_timings("a=1.5,bad,b=2") == {"a": 1.5, "b": 2.0}


@pytest.fixture(scope="module")
def echo_server() -> Iterator[Server]:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2")
    yield server
    server.stop()


def test_splitserve_server_stats(echo_server: Server, tmp_path, capsys) -> None:
    """Needs the server's GET /v1/stats (splitserve/stats.py, protocol/rest.py)."""
    stats = server_stats.fetch(f"{echo_server.url}/v1/stats")
    if stats is None:
        pytest.xfail("GET /v1/stats is not served yet")
    body = tmp_path / "echo.json"
    body.write_text(json.dumps([{"values": [1.0, 2.0, 3.0, 4.0]}, {"values": [5.0, 6.0]}]))
    url = f"{echo_server.url}/v1/services/echo"
    argv = ["--json-body", str(body), "--concurrency", "4", "--duration", "2.5", "--warmup", "0.5"]
    rc, doc = bench(tmp_path, url, *argv, "--no-progress")
    assert rc == 0
    level = doc["levels"][0]
    assert level["errors"] == {} and level["ok"] > 20
    assert level["timings_ms"]  # the X-Splitserve-Timings header was read
    assert doc["splitserve"] is True and doc["simulated"] == []
    delta = level["server"]
    assert delta["mode"] == "split" and delta["restarted"] is False
    assert delta["requests"]["by_status"].get("200", 0) >= level["ok"] * 0.8
    assert delta["stages_ms_mean"]["worker"] > 0
    (model,) = delta["models"].values()
    assert model["simulated"] is False and model["batches"] > 0
    assert 1.0 <= model["mean_batch"] <= 8.0
    busy = [e["busy_fraction"] for e in delta["engines"].values()]
    assert busy and all(b is not None and 0 < b <= 1.0 for b in busy)
    out = capsys.readouterr().out
    assert "server: splitserve (mode split)" in out and "SIMULATED" not in out
