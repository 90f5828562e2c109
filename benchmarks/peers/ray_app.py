"""The OCR service on Ray Serve: a private single-node Ray cluster, N replicas.

    python -m benchmarks.peers.ray_app --port 8000 --replicas 2

Everything listens on 127.0.0.1: the HTTP proxy by ``http_options``, Ray's own servers
(GCS, raylet, object manager, workers) because the node address is 127.0.0.1. Ray 2.x
on Linux turns ``_node_ip_address="127.0.0.1"`` into the machine's outbound address
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode, the default
on macOS and Windows), which this module sets before it imports Ray.

Each replica computes one request at a time, like a gunicorn sync worker, while Ray's
router keeps up to ``max_ongoing_requests`` (5) waiting at each. The computing happens
on one thread of the replica's own, not on its event loop: ``InProcessService.call``
runs the service's ``handle`` on an event loop of its own, which cannot start in a
thread whose loop is already running (Ray runs ``async def __call__`` on one). Access logs are off
and Serve logs at WARNING, as for every other peer (none of them logs each request).
On SIGINT or SIGTERM it shuts Serve and the Ray processes it started down.

One patch: Ray Serve 2.60's replicas open an inter-deployment gRPC server on ``[::]:0``
(every interface), hard-coded in ``ray/serve/_private/replica.py`` with no setting.
``splitserve.ray.bind_loopback_only`` rebinds it to 127.0.0.1 in each replica before it
starts (it is used for deployment-to-deployment calls, none here; HTTP traffic comes
from the proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.peers.common import (
    DEFAULT_CONTENT_TYPE,
    HEALTH,
    ROUTE,
    load_ocr,
    parse_threads,
    reply_headers,
)
from splitserve.ray import bind_loopback_only

LOGGING = {"log_level": "WARNING", "enable_access_log": False}
OBJECT_STORE_BYTES = 200 << 20  # the replies are small; the default is 30 % of the RAM


class OCRDeployment:
    """One Serve replica: the service, loaded once, behind Ray's HTTP proxy."""

    def __init__(self, engine_threads: int | None, info_dir: str | None) -> None:
        bind_loopback_only()  # the replica starts that server after this constructor returns
        self.service = load_ocr("ray", engine_threads, info_dir)
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="ocr")

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        if request.method == "GET" and request.url.path == HEALTH:
            return JSONResponse({"pid": os.getpid()})
        if request.method != "POST" or request.url.path != ROUTE:
            return JSONResponse({"error": {"type": "not_found"}}, status_code=404)
        body = await request.body()
        content_type = request.headers.get("content-type", DEFAULT_CONTENT_TYPE)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self.compute, self.service.call, body, content_type)
        return Response(
            reply.body,
            status_code=reply.status,
            media_type=reply.content_type,
            headers=reply_headers(reply),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--engine-threads", default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--info-dir", default=None)
    parser.add_argument("--temp-dir", default=None, help="Ray's session folder (absolute)")
    args = parser.parse_args(argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    stop = threading.Event()
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=args.num_cpus,
            object_store_memory=OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            _temp_dir=args.temp_dir,
            log_to_driver=False,
        )
        # After ray.init, which installs handlers of its own; a signal before this point
        # ends start-up with KeyboardInterrupt, and the clean-up below still runs.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": args.port},
            logging_config=LOGGING,
        )
        deployment = serve.deployment(
            OCRDeployment,
            num_replicas=args.replicas,
            ray_actor_options={"num_cpus": args.num_cpus / args.replicas},
        )
        app = deployment.bind(parse_threads(args.engine_threads), args.info_dir)
        serve.run(app, route_prefix="/", logging_config=LOGGING)  # returns once replicas run
        print(f"ray serve ready on http://127.0.0.1:{args.port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()  # stops the GCS, raylet and workers this driver started
    return 0


if __name__ == "__main__":
    # Run under the module's importable name, so Ray pickles the class by reference.
    from benchmarks.peers import ray_app

    sys.exit(ray_app.main())
