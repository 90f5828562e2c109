"""Request bodies for the load generator: a folder's images (or the files a glob names),
a JSON file, one file or a literal.

Every body is read once, before the load starts, so the loops only index a list.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from splitserve.media import JSON, OCTET_STREAM, file_image_type
from splitserve.media import content_type as guess_content_type


@dataclass(frozen=True, slots=True)
class Payload:
    """One request body and the content type it is sent with."""

    data: bytes
    content_type: str


@dataclass(frozen=True)
class Selection:
    """The files of a ``--body-dir`` that will be sent, and those left out."""

    directory: Path
    files: list[Path]
    skipped: list[Path]
    pattern: str | None

    def describe(self) -> str:
        """One line for the user: what is sent and what was skipped, by extension."""
        by_suffix = Counter(p.suffix.lower() or "(no extension)" for p in self.skipped)
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(by_suffix.items()))
        what = f"files matching {self.pattern!r}" if self.pattern else "images"
        text = f"--body-dir {self.directory}: sending {len(self.files)} {what}"
        if not self.skipped:
            return text
        text += f"; skipped {len(self.skipped)} other files ({kinds})"
        if not self.pattern:
            example = next(iter(sorted(by_suffix)), ".json")
            text += f"; to send those, name them: --body-glob '*{example}'"
        return text


def _visible_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def select_files(directory: Path, pattern: str | None = None) -> Selection:
    """The request bodies under ``directory`` (sorted by path, hidden files never): the
    images, or with ``pattern`` (a glob relative to the folder, ``**`` for any depth) the
    files it matches. Raises ``ValueError`` saying what is there when nothing is chosen."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--body-dir {directory}: not a directory")
    candidates = _visible_files(directory)
    if pattern is not None:
        matching = set(directory.glob(pattern))
        chosen = [p for p in candidates if p in matching]
    else:
        chosen = [p for p in candidates if file_image_type(p)]
    picked = set(chosen)
    selection = Selection(directory, chosen, [p for p in candidates if p not in picked], pattern)
    if not chosen:
        if not candidates:
            raise ValueError(f"--body-dir {directory}: no files")
        raise ValueError(
            selection.describe().replace("sending 0", "nothing to send: 0", 1)
            + ("" if pattern else " (or use --json-body FILE for JSON bodies)")
        )
    return selection


def from_files(files: list[Path], content_type: str | None = None) -> list[Payload]:
    """Each file's bytes, with ``content_type`` or the type its content suggests."""
    return [Payload(p.read_bytes(), content_type or guess_content_type(p)) for p in files]


def from_dir(
    directory: Path, content_type: str | None = None, pattern: str | None = None
) -> list[Payload]:
    """The bodies ``select_files`` chooses under ``directory``."""
    return from_files(select_files(directory, pattern).files, content_type)


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
