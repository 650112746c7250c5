"""Packed arrays: round trips for every dtype, and malformed arrays rejected with the field named."""

from __future__ import annotations

import numpy as np
import pytest

from protos import teacher_pb2 as pb
from protos.arrays import ArrayError, pack, unpack

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("dtype,tol", [(pb.FLOAT32, 0), (pb.FLOAT16, 1e-3), (pb.BFLOAT16, 8e-3)])
def test_float_round_trip(dtype, tol):
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 4
    y = unpack(pack(x, dtype))
    assert y.shape == (7, 5) and y.dtype == (np.float16 if dtype == pb.FLOAT16 else np.float32)
    np.testing.assert_allclose(y, x, rtol=tol, atol=tol)


def test_bfloat16_keeps_infinities_and_nan():
    y = unpack(pack(np.array([-np.inf, np.inf, np.nan, 0.0], np.float32), pb.BFLOAT16))
    assert y[0] == -np.inf and y[1] == np.inf and np.isnan(y[2]) and y[3] == 0


def test_int32_round_trip_is_little_endian_bytes():
    packed = pack(np.array([1, 256], np.int64), pb.INT32)
    assert packed.data == b"\x01\x00\x00\x00\x00\x01\x00\x00" and list(packed.shape) == [2]
    np.testing.assert_array_equal(unpack(packed), [1, 256])


def test_wrong_byte_count_is_rejected_naming_the_field():
    with pytest.raises(ArrayError, match="token_ids: shape \\(3,\\) of INT32 needs 12 bytes, got 8"):
        unpack(pb.PackedArray(dtype=pb.INT32, shape=[3], data=b"\0" * 8), field="token_ids")


def test_unknown_dtype_is_rejected():
    with pytest.raises(ArrayError, match="unsupported dtype"):
        unpack(pb.PackedArray(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"))
