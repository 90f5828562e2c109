"""Tensors through frames and shared memory, and framed messages over real sockets."""

from __future__ import annotations

import asyncio
import os
import tempfile

import numpy as np
import pytest

from splitserve.runtime import channel as chan
from splitserve.runtime.messages import TensorRef
from splitserve.runtime.shm import SHM_DIR, ShmAttachments, ShmPool, remove_segments
from splitserve.runtime.transport import (
    INLINE_MAX_BYTES,
    TransportError,
    pack_tensors,
    unpack_tensors,
)

OWNER = 900_000_000 + os.getpid()  # a fake supervisor pid: segment names stay unique


@pytest.fixture
def pool():
    p = ShmPool(OWNER, max_bytes=8 << 20)
    yield p
    p.close()
    remove_segments(OWNER)


def test_small_tensors_go_inline_and_large_ones_through_shared_memory(pool) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "small": rng.integers(0, 255, INLINE_MAX_BYTES, dtype=np.uint8),
        "large": rng.standard_normal((3, 1000, 100)).astype(np.float32),
        "strided": np.arange(20, dtype=np.int64)[::2],  # not contiguous
    }
    frames: list = []
    refs, segments = pack_tensors(tensors, frames, pool)
    by_name = {r.name: r for r in refs}
    assert by_name["small"].frame == 0 and not by_name["small"].segment
    assert by_name["large"].segment and segments == [by_name["large"].segment]
    out = unpack_tensors(refs, frames, ShmAttachments())
    for name, value in tensors.items():
        assert np.array_equal(out[name], value) and out[name].dtype == value.dtype


def test_released_slots_are_reused_and_the_pool_is_bounded(pool) -> None:
    big = np.zeros(3 << 20, dtype=np.uint8)  # rounds up to a 4 MiB slot
    _, seg1 = pack_tensors({"a": big}, [], pool)
    _, seg2 = pack_tensors({"b": big}, [], pool)
    assert seg1 != seg2 and pool.total_bytes == 8 << 20
    frames: list = []
    refs3, seg3 = pack_tensors({"c": big}, frames, pool)  # full: falls back to a frame
    assert seg3 == [] and refs3[0].frame == 0
    pool.release(seg1[0])
    _, seg4 = pack_tensors({"d": big}, [], pool)
    assert seg4 == seg1


def test_pool_close_unlinks_its_segments(pool) -> None:
    _, segments = pack_tensors({"a": np.zeros(1 << 20, dtype=np.uint8)}, [], pool)
    assert (SHM_DIR / segments[0]).exists()
    pool.close()
    assert not (SHM_DIR / segments[0]).exists()


@pytest.mark.parametrize(
    ("ref", "frames", "message"),
    [
        (TensorRef("x", "object", (1,), frame=0, nbytes=8), [b"\0" * 8], "not allowed"),
        (TensorRef("x", "float32", (4,), frame=0, nbytes=12), [b"\0" * 12], "needs 16 bytes"),
        (TensorRef("x", "float32", (2,), frame=0, nbytes=8), [b"\0" * 4], "frame holds 4"),
        (TensorRef("x", "float32", (2,), frame=3, nbytes=8), [b"\0" * 8], "no frame 3"),
        (TensorRef("x", "float32", (-2,), frame=0, nbytes=8), [b"\0" * 8], "negative"),
    ],
)
def test_bad_references_are_rejected(ref, frames, message) -> None:
    with pytest.raises(TransportError, match=message):
        unpack_tensors([ref], frames, ShmAttachments())


def test_attachments_refuse_foreign_paths() -> None:
    with pytest.raises(ValueError, match="not a splitserve segment"):
        ShmAttachments().view("../etc/passwd", 4)


def test_channel_carries_multipart_messages_both_ways() -> None:
    async def scenario() -> None:
        path = os.path.join(tempfile.mkdtemp(), "t.sock")
        received: list[list[bytes]] = []

        async def echo(channel: chan.Channel) -> None:
            while True:
                frames = await channel.recv()
                received.append([bytes(f) for f in frames])
                channel.send(frames)

        server = await chan.listen(path, echo)
        client = await chan.connect(path, timeout=5)
        payload = np.arange(100_000, dtype=np.float32)
        client.send([b"header", memoryview(payload), b""])
        back = await asyncio.wait_for(client.recv(), 5)
        assert bytes(back[0]) == b"header" and bytes(back[2]) == b""
        assert np.array_equal(np.frombuffer(back[1], dtype=np.float32), payload)
        client.close()
        server.close()
        await server.wait_closed()

        # a peer that went away is a ChannelClosed, not a hang
        async def hang_up(channel: chan.Channel) -> None:
            await channel.recv()  # then return: serve() closes the connection

        other = await chan.listen(path + "2", hang_up)
        c2 = await chan.connect(path + "2", timeout=5)
        c2.send([b"bye"])
        with pytest.raises(chan.ChannelClosed):
            await asyncio.wait_for(c2.recv(), 5)
        other.close()

    asyncio.run(scenario())


def test_connect_gives_up_after_its_timeout() -> None:
    with pytest.raises(chan.ChannelClosed, match="nothing listens"):
        asyncio.run(chan.connect("/nonexistent/dir/x.sock", timeout=0.2))


def test_a_tensor_that_cannot_be_packed_gives_back_the_slots_already_taken(pool) -> None:
    big = np.ones(INLINE_MAX_BYTES, dtype=np.float32)  # goes to shared memory
    with pytest.raises(TransportError):
        pack_tensors({"a": big, "b": np.array(["text"])}, [], pool)
    taken = pool.total_bytes
    assert taken >= big.nbytes  # "a" was written to a slot before "b" failed...
    assert pool.allocate(big.nbytes) is not None
    assert pool.total_bytes == taken  # ...and that slot was free again, not leaked


def test_tensor_bundles_round_trip_and_refuse_what_they_do_not_describe() -> None:
    from splitserve.tensors import BundleError, pack_tensors_bundle, unpack_tensors_bundle

    tensors = {
        "image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "scale": np.array(0.5, dtype=np.float32),
        "mask": np.array([True, False]),
    }
    data = pack_tensors_bundle(tensors)
    back = unpack_tensors_bundle(data)
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    for broken in (b"", data[:3], data[:-1], data + b"x", b"\xff\xff\xff\x00" + data[4:]):
        with pytest.raises(BundleError):
            unpack_tensors_bundle(broken)
    with pytest.raises(BundleError):
        pack_tensors_bundle({"o": np.array([object()])})
    # another byte order travels as native bytes: the values, not the raw bytes, arrive
    swapped = np.arange(3, dtype=">i4")
    back = unpack_tensors_bundle(pack_tensors_bundle({"s": swapped}))["s"]
    assert back.dtype == np.dtype("int32") and back.tolist() == [0, 1, 2]
