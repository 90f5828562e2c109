"""What a file holds, from its first bytes: the image formats a vision service takes.

Request bodies are recognised by content, not name: a folder of pages may also hold
each page's ground truth (a ``.json`` beside it), which is not a request. Used by the
load generator (``--body-dir``), by builds (calibration folders of requests), and by
requests whose label says nothing (curl's and urllib's default, a form, on any body).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

OCTET_STREAM = "application/octet-stream"
JSON = "application/json"

# The first bytes of each image format, and its content type.
IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
HEAD_BYTES = 16


def image_type(head: bytes) -> str | None:
    """The image content type that a file's first bytes announce (None: not an image)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((ctype for magic, ctype in IMAGE_SIGNATURES if head.startswith(magic)), None)


def file_image_type(path: Path) -> str | None:
    """``image_type`` of the file at ``path``."""
    with Path(path).open("rb") as f:
        return image_type(f.read(HEAD_BYTES))


def content_type(path: Path) -> str:
    """The content type of a file: an image's from its first bytes, anything else's from
    its extension (octet-stream when unknown)."""
    sniffed = file_image_type(path)
    if sniffed:
        return sniffed
    if Path(path).suffix.lower() == ".json":
        return JSON
    return mimetypes.guess_type(Path(path).name)[0] or OCTET_STREAM
