"""``splitserve bench``: a load generator for HTTP model servers (closed and open loop),
which also reads a splitserve server's ``/v1/stats``.

- ``loadgen``: ``load`` (one level, closed or open loop) and its ``Result``;
- ``bodies``: request bodies from a folder's images, a JSON file, a file or a literal;
- ``server_stats``: ``/v1/stats`` snapshots and their deltas over a window;
- ``report``: progress bar, tables, JSON, plot;
- ``servers``: start/stop ``splitserve serve`` and the trivial server by pid;
- ``trivial``: the trivial server; ``selftest``: the client's own ceiling;
- ``cli``: the ``bench`` subcommand.
"""

from __future__ import annotations

from typing import Any

# Loaded on first use: `splitserve serve` builds the `bench` parser from bench.cli, and
# should not pay for the load loops' imports.
_LAZY = {
    "Payload": "splitserve.bench.bodies",
    "ClosedLoop": "splitserve.bench.loadgen",
    "OpenLoop": "splitserve.bench.loadgen",
    "Result": "splitserve.bench.loadgen",
    "load": "splitserve.bench.loadgen",
    "parse_timings": "splitserve.bench.loadgen",
    "run_closed_loop": "splitserve.bench.loadgen",
    "run_load": "splitserve.bench.loadgen",
    "run_open_loop": "splitserve.bench.loadgen",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
