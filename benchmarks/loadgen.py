"""The load generator moved into the package (``splitserve.bench``); this module keeps
the names the scripts here import (noop.py, transport.py, ocr_modes.py).

``start_server`` here runs the server from the repository root, as the scripts expect
(their services are ``examples.*`` modules).

Run directly for a one-off load test, as ``splitserve bench`` (same options)::

    python benchmarks/loadgen.py http://127.0.0.1:8000/v1/services/noop --concurrency 4
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from splitserve.bench.loadgen import (
    CLIENTS,
    REQUEST_TIMEOUT_S,
    TIMINGS_HEADER,
    ClosedLoop,
    OpenLoop,
    Result,
    load,
    parse_timings,
    percentile,
    run_closed_loop,
    run_load,
    run_open_loop,
)
from splitserve.bench.report import machine
from splitserve.bench.servers import free_port, stop_server
from splitserve.bench.servers import start_server as _start_server

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "CLIENTS",
    "REPO_ROOT",
    "REQUEST_TIMEOUT_S",
    "TIMINGS_HEADER",
    "ClosedLoop",
    "OpenLoop",
    "Result",
    "finish_report",
    "free_port",
    "load",
    "machine",
    "parse_timings",
    "percentile",
    "run_closed_loop",
    "run_load",
    "run_open_loop",
    "start_server",
    "stop_server",
]


def start_server(
    args: list[str], port: int, ready_timeout_s: float = 120.0, log_path: Path | None = None
) -> subprocess.Popen:
    """``splitserve serve *args`` on 127.0.0.1:PORT from the repository root (see
    ``splitserve.bench.servers.start_server``)."""
    return _start_server(args, port, ready_timeout_s, log_path, cwd=REPO_ROOT)


if __name__ == "__main__":
    from splitserve.bench.cli import main

    sys.exit(main())


def finish_report(results: dict, json_path: Path | None) -> None:
    """The closing line every script prints (machine, load, date, wall time), and its JSON.

    ``results`` holds ``machine`` (from ``machine()`` at the end) and ``settings`` with
    ``loadavg_at_start`` and ``wall_s``.
    """
    import json

    m = results["machine"]
    print(
        f"Machine: {m['nproc']} cores, {m['cpu']}; load average "
        f"{results['settings']['loadavg_at_start'][0]:.2f} at start, "
        f"{m['loadavg_1_5_15'][0]:.2f} at end; "
        f"{m['date']}; {results['settings']['wall_s']:.0f} s"
    )
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
