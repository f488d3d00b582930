"""Per-image result cache: the same image bytes, model and recipe give the stored result, no model pass.

Key (docs/records.md)::

    {prefix}res:v1:{model}:{image}:{recipe}:{refs}

- ``model``: 16 hex of sha256 over the detector's identity (``describe()``: method,
  architecture, weights tag, device, method settings) plus ``ZSI_PRECISION`` and ``ZSI_BACKEND``;
- ``image``: sha256 (64 hex) of the uploaded BYTES (a re-encoded image is a new key; no
  decode is needed to look it up);
- ``recipe``: 16 hex of sha256 over the product recipe JSON WITHOUT its decision-only
  fields (threshold, keep_images, dataset, calibration provenance) plus the method's prompt
  digest: new words recompute, a new threshold re-decides from the cached score;
- ``refs``: the content hash of the golden reference set used, or ``none``.

Visual features (window embeddings, V-V patch tokens) will use
``{prefix}feat:v1:{model}:{image}`` (:func:`feature_key`): independent of the recipe and
the references, so a changed prompt re-scores from them without a new visual pass.

The value is a zlib-compressed :mod:`models.serialization` blob (never pickle): the map
quantised to 16 bits (value = q / 65535, see :func:`quantize_map`), stored as differences
along rows (modulo 2**16, exact; smooth maps compress ~10x better) plus a JSON header with the
exact score, map min/max and the regions at the threshold they were computed for.
The score is bit-identical; the map is within 1.5/65535 (2.3e-5) of the original and
renders to the SAME 8-bit PNG as the uncached answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.base import AnomalyResult, Detector
from models.postprocess import map_to_uint8
from models.serialization import SerializationError, pack_arrays, unpack_arrays
from prompts import ProductRecipe
from service.cache import BlobCache

log = logging.getLogger("service.result_cache")

KEY_VERSION = "v1"
#: Recipe fields that only change the decision (or nothing at all), never the score or map.
DECISION_ONLY_FIELDS = frozenset(
    {"threshold", "keep_images", "dataset", "threshold_source", "threshold_provenance", "calibration"}
)


def _h(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def model_digest(detector: Detector, *, precision: str, backend: str) -> str:
    """16 hex: the detector's identity (method, model, weights, device, settings), precision, backend."""
    return _h(detector.model_key, detector.describe(), precision, backend)


def scoring_digest(recipe: ProductRecipe | None, prompt_digest: str) -> str:
    """16 hex: what of the recipe changes the score (not the threshold), plus the prompt digest."""
    doc = None
    if recipe is not None:
        doc = {k: v for k, v in recipe.model_dump(mode="json").items() if k not in DECISION_ONLY_FIELDS}
    return _h(doc, prompt_digest)


def result_key(prefix: str, model: str, image_sha256: str, recipe: str, refs: str | None) -> str:
    return f"{prefix}res:{KEY_VERSION}:{model}:{image_sha256}:{recipe}:{refs or 'none'}"


def feature_key(prefix: str, model: str, image_sha256: str) -> str:
    """Reserved for per-image visual features (recipe- and reference-independent)."""
    return f"{prefix}feat:{KEY_VERSION}:{model}:{image_sha256}"


def quantize_map(anomaly_map: np.ndarray) -> np.ndarray:
    """``float32 (H, W)`` in [0, 1] -> ``uint16 (H, W)`` q with ``q / 65535`` rendering to the same 8-bit map.

    ``q = round(65535 v)``, then nudged by one step where ``round(255 q / 65535)`` would
    differ from ``round(255 v)`` (values within 0.002 of an 8-bit rounding edge), so the
    8-bit PNG of the answer is identical. Error at most 1.5/65535.
    """
    v = np.clip(np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0), 0.0, 1.0)
    q = np.rint(v * np.float32(65535.0)).astype(np.int32)
    want = map_to_uint8(v).astype(np.int32)
    for _ in range(3):
        diff = want - map_to_uint8(dequantize_map(q)).astype(np.int32)
        if not diff.any():
            break
        q = np.clip(q + np.sign(diff), 0, 65535)
    return q.astype(np.uint16)


def _row_deltas(q: np.ndarray) -> np.ndarray:
    """``uint16 (H, W)`` -> differences along each row, modulo 2**16, as ``int16`` (exact).

    Maps are smooth, so the differences are small and compress ~10x better than the values
    (models.serialization takes signed dtypes only, hence int16 bits).
    """
    d = np.diff(q.astype(np.int64), axis=1, prepend=np.zeros((q.shape[0], 1), np.int64))
    return np.mod(d, 65536).astype(np.uint16).view(np.int16)


def _from_row_deltas(dx: np.ndarray) -> np.ndarray:
    return (np.cumsum(dx.view(np.uint16).astype(np.int64), axis=1) % 65536).astype(np.uint16)


