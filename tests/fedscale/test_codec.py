"""fedscale.codec writes exactly np.save's bytes and reads exactly np.load's arrays."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedscale.codec import decode, encode

DTYPES = st.sampled_from(
    ["<f4", "<f8", "<f2", ">f4", "<i8", "<i4", "|i1", "|u1", "<u2", "|b1", "<c8", "<m8[s]"]
)


def np_save(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
)
def test_encode_is_byte_identical_to_np_save(array):
    assert encode(array) == np_save(array)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
    ),
    st.sampled_from(["C", "F", "view"]),
)
def test_decode_equals_np_load(array, layout):
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "view" and array.ndim:
        array = array[::2]
    data = np_save(array)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    got = decode(data)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.flags.writeable and got.flags.f_contiguous == expected.flags.f_contiguous
    np.testing.assert_array_equal(got, expected)
    assert encode(array) == data, "non-contiguous and Fortran arrays fall back to np.save"


def test_decode_refuses_what_is_not_npy():
    with pytest.raises(ValueError, match=r"expected \.npy bytes"):
        decode(b"PK\x03\x04 not an npy file")


def test_object_arrays_are_never_unpickled():
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    padded = header + " " * (64 - 10 - len(header) - 1) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded.encode() + b"\x00" * 8
    with pytest.raises(ValueError, match="without Python objects"):
        decode(data)
