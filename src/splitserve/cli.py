"""The ``splitserve`` command: ``serve`` runs services, ``build`` makes gated engines,
``bench`` load-tests a server."""

from __future__ import annotations

import argparse
import os
import sys

from splitserve.bench import cli as bench_cli
from splitserve.compile import cli as build_cli
from splitserve.config import ServerConfig


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve one or more services over HTTP")
    p.add_argument("services", nargs="+", help="service classes as module:Class (or file.py:Class)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--grpc-port", type=int, default=0, help="protocol v2 over gRPC on this port (0: off)"
    )
    p.add_argument(
        "--mode",
        choices=["split", "threaded"],
        default="split",
        help="split: front + CPU worker processes + engine processes (default); "
        "threaded: one process, a thread pool, the classic design",
    )
    p.add_argument("--cpu-workers", type=int, default=2, help="CPU worker processes (split)")
    p.add_argument(
        "--engine-replicas",
        type=int,
        default=None,
        help="engine processes, each with a replica of every model "
        "(default: the models' own `replicas`)",
    )
    p.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="intra-op threads per engine (default: cores / engine processes)",
    )
    p.add_argument(
        "--worker-concurrency",
        type=int,
        default=4,
        help="requests a CPU worker holds at once (split)",
    )
    p.add_argument("--threads", type=int, default=8, help="request threads (threaded)")
    p.add_argument(
        "--queue-size", type=int, default=256, help="requests waiting for a free worker before 503"
    )
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds (504 after)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds admitted requests may take to finish after SIGTERM",
    )
    p.add_argument(
        "--auth-token",
        default=os.environ.get("SPLITSERVE_AUTH_TOKEN", ""),
        help="require 'Authorization: Bearer TOKEN' on every route but liveness "
        "(default: $SPLITSERVE_AUTH_TOKEN; none: no authentication)",
    )
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--log-level", default="INFO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    bench_cli.add_parser(sub)
    build_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "build":
        return build_cli.run(args)
    if args.command == "bench":
        return bench_cli.run(args, sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        cfg = ServerConfig(
            services=args.services,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            mode=args.mode,
            cpu_workers=args.cpu_workers,
            engine_replicas=args.engine_replicas,
            engine_threads=args.engine_threads,
            worker_concurrency=args.worker_concurrency,
            threads=args.threads,
            queue_size=args.queue_size,
            request_timeout_s=args.request_timeout,
            drain_timeout_s=args.drain_timeout,
            auth_token=args.auth_token,
            max_body_bytes=args.max_body_bytes,
            max_image_pixels=args.max_image_pixels,
            log_level=args.log_level.upper(),
        )
        if cfg.mode == "threaded":
            from splitserve.runtime.threaded import serve_threaded

            return serve_threaded(cfg)
        from splitserve.runtime.supervisor import serve_split

        return serve_split(cfg)
    return 2


if __name__ == "__main__":
    sys.exit(main())
