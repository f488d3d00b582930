"""Golden (normal) reference images per product: encoded once, stored, shared.

Per product, a small JSON index lists one reference set per model key
(``method/model/weights``): the image hashes and the key of the stored
:class:`models.base.ReferenceSet` blob. The blob key is a content hash of model key,
product id and the ordered image hashes, so a second process (or a repeated upload)
finds the features already stored and encodes nothing.

The uploaded bytes of the golden images are kept too (threshold calibration scores them
leave-one-out; ``?append=true`` re-encodes the grown set from them), in the same store,
content-addressed per product: ``{prefix}refimg:{product}:{sha256 of the bytes}``. The
index entry lists them (``images``, in the order of ``image_hashes``). An image is
deleted when no set of its product lists it any more (a replacing upload, a DELETE of
the set or of the product). They cost their file size in Redis (or under
``ZSI_DATA_DIR``): 32 golden images of 2 MB each are 64 MB per product, next to about
1.7 MB of WinCLIP+ features per image (docs/service.md).

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
from dataclasses import dataclass
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
    counts it (``reference_index`` / ``references``). A kept golden image whose bytes do not
    match their sha256 is deleted and counted too (``golden_images``): it reads as missing.
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
        self.image_prefix = f"{prefix}refimg:"
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

    def set_index_entry(
        self,
        product_id: str,
        detector: Detector,
        hashes: Sequence[str],
        key: str,
        images: Sequence[str] | None = None,
    ) -> None:
        """Record the set of ``detector``'s model for the product (replacing the previous one).

        ``images``: sha256 of each golden image's kept bytes (:meth:`save_images`), in the
        order of ``hashes``. Kept images no set lists any more are deleted.
        """
        sets = self.index(product_id)
        before = _listed_images(sets)
        entry: dict[str, Any] = {
            "method": detector.method,
            "model_key": detector.model_key,
            "image_hashes": list(hashes),
            "key": key,
            "created_at": time.time(),
        }
        if images is not None:
            if len(images) != len(hashes):
                raise ValueError("one kept image per image hash")
            entry["images"] = list(images)
        sets[detector.model_key] = entry
        self._write_index(product_id, sets)
        self._drop_images(product_id, before - _listed_images(sets))

    def clear(self, product_id: str, method: str | None = None) -> int:
        """Drop the product's reference sets (of one method, or all) and the kept images no
        remaining set lists; returns how many sets."""
        sets = self.index(product_id)
        before = _listed_images(sets)
        dropped = [mk for mk, e in sets.items() if method is None or e.get("method") == method]
        for mk in dropped:
            entry = sets.pop(mk)
            # The blob is content-addressed and may be shared by an identical upload elsewhere,
            # but it belongs to this product id (the id is in the key): safe to delete.
            self.store.delete(str(entry.get("key", "")))
        self._write_index(product_id, sets)
        self._drop_images(product_id, before - _listed_images(sets))
        if method is None:  # images of an index that was corrupt or lost are orphans too
            for k in self.store.keys(f"{self.image_prefix}{product_id}:"):
                self.store.delete(k)
        return len(dropped)

    # ------------------------------------------------------------ kept images
    def image_key(self, product_id: str, sha256: str) -> str:
        return f"{self.image_prefix}{product_id}:{sha256}"

    def save_images(self, product_id: str, blobs: Sequence[bytes]) -> list[str]:
        """Keep the uploaded bytes of golden images; returns their sha256 (64 hex), in order."""
        shas = []
        for blob in blobs:
            sha = hashlib.sha256(blob).hexdigest()
            self.store.set(self.image_key(product_id, sha), bytes(blob), self.ttl_s)
            shas.append(sha)
        return shas

    def _drop_images(self, product_id: str, shas: set[str]) -> None:
        for sha in shas:
            self.store.delete(self.image_key(product_id, sha))

    def kept_images(self, product_id: str, model_key: str | None = None) -> KeptImages:
        """The kept golden images of one set (``model_key``), or of every set of the product
        (``None``; each image once). Images the store no longer holds are counted as missing,
        and so are corrupt ones (bytes not matching their sha256), which are deleted and counted
        (``golden_images``)."""
        sets = self.index(product_id)
        entries = [sets[model_key]] if model_key is not None and model_key in sets else []
        if model_key is None:
            entries = list(sets.values())
        listed: list[str] = []
        unkept = 0
        for entry in entries:
            shas = entry.get("images")
            if not isinstance(shas, list):
                unkept += len(entry.get("image_hashes", []))  # uploaded before images were kept
                continue
            listed.extend(str(s) for s in shas)
        found: list[tuple[str, bytes]] = []
        missing = 0
        for sha in dict.fromkeys(listed):
            key = self.image_key(product_id, sha)
            blob = self.store.get(key)
            if blob is not None and hashlib.sha256(blob).hexdigest() != sha:
                # content-addressed: bytes that do not hash to their key are corrupt (a stored image
                # is the upload, decoded before it was kept). A miss: deleted, counted.
                log.warning("dropping a corrupt kept golden image %s of %s", sha[:12], product_id)
                self._corrupt("golden_images")
                with contextlib.suppress(CacheUnavailable):
                    self.store.delete(key)
                blob = None
            if blob is None:
                missing += 1
            else:
                found.append((sha, blob))
        return KeptImages(images=found, missing=missing + unkept, in_sets=len(entries))

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
            # arrays of the wrong shape would fail inside the model (a 500 for the set's TTL)
            detector.check_references(refs)
        except (SerializationError, ValueError) as exc:  # ReferenceMismatchError is a ValueError
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


def _listed_images(sets: dict[str, dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for entry in sets.values():
        shas = entry.get("images")
        if isinstance(shas, list):
            out.update(str(s) for s in shas)
    return out


@dataclass(frozen=True)
class KeptImages:
    """Kept golden images: ``(sha256, uploaded bytes)`` each once, in upload order.

    ``missing`` counts listed images the store no longer holds (expired, or uploaded
    before images were kept); ``in_sets`` how many reference sets were read.
    """

    images: list[tuple[str, bytes]]
    missing: int
    in_sets: int
