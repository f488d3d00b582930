"""Arrays <-> bytes with an explicit dtype/shape header. Never pickle.

Layout of a packed blob::

    b"ZSIA" | version (1 byte) | header length (4 bytes, little endian) | JSON header | raw data

The JSON header lists, per array, its name, dtype, shape and byte offset into the
raw data. Only plain numeric dtypes are accepted, so decoding can never execute code.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np

MAGIC = b"ZSIA"
VERSION = 1
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


class SerializationError(ValueError):
    """A blob is not a packed array blob, or is corrupt."""


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, object] | None = None) -> bytes:
    entries = []
    chunks = []
    offset = 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.name not in _ALLOWED_DTYPES:
            raise SerializationError(f"dtype {a.dtype} of {name!r} cannot be serialized")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append(
            {
                "name": name,
                "dtype": a.dtype.name,
                "shape": list(a.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"arrays": entries, "meta": dict(meta or {})}, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(chunks)


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SerializationError(f"corrupt blob header: {what} must be a non-negative integer")
    return value


def unpack_arrays(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Decode a packed blob; every malformed blob raises :class:`SerializationError`.

    The header is checked strictly before any data is read: a JSON object with an
    ``arrays`` list and a ``meta`` object; per array a unique name, an allowed dtype, a
    shape of non-negative integers with ``prod(shape) * itemsize == nbytes``, and a byte
    range inside the data; the data ends where the last array ends.
    """
    if len(blob) < 9 or blob[:4] != MAGIC:
        raise SerializationError("not a packed array blob")
    if blob[4] != VERSION:
        raise SerializationError(f"unsupported blob version {blob[4]}")
    (hlen,) = struct.unpack("<I", blob[5:9])
    if 9 + hlen > len(blob):
        raise SerializationError("truncated blob header")
    try:
        header = json.loads(blob[9 : 9 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SerializationError("corrupt blob header") from exc
    if not isinstance(header, dict):
        raise SerializationError("corrupt blob header: not a JSON object")
    entries = header.get("arrays", [])
    meta = header.get("meta", {})
    if not isinstance(entries, list) or not isinstance(meta, dict):
        raise SerializationError("corrupt blob header: 'arrays' must be a list and 'meta' an object")
    data = memoryview(blob)[9 + hlen :]
    out: dict[str, np.ndarray] = {}
    end = 0
    for e in entries:
        if not isinstance(e, dict):
            raise SerializationError("corrupt blob header: an array entry is not an object")
        name, dtype_name, shape = e.get("name"), e.get("dtype"), e.get("shape")
        if not isinstance(name, str) or name in out:
            raise SerializationError(f"corrupt blob header: bad or repeated array name {name!r}")
        if not isinstance(dtype_name, str) or dtype_name not in _ALLOWED_DTYPES:
            raise SerializationError(f"dtype {dtype_name!r} not allowed")
        if not isinstance(shape, list):
            raise SerializationError(f"corrupt blob header: shape of {name!r} is not a list")
        dims = [_int(d, f"shape of {name!r}") for d in shape]
        start, n = _int(e.get("offset"), "offset"), _int(e.get("nbytes"), "nbytes")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if math.prod(dims) * dtype.itemsize != n:
            raise SerializationError(
                f"corrupt blob: {name!r} shape {dims} x {dtype_name} is not its {n} bytes"
            )
        if start + n > len(data):
            raise SerializationError("truncated blob")
        end = max(end, start + n)
        arr = np.frombuffer(data[start : start + n], dtype=dtype).reshape(dims)
        out[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    if end != len(data):
        raise SerializationError(f"corrupt blob: {len(data) - end} bytes after the last array")
    return out, dict(meta)


def pack_array(array: np.ndarray) -> bytes:
    return pack_arrays({"value": array})


def unpack_array(blob: bytes) -> np.ndarray:
    arrays, _ = unpack_arrays(blob)
    if "value" not in arrays:
        raise SerializationError("blob holds no single array")
    return arrays["value"]