def dequantize_map(q: np.ndarray) -> np.ndarray:
    """``uint16`` -> ``float32`` in [0, 1] (``q / 65535``)."""
    return (np.asarray(q).astype(np.float32) / np.float32(65535.0)).astype(np.float32)


@dataclass(frozen=True)
class CachedResult:
    """A stored result: enough to answer without the model (and without decoding the image).

    ``regions``/``regions_truncated`` are exact for ``regions_threshold`` and
    ``regions_max``; for another threshold they are recomputed from ``anomaly_map``.
    """

    score: float
    anomaly_map: np.ndarray  # float32 (H, W) in [0, 1], read-only (dequantised)
    map_min: float
    map_max: float
    method: str
    model: str
    weights: str
    prompt_digest: str
    used_references: bool
    random_weights: bool
    image_width: int
    image_height: int
    pixel_hash: str
    regions_threshold: float
    regions_max: int
    regions: tuple[Mapping[str, Any], ...]
    regions_truncated: bool
    details: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1  # images in the forward batch that computed the result (answered again on a hit)

    def to_result(self) -> AnomalyResult:
        return AnomalyResult(
            score=self.score,
            anomaly_map=self.anomaly_map,
            method=self.method,
            model=self.model,
            weights=self.weights,
            prompt_digest=self.prompt_digest,
            used_references=self.used_references,
            random_weights=self.random_weights,
            timings={},
            details=dict(self.details),
        )


def encode_entry(
    result: AnomalyResult,
    *,
    image_width: int,
    image_height: int,
    pixel_hash: str,
    threshold: float,
    max_regions: int,
    regions: list[dict[str, Any]],
    regions_truncated: bool,
    batch_size: int = 1,
) -> bytes | None:
    """The cache value of ``result``; None when it cannot be stored faithfully.

    ``batch_size``: images in the forward batch that computed ``result``; a hit answers it
    again, so its body equals the first answer's apart from ``cached``, id and timings.
    """
    amap = np.asarray(result.anomaly_map, dtype=np.float32)
    q = quantize_map(amap)
    if not np.array_equal(map_to_uint8(dequantize_map(q)), map_to_uint8(amap)):
        return None  # never store a map that would render differently
    meta = {
        "score": float(result.score).hex(),  # exact round trip
        "map_min": float(amap.min()).hex(),
        "map_max": float(amap.max()).hex(),
        "method": result.method,
        "model": result.model,
        "weights": result.weights,
        "prompt_digest": result.prompt_digest,
        "used_references": bool(result.used_references),
        "random_weights": bool(result.random_weights),
        "image_width": int(image_width),
        "image_height": int(image_height),
        "pixel_hash": pixel_hash,
        "regions_threshold": float(threshold).hex(),
        "regions_max": int(max_regions),
        "regions": regions,
        "regions_truncated": bool(regions_truncated),
        "details": dict(result.details),
        "batch_size": int(batch_size),
    }
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError):
        return None  # details not JSON-safe: do not cache
    return zlib.compress(pack_arrays({"map_dx": _row_deltas(q)}, meta), 1)


_REGION_INTS = ("x0", "y0", "x1", "y1", "area")
_REGION_FLOATS = ("max_score", "mean_score")


def _str(meta: Mapping[str, Any], name: str) -> str:
    value = meta[name]
    if not isinstance(value, str):
        raise SerializationError(f"corrupt cache entry: {name} must be a string")
    return value


def _flag(meta: Mapping[str, Any], name: str) -> bool:
    value = meta[name]
    if not isinstance(value, bool):
        raise SerializationError(f"corrupt cache entry: {name} must be true or false")
    return value


def _count(meta: Mapping[str, Any], name: str, *, low: int) -> int:
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SerializationError(f"corrupt cache entry: {name} must be an integer >= {low}")
    return value


def _finite(meta: Mapping[str, Any], name: str) -> float:
    value = float.fromhex(_str(meta, name))
    if not np.isfinite(value):
        raise SerializationError(f"corrupt cache entry: {name} is not finite")
    return value


def _region(r: Any, width: int, height: int) -> Mapping[str, Any]:
    """One stored region, checked: the integer bounds inside the image, finite scores."""
    if not isinstance(r, dict) or set(r) != {*_REGION_INTS, *_REGION_FLOATS}:
        raise SerializationError("corrupt cache entry: a region is not a region object")
    if any(isinstance(r[k], bool) or not isinstance(r[k], int) for k in _REGION_INTS):
        raise SerializationError("corrupt cache entry: region bounds and area must be integers")
    if any(isinstance(r[k], bool) or not isinstance(r[k], int | float) for k in _REGION_FLOATS) or not all(
        np.isfinite(float(r[k])) for k in _REGION_FLOATS
    ):
        raise SerializationError("corrupt cache entry: region scores must be finite numbers")
    if not (0 <= r["x0"] <= r["x1"] < width and 0 <= r["y0"] <= r["y1"] < height and r["area"] >= 1):
        raise SerializationError("corrupt cache entry: a region lies outside the image")
    return r


