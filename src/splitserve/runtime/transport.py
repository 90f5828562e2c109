"""Tensors in and out of messages: inline zero-copy frames or shared memory.

A tensor at or under ``INLINE_MAX_BYTES`` travels as a frame of its own in the message
(written from the array's buffer, no extra copy); a larger one is written once into
the sender's shared-memory pool. The engine reads its inputs in place (views on the
worker's segments, until it answers); a CPU worker copies its outputs out of the
engine's segments (``copy_shared``) and releases them at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from splitserve.runtime.messages import TensorRef
from splitserve.runtime.shm import ShmAttachments, ShmPool
from splitserve.tensors import array_on, wire_dtype, wire_form

# Measured by benchmarks/transport.py (docs/benchmarks.md): up to 16 KiB both ways
# cost the same; from 32 KiB shared memory wins (an inline frame crosses the kernel
# socket, copied in and out), by ~5 us at 64 KiB and ~2x from 1 MiB. Outputs through
# shared memory also cost a Release message, so the switch stays at 64 KiB.
INLINE_MAX_BYTES = 64 * 1024


class TransportError(ValueError):
    """A message whose tensor references do not describe valid tensors."""


def pack_tensors(
    tensors: Mapping[str, np.ndarray],
    frames: list[memoryview | bytes],
    pool: ShmPool | None,
) -> tuple[list[TensorRef], list[str]]:
    """Describe ``tensors`` as refs, appending payload frames; returns (refs, segments used).

    The caller releases the returned segments once the receiver has answered; if a
    tensor cannot be packed, the segments already taken are released before the error.
    """
    refs: list[TensorRef] = []
    segments: list[str] = []
    try:
        _pack_into(tensors, frames, pool, refs, segments)
    except BaseException:
        if pool is not None:
            for segment in segments:
                pool.release(segment)
        raise
    return refs, segments


def _pack_into(
    tensors: Mapping[str, np.ndarray],
    frames: list[memoryview | bytes],
    pool: ShmPool | None,
    refs: list[TensorRef],
    segments: list[str],
) -> None:
    for name, value in tensors.items():
        arr, dtype_name = wire_form(value)
        if dtype_name is None:
            raise TransportError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        slot = (
            pool.allocate(arr.nbytes)
            if pool is not None and arr.nbytes > INLINE_MAX_BYTES
            else None
        )
        if slot is None:
            refs.append(
                TensorRef(name, dtype_name, arr.shape, frame=len(frames), nbytes=arr.nbytes)
            )
            frames.append(arr.data.cast("B") if arr.nbytes else b"")
        else:
            segment, view = slot
            segments.append(segment)
            np.frombuffer(view, dtype=arr.dtype).reshape(arr.shape)[...] = arr
            refs.append(TensorRef(name, dtype_name, arr.shape, segment=segment, nbytes=arr.nbytes))


def unpack_tensors(
    refs: list[TensorRef],
    frames: list,
    attachments: ShmAttachments,
    *,
    copy_shared: bool = False,
) -> dict[str, np.ndarray]:
    """Arrays for ``refs``: views on frames or shared memory (copies if ``copy_shared``).

    Views on shared memory stay valid only until the segment is released to its owner.
    """
    out: dict[str, np.ndarray] = {}
    for ref in refs:
        dtype = wire_dtype(ref.dtype)
        if dtype is None:
            raise TransportError(f"tensor {ref.name!r}: dtype {ref.dtype!r} not allowed")
        if min(ref.shape, default=0) < 0:
            raise TransportError(f"tensor {ref.name!r}: negative dimension in {ref.shape}")
        nbytes = math.prod(ref.shape) * dtype.itemsize
        if nbytes != ref.nbytes:
            raise TransportError(
                f"tensor {ref.name!r}: shape {ref.shape} needs {nbytes} bytes, "
                f"{ref.nbytes} announced"
            )
        if ref.segment:
            buf = attachments.view(ref.segment, nbytes)
        elif 0 <= ref.frame < len(frames):
            frame = frames[ref.frame]
            buf = memoryview(frame)
            if len(buf) != nbytes:
                raise TransportError(
                    f"tensor {ref.name!r}: frame holds {len(buf)} bytes, {nbytes} announced"
                )
        else:
            raise TransportError(f"tensor {ref.name!r}: no frame {ref.frame}")
        arr = array_on(buf, dtype, ref.shape)
        out[ref.name] = arr.copy() if copy_shared and ref.segment else arr
    return out
