"""The engine cache: built artifacts keyed by everything that decides their content.

Key: the source model's hash, the precision, the fp32 keep request, the backend, the
device, the library versions, the calibration and held-out data's hashes, and the
gate's settings. A server asking for the same engine reuses it; a change to any of
these builds a new one. Entries are written to a temporary folder and renamed into
place, so a half-written build is never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from splitserve.engines.device import cache_root

REPORT = "report.json"
VERSIONED = (
    "splitserve",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxconverter-common",
    "tensorrt",
    "torch",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def entry_dir(stem: str, precision: str, key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "engines" / f"{stem}-{precision}-{key}"


def read_report(directory: Path) -> dict[str, Any] | None:
    """The report of a complete entry, or None when there is none."""
    try:
        return json.loads((directory / REPORT).read_text())
    except (OSError, ValueError):
        return None


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(_finite(dict(report)), indent=2) + "\n")


@contextlib.contextmanager
def entry_lock(directory: Path) -> Iterator[None]:
    """Hold ``<entry>.lock``: one process builds an entry, the others wait and reuse it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(staging: Path, directory: Path) -> None:
    """Move a finished build into place; an older entry (--force) is renamed aside
    first and removed after, so the entry's path always holds a complete build."""
    old = directory.with_name(directory.name + f".old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
