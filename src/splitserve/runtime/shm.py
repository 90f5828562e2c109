"""Shared-memory segments for tensor payloads: a writer-owned pool and a reader cache.

Each process writes tensors only into segments it created (its ``ShmPool``); readers
attach by name (``ShmAttachments``) and tell the owner when a slot may be reused. The
owner alone unlinks, so ownership is never ambiguous; the supervisor removes what a
crashed child left (segment names carry the supervisor's and the owner's pid).

Segments are plain files in /dev/shm mapped with ``mmap`` (Linux): no resource
tracker process, no pickling, and a reused slot is already paged in.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# Slots are rounded up to a power of two, at least this size, so that freed slots fit
# later tensors of similar size and the free lists stay short.
MIN_SLOT_BYTES = 64 * 1024


def segment_prefix(supervisor_pid: int) -> str:
    return f"splitserve-{supervisor_pid}-"


def remove_segments(supervisor_pid: int, owner_pid: int | None = None) -> int:
    """Unlink the segments of a server (or of one of its processes); returns the count."""
    pattern = segment_prefix(supervisor_pid) + (f"{owner_pid}-*" if owner_pid else "*")
    removed = 0
    for path in SHM_DIR.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _slot_size(nbytes: int) -> int:
    return max(MIN_SLOT_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())


class _Segment:
    __slots__ = ("map", "name", "size")

    def __init__(self, name: str, size: int, create: bool) -> None:
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name = name
        self.size = size


class ShmPool:
    """Reusable slots owned by this process, bounded in total bytes.

    ``max_bytes`` comes from the settings (``ServerConfig.shm_pool_bytes``).
    ``allocate`` returns ``None`` when the bound would be passed; the caller then sends
    the tensor inline instead, so a full pool slows a request down but never fails it.
    Thread-safe: an engine's model threads and its I/O thread share one pool.
    """

    def __init__(self, supervisor_pid: int, max_bytes: int) -> None:
        self._prefix = f"{segment_prefix(supervisor_pid)}{os.getpid()}-"
        self._max_bytes = max_bytes
        self._total = 0
        self._counter = 0
        self._free: dict[int, list[_Segment]] = {}
        self._by_name: dict[str, _Segment] = {}
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return self._total

    def allocate(self, nbytes: int) -> tuple[str, memoryview] | None:
        """A free slot of at least ``nbytes``: (segment name, writable view of nbytes)."""
        size = _slot_size(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                seg = free.pop()
            else:
                if self._total + size > self._max_bytes:
                    return None
                self._counter += 1
                seg = _Segment(f"{self._prefix}{self._counter}", size, create=True)
                self._by_name[seg.name] = seg
                self._total += size
        return seg.name, memoryview(seg.map)[:nbytes]

    def release(self, name: str) -> None:
        """Give a slot back once its reader is done with it (unknown names are ignored)."""
        with self._lock:
            seg = self._by_name.get(name)
            if seg is not None:
                self._free.setdefault(seg.size, []).append(seg)

    def close(self) -> None:
        """Unlink every segment of the pool (at process exit).

        Takes no lock: it runs from a SIGTERM handler, which may have interrupted this
        very thread inside ``allocate`` while it held the lock.
        """
        for seg in list(self._by_name.values()):
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / seg.name).unlink()
            with contextlib.suppress(BufferError, ValueError):
                seg.map.close()
        self._by_name.clear()
        self._free.clear()
        self._total = 0


class ShmAttachments:
    """Other processes' segments, mapped on first use and kept (LRU-bounded) for reuse."""

    def __init__(self, max_segments: int = 512) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._max = max_segments
        self._lock = threading.Lock()

    def view(self, name: str, nbytes: int) -> memoryview:
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                if "/" in name or not name.startswith("splitserve-"):
                    raise ValueError(f"not a splitserve segment name: {name!r}")
                m = _Segment(name, 0, create=False).map
                self._maps[name] = m
                while len(self._maps) > self._max:
                    _, old = self._maps.popitem(last=False)
                    # A view still in use keeps its map alive; it is freed with the view.
                    with contextlib.suppress(BufferError):
                        old.close()
            else:
                self._maps.move_to_end(name)
        if nbytes > len(m):
            raise ValueError(f"segment {name} holds {len(m)} bytes, {nbytes} requested")
        return memoryview(m)[:nbytes]

    def forget(self, prefix: str) -> None:
        """Drop the maps of a process that died (its segment names start with prefix)."""
        with self._lock:
            for name in [n for n in self._maps if n.startswith(prefix)]:
                m = self._maps.pop(name)
                with contextlib.suppress(BufferError):
                    m.close()
