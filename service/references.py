"""Golden (normal) reference images per product: encoded once, stored, shared.

Per product, a small JSON index lists one reference set per model key
(``method/model/weights``): the image hashes and the key of the stored
:class:`models.base.ReferenceSet` blob. The blob key is a content hash of model key,
product id and the ordered image hashes, so a second process (or a repeated upload)
finds the features already stored and encodes nothing.

The model key is the detector's: it names what shapes the features (AnomalyDINO adds its
input size, a tiled product's detector its tiling, ``.../tile518-overlap64``), so a set
made under another configuration is never used; the product's golden images must then be
uploaded again (``POST /products/{id}/references`` encodes them for every loaded method
that uses golden images, docs/service.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.base import Detector, ReferenceSet, image_hash
from models.serialization import SerializationError
from service.cache import BlobCache, CacheUnavailable

log = logging.getLogger("service.references")


class ReferenceStore:
    """Reference indexes and feature blobs in ``store``.

    A corrupt index or blob is never an error for the request: the index reads as empty,
    the blob is deleted (the product falls back to zero-shot and its listing says
    ``stored: false`` until the golden images are uploaded again), and ``on_corrupt(kind)``
    counts it (``reference_index`` / ``references``).
    """

    def __init__(
        self,
        store: BlobCache,
        *,
        prefix: str = "zsi:",
        ttl_s: float | None = None,
        on_corrupt: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.index_prefix = f"{prefix}refs:"
        self.blob_prefix = f"{prefix}refset:"
        self.ttl_s = ttl_s or None
        self._decoded: OrderedDict[str, ReferenceSet] = OrderedDict()
        self._lock = threading.Lock()
        self._on_corrupt = on_corrupt

    def _corrupt(self, kind: str) -> None:
        if self._on_corrupt:
            self._on_corrupt(kind)

    def blob_key(self, model_key: str, product_id: str, hashes: Sequence[str]) -> str:
        payload = json.dumps([model_key, product_id, list(hashes)])
        return self.blob_prefix + hashlib.sha256(payload.encode()).hexdigest()[:32]

    # ------------------------------------------------------------------ index
    def index(self, product_id: str) -> dict[str, dict[str, Any]]:
        blob = self.store.get(self.index_prefix + product_id)
        if blob is None:
            return {}
        try:
            doc = json.loads(blob)
            sets = doc["sets"]
            if not isinstance(sets, dict) or not all(isinstance(e, dict) for e in sets.values()):
                raise TypeError("'sets' must map model keys to objects")
            return sets
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a corrupt reference index for %s: %s", product_id, exc)
            self._corrupt("reference_index")
            return {}

    def _write_index(self, product_id: str, sets: dict[str, dict[str, Any]]) -> None:
        key = self.index_prefix + product_id
        if sets:
            self.store.set(key, json.dumps({"sets": sets}).encode(), self.ttl_s)
        else:
            self.store.delete(key)

    # ---------------------------------------------------------------- writing
    def check_writable(self) -> None:
        """Raise :class:`service.cache.StoreUnavailable` (503) now, before any model work, if
        the store would refuse the write."""
        self.store.check_writable()

    def has_blob(self, key: str) -> bool:
        return self.store.get(key) is not None

    def methods_with_sets(self, product_id: str) -> set[str]:
        """The methods the product has a reference set for (under any model key)."""
        return {str(e.get("method", "")) for e in self.index(product_id).values()}

    def save(self, product_id: str, detector: Detector, refs: ReferenceSet) -> str:
        key = self.blob_key(refs.model_key, product_id, refs.image_hashes)
        self.store.set(key, refs.to_bytes(), self.ttl_s)
        self._remember(key, refs)
        return key

    def set_index_entry(self, product_id: str, detector: Detector, hashes: Sequence[str], key: str) -> None:
        sets = self.index(product_id)
        sets[detector.model_key] = {
            "method": detector.method,
            "model_key": detector.model_key,
            "image_hashes": list(hashes),
            "key": key,
            "created_at": time.time(),
        }
        self._write_index(product_id, sets)

    def clear(self, product_id: str, method: str | None = None) -> int:
        """Drop the product's reference sets (of one method, or all); returns how many."""
        sets = self.index(product_id)
        dropped = [mk for mk, e in sets.items() if method is None or e.get("method") == method]
        for mk in dropped:
            entry = sets.pop(mk)
            # The blob is content-addressed and may be shared by an identical upload elsewhere,
            # but it belongs to this product id (the id is in the key): safe to delete.
            self.store.delete(str(entry.get("key", "")))
        self._write_index(product_id, sets)
        return len(dropped)

    # ---------------------------------------------------------------- reading
    def _remember(self, key: str, refs: ReferenceSet) -> None:
        with self._lock:
            self._decoded[key] = refs
            self._decoded.move_to_end(key)
            while len(self._decoded) > 32:
                self._decoded.popitem(last=False)

    def lookup(self, product_id: str, detector: Detector) -> tuple[ReferenceSet | None, str | None]:
        """The stored reference set of ``product_id`` for this detector's model, if any."""
        entry = self.index(product_id).get(detector.model_key)
        if not entry:
            return None, None
        key = str(entry.get("key", ""))
        with self._lock:
            cached = self._decoded.get(key)
        if cached is not None:
            return cached, key
        blob = self.store.get(key)
        if blob is None:
            log.warning("reference features %s of %s are gone (expired?); using zero-shot", key, product_id)
            return None, None
        try:
            refs = ReferenceSet.from_bytes(blob)
        except SerializationError as exc:
            log.warning(
                "dropping corrupt reference features %s of %s (%s); using zero-shot until the golden "
                "images are uploaded again",
                key,
                product_id,
                exc,
            )
            self._corrupt("references")
            with contextlib.suppress(CacheUnavailable):
                self.store.delete(key)
            return None, None
        self._remember(key, refs)
        return refs, key


def hashes_of(images: Sequence[np.ndarray]) -> list[str]:
    return [image_hash(img) for img in images]
