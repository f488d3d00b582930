"""Arrays <-> bytes with an explicit dtype/shape header. Never pickle.

Layout of a packed blob::

    b"ZSIA" | version (1 byte) | header length (4 bytes, little endian) | JSON header | raw data

The JSON header lists, per array, its name, dtype, shape and byte offset into the
raw data. Only plain numeric dtypes are accepted, so decoding can never execute code.
"""

from __future__ import annotations

import json
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


def unpack_arrays(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    if len(blob) < 9 or blob[:4] != MAGIC:
        raise SerializationError("not a packed array blob")
    if blob[4] != VERSION:
        raise SerializationError(f"unsupported blob version {blob[4]}")
    (hlen,) = struct.unpack("<I", blob[5:9])
    try:
        header = json.loads(blob[9 : 9 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError("corrupt blob header") from exc
    data = memoryview(blob)[9 + hlen :]
    out: dict[str, np.ndarray] = {}
    for e in header.get("arrays", []):
        if e["dtype"] not in _ALLOWED_DTYPES:
            raise SerializationError(f"dtype {e['dtype']} not allowed")
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        start, n = int(e["offset"]), int(e["nbytes"])
        if start + n > len(data):
            raise SerializationError("truncated blob")
        arr = np.frombuffer(data[start : start + n], dtype=dtype).reshape(e["shape"])
        out[e["name"]] = arr.astype(dtype.newbyteorder("="), copy=True)
    return out, dict(header.get("meta", {}))


def pack_array(array: np.ndarray) -> bytes:
    return pack_arrays({"value": array})


def unpack_array(blob: bytes) -> np.ndarray:
    arrays, _ = unpack_arrays(blob)
    if "value" not in arrays:
        raise SerializationError("blob holds no single array")
    return arrays["value"]
