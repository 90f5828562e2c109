"""The ``splitserve`` command: ``serve`` runs services, ``build`` makes gated engines,
``bench`` load-tests a server, ``tune`` searches the fastest layout for a service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitserve import config, tune
from splitserve.bench import cli as bench_cli
from splitserve.compile import cli as build_cli
from splitserve.config import ServerConfig
from splitserve.layout import Services, plan, with_default_layout
from splitserve.protocol import tracing
from splitserve.runtime.process import check_port_free, configure_logging


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve one or more services over HTTP",
        description="Serve services over HTTP. Every setting may also come from a TOML file "
        "(--config; README: 'Serving'); flags given override it.",
    )
    p.add_argument("--config", type=Path, help="a TOML file of settings (splitserve.toml)")
    config.add_arguments(p)


def serve(cfg: ServerConfig) -> int:
    """Load the services, build the engines they ask for, then run the chosen mode.

    Builds happen here, before any process starts, so the runtime only ever receives
    resolved model specs and never imports the build tools.
    """
    configure_logging(cfg.log_level)
    if cfg.trace != "off" and tracing.missing_modules():
        raise SystemExit(f"splitserve: --trace needs the trace extra: {tracing.INSTALL_HINT}")
    check_port_free(cfg.host, cfg.port)  # before builds that may take minutes
    if cfg.grpc_port:
        check_port_free(cfg.host, cfg.grpc_port)
    try:
        services = Services.load(cfg.services, cfg.models)
    except (ImportError, ValueError, TypeError) as exc:  # a bad name or declaration
        raise SystemExit(f"splitserve: cannot load the services: {exc}") from None
    built: dict[str, str] = {}
    if any(d.model.needs_build for d in services.models.values()):
        from splitserve.compile.artifacts import build_engines  # onnx & co. only when needed

        built = build_engines(services.models)
    if cfg.mode == "threaded":
        from splitserve.runtime.threaded import serve_threaded

        return serve_threaded(cfg, services, built)
    from splitserve.runtime.supervisor import serve_split

    cfg = with_default_layout(cfg, services)
    return serve_split(cfg, plan(cfg, services, built))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    for name, module in (("bench", bench_cli), ("build", build_cli), ("tune", tune)):
        module.configure(
            sub.add_parser(
                name,
                help=module.HELP,
                description=module.DESCRIPTION,
                epilog=module.EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    args = parser.parse_args(argv)
    if args.command == "build":
        return build_cli.run(args)
    if args.command == "tune":
        return tune.run(args)
    if args.command == "bench":
        return bench_cli.run(args, sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        try:
            cfg = config.from_arguments(args, args.config)
        except ValueError as exc:
            parser.error(str(exc))
        return serve(cfg)
    return 2


if __name__ == "__main__":
    sys.exit(main())
