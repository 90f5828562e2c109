"""``splitserve bench``: the command line of the load generator.

This module imports only argparse at parse time, so ``splitserve serve`` pays nothing
for the bench; the loops, tqdm and (with ``--plot``) matplotlib load when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Load generator for HTTP model servers, in the spirit of Triton's perf_analyzer.
Closed loop (--concurrency N ..., a sweep) or open loop (--rate R ..., Poisson arrivals);
per level: requests/s, p50/p90/p99/max latency, errors by status or exception, and the
client's own CPU per request. Against a splitserve server it also reads GET /v1/stats
before and after each measured window: per-stage mean times, mean batch size per model,
engine busy fraction, and whether a model runs on a SIMULATED accelerator."""

EPILOG = """\
examples:
  splitserve bench http://127.0.0.1:8000/v1/services/ocr --body-dir pages/ \\
      --concurrency 1 4 16 --duration 10 --json ocr.json --plot ocr.png
  splitserve bench http://127.0.0.1:8000/v1/services/echo --json-body bodies.json \\
      --rate 50 100 200 --max-inflight 64
  splitserve bench --selftest        # this client's own ceiling, against a trivial server

Throughput counts the answers that complete inside the measured window (after
--warmup); latency percentiles are over the 2xx answers. In the open loop latency runs
from the scheduled arrival, and arrivals beyond --max-inflight are dropped and counted."""


HELP = "load-test an HTTP server (closed or open loop) and report"


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``splitserve bench`` (the subcommand is made by splitserve.cli)."""
    p.add_argument("url", nargs="?", help="e.g. http://127.0.0.1:8000/v1/services/ocr")
    load = p.add_argument_group("load (one of; default --concurrency 1)")
    kind = load.add_mutually_exclusive_group()
    kind.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        metavar="N",
        help="closed loop: N clients, each sending its next request when answered",
    )
    kind.add_argument(
        "--rate",
        type=float,
        nargs="+",
        metavar="R",
        help="open loop: Poisson arrivals at R requests/s",
    )
    load.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        metavar="N",
        help="open loop: requests in flight at most; later arrivals are dropped (default 64)",
    )
    load.add_argument(
        "--duration", type=float, default=None, help="measured seconds per level (default 5)"
    )
    load.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds per level before the measured window, not counted (default 1)",
    )
    load.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        metavar="N",
        help="measured requests per level at most (the warm-up too) (default 100000)",
    )
    load.add_argument("--seed", type=int, default=None, help="open loop: arrival times' seed")
    body = p.add_argument_group("request bodies (one of; default: empty)")
    src = body.add_mutually_exclusive_group()
    src.add_argument(
        "--body-dir", type=Path, metavar="DIR", help="every file under DIR, round-robin"
    )
    src.add_argument(
        "--json-body",
        type=Path,
        metavar="FILE",
        help="a JSON file: one object, or a list of bodies sent round-robin (application/json)",
    )
    src.add_argument(
        "--data", metavar="@FILE|TEXT", help="as curl: @FILE sends the file, else the text"
    )
    src.add_argument("--body-bytes", type=int, metavar="N", help="N zero bytes")
    body.add_argument(
        "--content-type",
        help="the bodies' content type (default: guessed from each file's extension, "
        "application/json for --json-body, else application/octet-stream)",
    )
    body.add_argument(
        "--method",
        default="POST",
        type=str.upper,
        choices=("POST", "PUT", "GET", "DELETE"),
        help="default POST",
    )
    client = p.add_argument_group("client")
    client.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="raw: pre-built requests on an asyncio protocol, the cheapest (default); "
        "aiohttp: for https and for comparison (needs aiohttp)",
    )
    client.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    client.add_argument(
        "--no-stats", action="store_true", help="do not read the server's /v1/stats"
    )
    client.add_argument("--no-progress", action="store_true", help="no progress bar")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="OUT", help="write every number here")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="throughput and latency percentiles against the level (needs splitserve[bench])",
    )
    p.add_argument(
        "--selftest",
        action="store_true",
        help="measure this client's ceiling against a trivial local server (no URL); "
        "default sweep --concurrency 1 4 16 64, 2 s each",
    )


def load_bodies(args: argparse.Namespace) -> list[Any]:
    from splitserve.bench import bodies

    if args.body_dir is not None:
        return bodies.from_dir(args.body_dir, args.content_type)
    if args.json_body is not None:
        return bodies.from_json(args.json_body, args.content_type)
    if args.data is not None:
        return bodies.from_data(args.data, args.content_type)
    return bodies.zeros(args.body_bytes or 0, args.content_type)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the levels one after the other, print the report, write JSON and plot."""
    if args.selftest:
        if args.url or args.rate:
            print("splitserve bench: --selftest takes no URL and no --rate", file=sys.stderr)
            return 2
        from splitserve.bench.selftest import selftest

        return selftest(args)
    if not args.url:
        print("splitserve bench: a URL is needed (or --selftest)", file=sys.stderr)
        return 2
    from splitserve.bench import report, server_stats
    from splitserve.bench.loadgen import run_closed_loop, run_open_loop

    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before the load
        print(
            "splitserve bench: --plot needs matplotlib: pip install 'splitserve[bench]'",
            file=sys.stderr,
        )
        return 2
    duration = 5.0 if args.duration is None else args.duration
    warmup = 1.0 if args.warmup is None else args.warmup
    try:
        payloads = load_bodies(args)
    except ValueError as exc:
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2
    fetch = None
    if not args.no_stats:
        url = server_stats.stats_url(args.url)
        if server_stats.fetch(url) is not None:
            fetch = lambda: server_stats.fetch(url)  # noqa: E731
    levels: list[tuple[str, float]] = (
        [("open", r) for r in args.rate]
        if args.rate
        else [("closed", c) for c in (args.concurrency or [1])]
    )
    results = []
    for mode, level in levels:
        label = f"{level:g}/s" if mode == "open" else f"c={int(level)}"
        bar = report.BarProgress(label, warmup + duration, False if args.no_progress else None)
        common: dict[str, Any] = {
            "method": args.method,
            "timeout_s": args.timeout,
            "stats": fetch,
            "progress": bar,
        }
        try:
            if mode == "open":
                result = run_open_loop(
                    args.url,
                    payloads,
                    "",
                    level,
                    duration,
                    warmup,
                    args.max_requests,
                    args.max_inflight,
                    args.client,
                    seed=args.seed,
                    **common,
                )
            else:
                result = run_closed_loop(
                    args.url,
                    payloads,
                    "",
                    int(level),
                    duration,
                    warmup,
                    args.max_requests,
                    args.client,
                    **common,
                )
        except (ValueError, RuntimeError) as exc:
            bar.close()
            print(f"splitserve bench: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            bar.close()
            print("splitserve bench: interrupted; the levels done so far:", file=sys.stderr)
            break
        bar.close()
        results.append(result)
    if not results:
        return 130
    report.print_report(results, args.url)
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    settings.update(duration=duration, warmup=warmup, argv=sys.argv[1:] if argv is None else argv)
    if args.json:
        report.write_json(args.json, report.document(results, args.url, settings))
    if args.plot:
        try:
            report.plot(args.plot, results, args.url)
        except RuntimeError as exc:
            print(f"splitserve bench: {exc}", file=sys.stderr)
            return 2
    return 0 if any(r.requests for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench``: the same as ``splitserve bench``."""
    parser = argparse.ArgumentParser(
        prog="splitserve bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(parser)
    args = parser.parse_args(argv)
    return run(args, argv)
