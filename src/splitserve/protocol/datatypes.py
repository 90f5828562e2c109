"""Open Inference Protocol (v2) tensors: datatype names, and numpy arrays from and to the
JSON, binary (Triton's binary tensor data extension) and gRPC raw forms.

BYTES tensors are numpy object arrays of ``bytes``; in binary form each element is its
4-byte little-endian length followed by its bytes. BF16 has no numpy dtype of its own:
it comes from ``ml_dtypes`` (installed with onnx) and travels in binary form only.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from splitserve.errors import BadRequest
from splitserve.tensors import array_on

_NUMERIC = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dtype: name for name, dtype in _NUMERIC.items()}
_OBJECT = np.dtype(object)
DATATYPES = (*_NUMERIC, "BF16", "BYTES")


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - onnx brings it
        raise BadRequest("BF16 tensors need the ml_dtypes package on the server") from None
    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name (object for BYTES)."""
    if datatype in _NUMERIC:
        return _NUMERIC[datatype]
    if datatype == "BYTES":
        return _OBJECT
    if datatype == "BF16":
        return _bfloat16()
    raise BadRequest(f"unknown datatype {datatype!r}; known: {', '.join(DATATYPES)}")


def datatype_name(dtype: np.dtype | str) -> str:
    """The v2 datatype name of a numpy dtype (or dtype name: "float32", "bfloat16")."""
    name = _BY_DTYPE.get(dtype)  # the common case, one lookup
    if name is not None:
        return name
    if str(dtype) == "bfloat16":
        return "BF16"
    dtype = np.dtype(dtype)
    if dtype == _OBJECT or dtype.kind in "SU":
        return "BYTES"
    name = _BY_DTYPE.get(dtype)
    if name is None:
        raise BadRequest(f"dtype {dtype} has no v2 datatype")
    return name


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, list | tuple):
        for d in shape:  # a loop, not all(genexpr): this runs on every tensor
            if type(d) is not int or d < 0:  # bool is not a dimension
                break
        else:
            return tuple(shape)
    raise BadRequest(f"shape must be a list of non-negative integers, got {shape!r}")


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def split_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    """BYTES elements from their length-prefixed binary form."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"input {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(f"input {name!r}: BYTES element longer than its data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def join_bytes(elements: np.ndarray) -> bytes:
    """The length-prefixed binary form of a BYTES tensor."""
    parts: list[bytes] = []
    for element in elements.reshape(-1):
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def from_raw(name: str, datatype: str, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its binary form (HTTP binary extension, gRPC raw contents)."""
    shape = _check_shape(shape)
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        elements = split_bytes(raw, name)
        if len(elements) != _count(shape):
            raise BadRequest(
                f"input {name!r}: {len(elements)} BYTES elements for shape {list(shape)}"
            )
        arr = np.empty(len(elements), dtype=object)
        arr[:] = elements
        return arr.reshape(shape)
    expected = _count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input {name!r}: {len(raw)} bytes of data, {datatype} {list(shape)} needs {expected}"
        )
    return array_on(raw, dtype, shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row)]
    return data


def from_json(name: str, datatype: str, shape: Any, data: Any) -> np.ndarray:
    """A tensor from its JSON form: ``data`` flat or nested, row-major."""
    shape = _check_shape(shape)
    if datatype == "BF16":
        raise BadRequest(f"input {name!r}: BF16 tensors must use the binary data extension")
    dtype = numpy_dtype(datatype)
    flat = _flatten(data)
    if len(flat) != _count(shape):
        raise BadRequest(f"input {name!r}: {len(flat)} values for shape {list(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"input {name!r}: BYTES values must be strings in JSON")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [x.encode() for x in flat]
        return arr.reshape(shape)
    if any(isinstance(x, str | list | dict) or x is None for x in flat):
        raise BadRequest(f"input {name!r}: {datatype} values must be numbers")
    try:
        return np.asarray(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"input {name!r}: {exc}") from None


def to_raw(arr: np.ndarray) -> bytes | memoryview:
    """The binary form of an output (numeric: a view of its bytes, no copy)."""
    if arr.dtype == _OBJECT:
        return join_bytes(arr)
    arr = np.asarray(arr, order="C")
    try:
        return arr.data.cast("B")  # the cheap way, for what memoryview can describe
    except (TypeError, ValueError):  # BF16 (no buffer format), an empty shape
        return memoryview(arr.reshape(-1).view(np.uint8))


def to_json(arr: np.ndarray) -> list:
    """The JSON form of an output: a flat list, row-major (BYTES as UTF-8 strings)."""
    flat = arr.reshape(-1)
    if arr.dtype == _OBJECT:
        try:
            return [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
        except UnicodeDecodeError:
            raise BadRequest(
                "a BYTES output is not UTF-8 text: ask for it as binary data"
            ) from None
    if datatype_name(arr.dtype) == "BF16":
        raise BadRequest("BF16 outputs travel as binary data only: ask for binary data")
    return flat.tolist()
