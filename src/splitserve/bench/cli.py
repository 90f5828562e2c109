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
per level: successful requests/s, p50/p90/p99/max latency, errors by status or exception
(with their own latency), and the client's own CPU per request. Against a splitserve
server it also reads GET /v1/stats before and after each measured window: per-stage mean
times, mean batch size per model, engine and model busy fractions, and whether a model
runs on a SIMULATED accelerator."""

EPILOG = """\
examples:
  splitserve bench http://127.0.0.1:8000/v1/services/ocr --body-dir pages/ \\
      --concurrency 1 4 16 --duration 10 --json ocr.json --plot ocr.png
  splitserve bench http://127.0.0.1:8000/v1/services/echo --json-body bodies.json \\
      --rate 50 100 200 --max-inflight 64
  splitserve bench --selftest        # this client's own ceiling, against a trivial server

Throughput (req/s) counts the successful (2xx) answers that complete inside the
measured window (after --warmup), and latency percentiles are theirs; failed requests
are counted beside them (errors, err %, their own p50/p99), and the report warns loudly
when more than 2% failed. In the open loop latency runs from the scheduled arrival, and
arrivals beyond --max-inflight are dropped and counted. The exit status is 1 when no
level got a single successful answer."""


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
        "--body-dir",
        type=Path,
        metavar="DIR",
        help="the images under DIR (recognised by their first bytes), round-robin; "
        "other files (an image's ground-truth .json...) are skipped and counted",
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
        "--body-glob",
        metavar="PATTERN",
        help="with --body-dir: send the files matching PATTERN (e.g. '*.json', "
        "'**/*.bin') instead of the images",
    )
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

    if args.body_glob is not None and args.body_dir is None:
        raise ValueError("--body-glob selects files of --body-dir: name the folder too")
    if args.body_dir is not None:
        chosen = bodies.select_files(args.body_dir, args.body_glob)
        if chosen.skipped:
            print(f"splitserve bench: {chosen.describe()}", file=sys.stderr)
        return bodies.from_files(chosen.files, args.content_type)
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
    from splitserve.bench.loadgen import ClosedLoop, OpenLoop, run_load

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
    try:
        levels: list[OpenLoop] | list[ClosedLoop] = (
            [OpenLoop(rate, args.max_inflight, args.seed) for rate in args.rate]
            if args.rate
            else [ClosedLoop(c) for c in (args.concurrency or [1])]
        )
    except ValueError as exc:
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2
    results = []
    for arrivals in levels:
        bar = report.BarProgress(
            arrivals.label, warmup + duration, False if args.no_progress else None
        )
        try:
            result = run_load(
                args.url,
                payloads,
                "",
                arrivals,
                duration,
                warmup,
                args.max_requests,
                args.client,
                method=args.method,
                timeout_s=args.timeout,
                stats=fetch,
                progress=bar,
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
    return 0 if any(r.ok for r in results) else 1  # 1: not one successful answer


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
