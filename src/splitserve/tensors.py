"""A self-describing bundle of named tensors in one byte string.

What the HTTP protocols hand a CPU worker (and threaded mode's request thread) when a
client calls an engine model directly with tensors instead of a service's request body:
one small msgpack header (name, dtype, shape, byte length of each tensor) followed by the
tensors' raw bytes, back to back. Decoding never runs code: dtypes are checked against
the numeric set the transport accepts, and every length against the shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import msgspec
import numpy as np

# The media type of a bundle body (request and reply).
BUNDLE_CONTENT_TYPE = "application/x-splitserve-tensors"

# dtypes a tensor may have on the wire: numeric only, so a header can never make the
# receiver build object arrays.
ALLOWED_DTYPES = frozenset(
    {
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    }
)

_HEADER_LEN = struct.Struct("<I")


class BundleError(ValueError):
    """Bytes that do not describe a valid bundle of numeric tensors."""


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[_Entry]).decode


def pack_tensors_bundle(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``u32 header length | msgpack [(name, dtype, shape, nbytes)...] | raw bytes``."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    for name, arr in arrays.items():
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise BundleError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
    header = _encode([_Entry(n, a.dtype.name, a.shape, a.nbytes) for n, a in arrays.items()])
    return b"".join(
        [_HEADER_LEN.pack(len(header)), header, *(a.tobytes() for a in arrays.values())]
    )


def unpack_tensors_bundle(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """The tensors of a bundle, as read-only views on ``data``."""
    view = memoryview(data)
    if len(view) < _HEADER_LEN.size:
        raise BundleError("tensor bundle is shorter than its header length")
    (header_len,) = _HEADER_LEN.unpack(view[: _HEADER_LEN.size])
    start = _HEADER_LEN.size + header_len
    if start > len(view):
        raise BundleError("tensor bundle header runs past the end of the body")
    try:
        entries = _decode(view[_HEADER_LEN.size : start])
    except msgspec.DecodeError as exc:
        raise BundleError(f"tensor bundle header is invalid: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        if entry.dtype not in ALLOWED_DTYPES:
            raise BundleError(f"tensor {entry.name!r}: dtype {entry.dtype!r} not allowed")
        if any(d < 0 for d in entry.shape):
            raise BundleError(f"tensor {entry.name!r}: negative dimension in {entry.shape}")
        dtype = np.dtype(entry.dtype)
        nbytes = math.prod(entry.shape) * dtype.itemsize
        if nbytes != entry.nbytes or start + nbytes > len(view):
            raise BundleError(
                f"tensor {entry.name!r}: shape {entry.shape} needs {nbytes} bytes, "
                f"{min(entry.nbytes, len(view) - start)} present"
            )
        out[entry.name] = np.frombuffer(view[start : start + nbytes], dtype=dtype).reshape(
            entry.shape
        )
        start += nbytes
    if start != len(view):
        raise BundleError(f"tensor bundle has {len(view) - start} bytes after its tensors")
    return out
