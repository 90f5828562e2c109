"""Protocol v2 tensors: every datatype from and to its binary and JSON forms; bad data
is a 400 that says what is wrong."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest

from splitserve.errors import BadRequest
from splitserve.protocol import datatypes

NUMERIC = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_numeric_round_trips(datatype: str) -> None:
    arr = (np.arange(6) % 3).astype(NUMERIC[datatype]).reshape(2, 3)
    assert datatypes.datatype_name(arr.dtype) == datatype
    raw = datatypes.from_raw("t", datatype, [2, 3], bytes(datatypes.to_raw(arr)))
    np.testing.assert_array_equal(raw, arr)
    assert raw.dtype == arr.dtype
    parsed = datatypes.from_json("t", datatype, [2, 3], datatypes.to_json(arr))
    np.testing.assert_array_equal(parsed, arr)
    assert parsed.dtype == arr.dtype


def test_bf16_is_binary_only() -> None:
    arr = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    assert datatypes.datatype_name(arr.dtype) == "BF16"
    back = datatypes.from_raw("t", "BF16", [2], bytes(datatypes.to_raw(arr)))
    assert back.dtype == arr.dtype and back.astype(np.float32).tolist() == [1.5, -2.0]
    with pytest.raises(BadRequest, match="binary"):
        datatypes.from_json("t", "BF16", [2], [1.5, -2.0])
    with pytest.raises(BadRequest, match="binary"):
        datatypes.to_json(arr)


def test_bytes_round_trip() -> None:
    arr = np.array([b"a", b"", "\u00e9t\u00e9".encode()], dtype=np.object_)
    raw = datatypes.to_raw(arr)
    assert raw[:5] == struct.pack("<I", 1) + b"a"
    back = datatypes.from_raw("t", "BYTES", [3], raw)
    assert back.tolist() == arr.tolist()
    assert datatypes.to_json(arr) == ["a", "", "\u00e9t\u00e9"]
    assert datatypes.from_json("t", "BYTES", [1, 3], [["a", "", "x"]]).shape == (1, 3)
    with pytest.raises(BadRequest, match="binary"):
        datatypes.to_json(np.array([b"\xff"], dtype=np.object_))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: datatypes.from_raw("t", "FP32", [2], b"\0" * 7), "8"),
        (lambda: datatypes.from_raw("t", "FP32", [-1], b""), "non-negative"),
        (lambda: datatypes.from_raw("t", "FP33", [1], b"\0" * 4), "unknown datatype"),
        (lambda: datatypes.from_raw("t", "BYTES", [1], b"\5\0\0\0ab"), "longer"),
        (lambda: datatypes.from_raw("t", "BYTES", [2], b"\1\0\0\0a"), "1 BYTES elements"),
        (lambda: datatypes.from_raw("t", "BYTES", [1], b"\1\0"), "truncated"),
        (lambda: datatypes.from_json("t", "INT8", [2], [1]), "1 values"),
        (lambda: datatypes.from_json("t", "INT8", [1], [300]), "t"),
        (lambda: datatypes.from_json("t", "FP32", [1], ["1"]), "numbers"),
        (lambda: datatypes.from_json("t", "BYTES", [1], [1]), "strings"),
        (lambda: datatypes.from_json("t", "FP32", "2", [1, 2]), "shape"),
    ],
)
def test_bad_tensors_are_400(call, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        call()
