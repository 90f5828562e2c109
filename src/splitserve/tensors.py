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

# The dtypes by wire name and back: numpy's ``dtype.name`` is a Python property costing
# microseconds, a lookup here costs tens of nanoseconds (per tensor, per hop).
_WIRE_DTYPES = {name: np.dtype(name) for name in sorted(ALLOWED_DTYPES)}
_WIRE_NAMES = {dtype: name for name, dtype in _WIRE_DTYPES.items()}


def wire_form(value: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``value`` as it travels (C-contiguous, native byte order) and its dtype's wire
    name; None when the dtype may not travel."""
    arr = np.ascontiguousarray(value)
    name = _WIRE_NAMES.get(arr.dtype)
    if name is None and not arr.dtype.isnative:  # e.g. ">f4": the bytes go native
        native = arr.dtype.newbyteorder("=")
        if native in _WIRE_NAMES:
            arr, name = arr.astype(native), _WIRE_NAMES[native]
    return arr, name


def array_on(
    buffer: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0
) -> np.ndarray:
    """An array of ``shape`` viewing ``buffer`` from ``offset`` (read-only if it is):
    ``np.ndarray`` with positional arguments costs half of ``frombuffer`` + ``reshape``.
    The caller has checked that the buffer holds the array."""
    return np.ndarray(shape, dtype, buffer, offset)


def wire_dtype(name: str) -> np.dtype | None:
    """The dtype a wire name stands for; None for a name not allowed on the wire."""
    return _WIRE_DTYPES.get(name)


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
    """``u32 header length | msgpack [(name, dtype, shape, nbytes)...] | raw bytes``.

    The arrays' buffers are joined as they are: one copy of the data, into the result.
    """
    entries: list[_Entry] = []
    chunks: list[np.ndarray] = []
    for name, value in tensors.items():
        arr, dtype_name = wire_form(value)
        if dtype_name is None:
            raise BundleError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        entries.append(_Entry(name, dtype_name, arr.shape, arr.nbytes))
        chunks.append(arr)
    header = _encode(entries)
    return b"".join([_HEADER_LEN.pack(len(header)), header, *chunks])


def unpack_tensors_bundle(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """The tensors of a bundle, as read-only views on ``data``."""
    view = memoryview(data)
    if len(view) < _HEADER_LEN.size:
        raise BundleError("tensor bundle is shorter than its header length")
    (header_len,) = _HEADER_LEN.unpack_from(view)
    start = _HEADER_LEN.size + header_len
    if start > len(view):
        raise BundleError("tensor bundle header runs past the end of the body")
    try:
        entries = _decode(view[_HEADER_LEN.size : start])
    except msgspec.DecodeError as exc:
        raise BundleError(f"tensor bundle header is invalid: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        dtype = _WIRE_DTYPES.get(entry.dtype)
        if dtype is None:
            raise BundleError(f"tensor {entry.name!r}: dtype {entry.dtype!r} not allowed")
        if min(entry.shape, default=0) < 0:
            raise BundleError(f"tensor {entry.name!r}: negative dimension in {entry.shape}")
        nbytes = math.prod(entry.shape) * dtype.itemsize
        if nbytes != entry.nbytes or start + nbytes > len(view):
            raise BundleError(
                f"tensor {entry.name!r}: shape {entry.shape} needs {nbytes} bytes, "
                f"{min(entry.nbytes, len(view) - start)} present"
            )
        out[entry.name] = array_on(view, dtype, entry.shape, start)
        start += nbytes
    if start != len(view):
        raise BundleError(f"tensor bundle has {len(view) - start} bytes after its tensors")
    return out
