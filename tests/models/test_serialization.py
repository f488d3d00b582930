"""Packed array blobs: round trip, and every malformed header is a SerializationError (never another error)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from models.base import ReferenceSet
from models.serialization import MAGIC, VERSION, SerializationError, pack_arrays, unpack_arrays


def rebuild(blob: bytes, header: object, data: bytes | None = None) -> bytes:
    (hlen,) = struct.unpack("<I", blob[5:9])
    raw = json.dumps(header).encode()
    return (
        MAGIC
        + bytes([VERSION])
        + struct.pack("<I", len(raw))
        + raw
        + (blob[9 + hlen :] if data is None else data)
    )


def header_of(blob: bytes) -> dict:
    (hlen,) = struct.unpack("<I", blob[5:9])
    return json.loads(blob[9 : 9 + hlen])


def test_round_trip_keeps_dtype_shape_and_values():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    out, meta = unpack_arrays(pack_arrays(arrays, {"k": "v"}))
    assert meta == {"k": "v"}
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and np.array_equal(out[k], v)


def _entry(edit):
    def apply(h):
        return {**h, "arrays": [edit(dict(h["arrays"][0]))]}

    return apply


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: [1, 2, 3],  # header is a list
        lambda h: {**h, "arrays": {"a": 1}},  # arrays not a list
        lambda h: {**h, "meta": [1]},  # meta not a dict
        lambda h: {**h, "arrays": [7]},  # entry not an object
        _entry(lambda e: {**e, "shape": [3, 3]}),  # shape x dtype != bytes
        _entry(lambda e: {**e, "shape": [2, -3]}),
        _entry(lambda e: {**e, "shape": "2x3"}),
        _entry(lambda e: {**e, "shape": [2.0, 3]}),
        _entry(lambda e: {**e, "dtype": "object"}),
        _entry(lambda e: {**e, "dtype": 5}),
        _entry(lambda e: {**e, "nbytes": 12}),
        _entry(lambda e: {**e, "offset": 4}),
        _entry(lambda e: {**e, "offset": -1}),
        _entry(lambda e: {k: v for k, v in e.items() if k != "name"}),
        lambda h: {**h, "arrays": h["arrays"] * 2},  # duplicate name
    ],
)
def test_malformed_headers_are_serialization_errors(edit):
    blob = pack_arrays({"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(SerializationError):
        unpack_arrays(rebuild(blob, edit(header_of(blob))))


def test_truncated_and_padded_blobs_are_serialization_errors():
    blob = pack_arrays({"a": np.zeros((2, 3), np.float32)})
    for bad in (blob[:-1], blob + b"\0", blob[:12], b"ZSIA\x01\xff\xff\xff\x7f{}", b"junk"):
        with pytest.raises(SerializationError):
            unpack_arrays(bad)


@pytest.mark.parametrize(
    "meta",
    [
        {"method": "winclip", "model_key": "m"},  # no image_hashes
        {"method": "winclip", "image_hashes": ["a"]},  # no model_key
        {"method": 3, "model_key": "m", "image_hashes": ["a"]},
        {"method": "winclip", "model_key": "m", "image_hashes": "a"},
        {"method": "winclip", "model_key": "m", "image_hashes": [1]},
    ],
)
def test_reference_set_with_a_bad_header_is_a_serialization_error(meta):
    blob = pack_arrays({"patches": np.zeros((2, 4), np.float32)}, meta)
    with pytest.raises(SerializationError):
        ReferenceSet.from_bytes(blob)


def test_reference_set_round_trip():
    refs = ReferenceSet("winclip", "winclip/m/w", ("h1", "h2"), {"patches": np.ones((2, 4), np.float32)})
    back = ReferenceSet.from_bytes(refs.to_bytes())
    assert back.model_key == refs.model_key and back.image_hashes == refs.image_hashes
    assert np.array_equal(back.arrays["patches"], refs.arrays["patches"])
