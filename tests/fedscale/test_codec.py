"""fedscale.codec writes exactly np.save's bytes and reads exactly np.load's arrays."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedscale.codec import decode, dtype_name, encode, view

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


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
    ),
    st.booleans(),
)
def test_view_reads_the_same_array_without_copying(array, fortran):
    if fortran:
        array = np.asfortranarray(array)
    data = np_save(array)
    got = view(data)
    np.testing.assert_array_equal(got, np.load(io.BytesIO(data), allow_pickle=False))
    assert got.dtype == array.dtype and got.shape == array.shape
    assert not got.flags.writeable, "a view of immutable bytes: never written through"
    if array.size:
        assert np.shares_memory(got, np.frombuffer(data, dtype=np.uint8))


def test_view_refuses_truncated_bytes():
    data = np_save(np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError):
        view(data[:-4])


@pytest.mark.parametrize("name", ["<f4", ">f4", "|b1", "<U3", "<m8[s]", "<c16", "|V8"])
def test_dtype_name_is_str_of_the_dtype(name):
    dtype = np.dtype(name)
    assert dtype_name(dtype) == str(dtype)
    assert dtype_name(np.dtype(name)) == str(dtype), "remembered, still the same"


def test_decode_refuses_what_is_not_npy():
    with pytest.raises(ValueError, match=r"expected \.npy bytes"):
        decode(b"PK\x03\x04 not an npy file")


def test_object_arrays_are_never_unpickled():
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    padded = header + " " * (64 - 10 - len(header) - 1) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded.encode() + b"\x00" * 8
    with pytest.raises(ValueError, match="without Python objects"):
        decode(data)
