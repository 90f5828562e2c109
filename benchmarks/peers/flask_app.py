"""The OCR service as a Flask app, for gunicorn (gthread or sync workers).

    gunicorn -w 2 -k sync -b 127.0.0.1:8000 \\
        'benchmarks.peers.flask_app:create_app(engine_threads=None)'

The app is built in each worker (no ``--preload``): ONNX Runtime's thread pools do not
survive a fork, so every worker process loads its own copy of the three models.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request

from benchmarks.peers.common import HEALTH, ROUTE, load_ocr, reply_headers


def create_app(engine_threads: int | None = None, info_dir: str | None = None) -> Flask:
    """A Flask app answering ``POST ROUTE`` (raw image bytes) with the service's JSON."""
    service = load_ocr("flask", engine_threads, info_dir)
    app = Flask(__name__)

    @app.post(ROUTE)
    def ocr() -> Response:
        content_type = request.content_type or "application/octet-stream"
        reply = service.call(request.get_data(cache=False), content_type)
        return Response(
            reply.body,
            status=reply.status,
            content_type=reply.content_type,
            headers=reply_headers(reply),
        )

    @app.get(HEALTH)
    def health() -> dict[str, int]:
        return {"pid": os.getpid()}

    return app
