"""Framed multipart messages over Unix domain sockets, on asyncio.

The data plane (front <-> CPU workers <-> engines) uses these instead of ZeroMQ: on
the 2-core machine of docs/benchmarks.md a ZeroMQ ipc round trip cost ~170 us against
~25 us for a Unix socket under uvloop, because every ZeroMQ message crosses the
library's I/O thread on both sides. A message is::

    u32 frame count | u32 length of each frame | the frames' bytes

Frame 0 is the msgspec header; the others are payloads (bodies, inline tensors). The
connection itself is the route: a reply goes back on the connection its request came in.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

# A message larger than this is a protocol error, not a tensor: big tensors travel
# through shared memory and only their description crosses the socket.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_FRAMES = 1024
# Stream buffer size: asyncio pauses reading past twice this, so it must hold an
# inline tensor that the pool could not place (messages up to a few MiB) in one go.
READ_LIMIT = 8 << 20

_U32 = struct.Struct("<I")


class ChannelClosed(ConnectionError):
    """The peer went away (it exited or crashed)."""


Frame = bytes | bytearray | memoryview


class Channel:
    """One connection; ``send`` never blocks, ``recv`` waits for the next message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.closed = False

    def send(self, frames: Sequence[Frame]) -> None:
        """Queue a message; ``ChannelClosed`` means it was not delivered at all."""
        if self.closed or self._writer.is_closing():
            self.closed = True  # so that senders choosing a peer skip this one
            raise ChannelClosed("channel is closed")
        lengths = [
            len(memoryview(f).cast("B")) if isinstance(f, memoryview) else len(f) for f in frames
        ]
        head = struct.pack(f"<{len(frames) + 1}I", len(frames), *lengths)
        self._writer.writelines([head, *frames])
        if self._writer.is_closing():
            # The write failed at once (EPIPE): the peer process is gone and nothing of
            # this message reached it, so the sender may safely send it elsewhere.
            self.closed = True
            raise ChannelClosed("the peer is gone; the message was not delivered")

    async def recv(self) -> list[bytes]:
        try:
            (count,) = _U32.unpack(await self._reader.readexactly(4))
            if not 0 < count <= MAX_FRAMES:
                raise ChannelClosed(f"bad frame count {count}")
            lengths = struct.unpack(f"<{count}I", await self._reader.readexactly(4 * count))
            if sum(lengths) > MAX_MESSAGE_BYTES:
                raise ChannelClosed(f"message of {sum(lengths)} bytes is above the limit")
            data = await self._reader.readexactly(sum(lengths))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.closed = True
            raise ChannelClosed(str(exc)) from None
        frames, start = [], 0
        view = memoryview(data)
        for n in lengths:
            frames.append(view[start : start + n])
            start += n
        return frames

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self._writer.close()


async def listen(path: str, on_channel: Callable[[Channel], Awaitable[None]]) -> asyncio.Server:
    """Listen on a Unix socket; ``on_channel`` runs for each connection until it closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(reader, writer)
        try:
            await on_channel(channel)
        except ChannelClosed:
            pass
        finally:
            channel.close()

    return await asyncio.start_unix_server(handle, path, limit=READ_LIMIT)


async def connect(path: str, timeout: float = 60.0) -> Channel:
    """Connect, retrying while the peer is still starting (up to ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=READ_LIMIT)
            return Channel(reader, writer)
        except OSError:  # not there yet, refusing, or reset while it restarts
            if time.monotonic() >= deadline:
                raise ChannelClosed(f"nothing listens on {path}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
