"""Packed arrays on the wire: numpy <-> `PackedArray` (dtype + shape + little-endian bytes).

bfloat16 has no numpy dtype; it travels as the upper 16 bits of float32
(round-to-nearest-even on encode) and decodes to float32. Decoding validates
that the byte length matches the shape, so a malformed message is an error,
never a silently reshaped array.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from protos import teacher_pb2 as pb

_NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.INT32: np.dtype("<i4"),
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT8: np.dtype("u1"),
}
_ITEMSIZE = {pb.INT32: 4, pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.UINT8: 1}

LOGPROB_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)


class ArrayError(ValueError):
    """A PackedArray is malformed (unknown dtype, or bytes that do not match the shape)."""


def dtype_name(dtype: int) -> str:
    return pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)


def _float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def pack(array: np.ndarray, dtype: int) -> pb.PackedArray:
    """Encode `array` as `dtype` (a teacher_pb2.DType value)."""
    if dtype == pb.BFLOAT16:
        data = _float32_to_bf16_bits(np.asarray(array, dtype=np.float32)).tobytes()
    elif dtype in _NUMPY_DTYPES:
        data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dtype]).tobytes()
    else:
        raise ArrayError(f"cannot pack dtype {dtype_name(dtype)}")
    # `dtype` is one of the enum's values (checked above); the stub types the field as the enum
    return pb.PackedArray(dtype=cast("pb.DType", dtype), shape=list(np.shape(array)), data=data)


def unpack(packed: pb.PackedArray, *, field: str = "array") -> np.ndarray:
    """Decode to numpy (bfloat16 -> float32). Raises ArrayError naming `field` when malformed."""
    if packed.dtype not in _ITEMSIZE:
        raise ArrayError(f"{field}: unsupported dtype {dtype_name(packed.dtype)}")
    shape = tuple(int(s) for s in packed.shape)
    if any(s < 0 for s in shape):
        raise ArrayError(f"{field}: negative dimension in shape {shape}")
    count = math.prod(shape)  # Python ints: an int64 product would wrap (2**62 * 4 == 0)
    expected = count * _ITEMSIZE[packed.dtype]
    if len(packed.data) != expected:
        raise ArrayError(
            f"{field}: shape {shape} of {dtype_name(packed.dtype)} needs {expected} bytes, got {len(packed.data)}"
        )
    if packed.dtype == pb.BFLOAT16:
        flat = (np.frombuffer(packed.data, dtype="<u2").astype("<u4") << 16).view("<f4")
    else:
        flat = np.frombuffer(packed.data, dtype=_NUMPY_DTYPES[packed.dtype])
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # e.g. a zero-size array with a dimension numpy cannot index
        raise ArrayError(f"{field}: shape {shape} is not a valid array shape ({exc})") from None