def decode_entry(blob: bytes) -> CachedResult:
    """Raises :class:`SerializationError` for a blob that is not a cache entry.

    Checked strictly, as everything read back from a shared store: the map is
    ``int16 (H, W)`` at the stored image size (the map is at the input resolution), every
    header field has its type, the floats are finite and the regions lie inside the image,
    so a corrupt entry is a miss, never an answer that fails later.
    """
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise SerializationError(f"not a compressed cache entry: {exc}") from exc
    arrays, meta = unpack_arrays(raw)
    try:
        dx = arrays["map_dx"]
        if dx.dtype != np.int16 or dx.ndim != 2:
            raise SerializationError(f"cached map must be int16 (H, W), got {dx.dtype} {dx.shape}")
        m: dict[str, Any] = dict(meta)
        width, height = _count(m, "image_width", low=1), _count(m, "image_height", low=1)
        if dx.shape != (height, width):
            raise SerializationError(f"cached map {dx.shape} is not at the image size {height}x{width}")
        regions = m["regions"]
        details = m["details"]
        if not isinstance(regions, list) or not isinstance(details, dict):
            raise SerializationError("corrupt cache entry: regions must be a list and details an object")
        amap = dequantize_map(_from_row_deltas(dx))
        amap.setflags(write=False)
        return CachedResult(
            score=_finite(m, "score"),
            anomaly_map=amap,
            map_min=_finite(m, "map_min"),
            map_max=_finite(m, "map_max"),
            method=_str(m, "method"),
            model=_str(m, "model"),
            weights=_str(m, "weights"),
            prompt_digest=_str(m, "prompt_digest"),
            used_references=_flag(m, "used_references"),
            random_weights=_flag(m, "random_weights"),
            image_width=width,
            image_height=height,
            pixel_hash=_str(m, "pixel_hash"),
            regions_threshold=_finite(m, "regions_threshold"),
            regions_max=_count(m, "regions_max", low=0),
            regions=tuple(_region(r, width, height) for r in regions),
            regions_truncated=_flag(m, "regions_truncated"),
            details=details,
            batch_size=_count(m, "batch_size", low=0) if "batch_size" in m else 1,  # older entries: 1
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"corrupt cache entry: {exc}") from exc


class ResultCache:
    """get/put of :class:`CachedResult` on a :class:`~service.cache.BlobCache` (Redis or in-process).

    Never raises because of the backend or a corrupt entry (a miss instead: the entry is
    deleted and counted through ``on_corrupt``, and the request is computed anew).
    """

    def __init__(
        self,
        cache: BlobCache,
        *,
        prefix: str = "zsi:",
        ttl_s: float = 3600.0,
        max_entry_bytes: int = 4 * 1024 * 1024,
        on_lookup: Callable[[bool], None] | None = None,
        on_corrupt: Callable[[], None] | None = None,
    ) -> None:
        self.cache = cache
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self._on_lookup = on_lookup
        self._on_corrupt = on_corrupt

    def key(
        self,
        detector: Detector,
        *,
        precision: str,
        backend: str,
        image_sha256: str,
        recipe: ProductRecipe | None,
        ref_key: str | None,
    ) -> str:
        """The key of one request (blocking-light: a prompt digest and a few hashes)."""
        refs = ref_key.rsplit(":", 1)[-1] if ref_key else None
        return result_key(
            self.prefix,
            model_digest(detector, precision=precision, backend=backend),
            image_sha256,
            scoring_digest(recipe, detector.prompt_digest(product=recipe)),
            refs,
        )

    def get(self, key: str) -> CachedResult | None:
        blob = self.cache.get(key)
        entry = None
        if blob is not None:
            try:
                entry = decode_entry(blob)
            except SerializationError as exc:
                log.warning("dropping a corrupt result cache entry %s: %s", key, exc)
                self.cache.delete(key)
                if self._on_corrupt:
                    self._on_corrupt()
        if self._on_lookup:
            self._on_lookup(entry is not None)
        return entry

    def put(self, key: str, blob: bytes | None) -> bool:
        if blob is None or len(blob) > self.max_entry_bytes:
            return False
        self.cache.set(key, blob, self.ttl_s)
        return True


__all__ = [
    "DECISION_ONLY_FIELDS",
    "CachedResult",
    "ResultCache",
    "decode_entry",
    "dequantize_map",
    "encode_entry",
    "feature_key",
    "model_digest",
    "quantize_map",
    "result_key",
    "scoring_digest",
]
