"""Request bodies for the load generator: a directory, a JSON file, one file or literal.

Every body is read once, before the load starts, so the loops only index a list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splitserve.replies import JSON, OCTET_STREAM, guess_content_type


@dataclass(frozen=True, slots=True)
class Payload:
    """One request body and the content type it is sent with."""

    data: bytes
    content_type: str


def from_dir(directory: Path, content_type: str | None = None) -> list[Payload]:
    """Every regular, non-hidden file under ``directory`` (sorted by path), each with
    ``content_type`` or the type its extension suggests."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--body-dir {directory}: not a directory")
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise ValueError(f"--body-dir {directory}: no files")
    return [Payload(p.read_bytes(), content_type or guess_content_type(p)) for p in files]


def from_json(path: Path, content_type: str | None = None) -> list[Payload]:
    """A JSON file: one body, or, when the document is a list, one body per element.

    Each body is re-encoded compactly, so the file may be pretty-printed. (To send a
    JSON array as a single body, use ``--data @file``.)
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--json-body {path}: {exc}") from exc
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise ValueError(f"--json-body {path}: an empty list")
    ctype = content_type or JSON
    return [Payload(json.dumps(item, separators=(",", ":")).encode(), ctype) for item in items]


def from_data(spec: str, content_type: str | None = None) -> list[Payload]:
    """curl's ``--data``: ``@FILE`` sends the file's bytes, anything else the text itself."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"--data {spec}: {exc}") from exc
        return [Payload(data, content_type or guess_content_type(path))]
    return [Payload(spec.encode(), content_type or OCTET_STREAM)]


def zeros(size: int, content_type: str | None = None) -> list[Payload]:
    """``size`` zero bytes: a body for servers that do not look at it."""
    if size < 0:
        raise ValueError("--body-bytes must be >= 0")
    return [Payload(bytes(size), content_type or OCTET_STREAM)]
