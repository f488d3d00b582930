"""Kept images and anomaly maps of inspection records, under a retention limit.

Files live under ``ZSI_DATA_DIR/records/images/<YYYY-MM-DD>/``: ``<id>.<ext>`` holds the
uploaded bytes exactly as received (so their sha256 is the record's ``image_sha256``) and
``<id>.map.png`` the anomaly map as a 16-bit grey PNG (value = round(65535 * map), so
the map is kept to 1/65535). Record ids are time ordered (UUIDv7), so sorting the paths
sorts by age. Retention: files older than ``max_age_s`` and, beyond ``max_bytes`` in
total, the oldest files are removed (an image and its map together).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("service.records")

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff"}


def map_to_png16(anomaly_map: np.ndarray) -> bytes:
    """``float32 (H, W)`` map in [0, 1] -> 16-bit grey PNG bytes (value = round(65535 * v))."""
    q = np.rint(np.clip(np.nan_to_num(anomaly_map, nan=0.0), 0.0, 1.0) * 65535.0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def png16_to_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`map_to_png16`: ``float32 (H, W)`` in [0, 1]."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return (arr.astype(np.float32) / np.float32(65535.0)).astype(np.float32)


class ImageStore:
    """Writes kept files and enforces the retention limits (thread-safe)."""

    def __init__(self, root: Path, *, max_age_s: float, max_bytes: int) -> None:
        self.root = root
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # "<day>/<id>" -> (relative paths, bytes), oldest first: an image goes with its map
        self._files: OrderedDict[str, tuple[list[str], int]] = OrderedDict()
        self._total = 0
        self.removed = 0
        self._scanned = False

    @property
    def total_bytes(self) -> int:
        return self._total

    def scan(self) -> None:
        """Learn what is already on disk (once, from the writer thread)."""
        found: dict[str, tuple[list[str], int]] = {}
        if self.root.is_dir():
            for day in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for f in sorted(day.iterdir()):
                    if f.is_file() and not f.name.endswith(".tmp"):
                        key = f"{day.name}/{f.name.split('.')[0]}"
                        rels, size = found.get(key, ([], 0))
                        found[key] = ([*rels, f"{day.name}/{f.name}"], size + f.stat().st_size)
        with self._lock:
            for key, (rels, size) in found.items():
                if key not in self._files:
                    self._files[key] = (rels, size)
                    self._total += size
            # files written before the scan finished must stay in age order
            self._files = OrderedDict(sorted(self._files.items()))
            self._scanned = True

    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"{rel!r} is outside the image root")
        return p

    def save(
        self, record_id: str, created: datetime, image: bytes, fmt: str, amap: np.ndarray
    ) -> tuple[str, str]:
        """Write the image bytes and the 16-bit map; returns their relative paths."""
        day = created.astimezone(timezone.utc).strftime("%Y-%m-%d")
        ext = EXTENSIONS.get(fmt.upper(), "bin")
        rel_image, rel_map = f"{day}/{record_id}.{ext}", f"{day}/{record_id}.map.png"
        (self.root / day).mkdir(parents=True, exist_ok=True)
        png16 = map_to_png16(amap)
        for rel, data in ((rel_image, image), (rel_map, png16)):
            target = self.root / rel
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        with self._lock:
            old = self._files.pop(f"{day}/{record_id}", None)
            if old is not None:
                self._total -= old[1]
            self._files[f"{day}/{record_id}"] = ([rel_image, rel_map], len(image) + len(png16))
            self._total += len(image) + len(png16)
        return rel_image, rel_map

    def discard(self, rels: list[str]) -> None:
        """Remove files just saved for a record that was not kept after all (dropped)."""
        keys = {f"{rel.split('/')[0]}/{rel.split('/')[1].split('.')[0]}" for rel in rels}
        with self._lock:
            for key in keys:
                item = self._files.pop(key, None)
                if item is not None:
                    self._total -= item[1]
        for rel in rels:
            with contextlib.suppress(OSError):
                (self.root / rel).unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> int:
        """Remove files past the age limit, then the oldest beyond the byte limit; returns how many."""
        now = time.time() if now is None else now
        victims: list[str] = []
        with self._lock:
            for key, (rels, size) in list(self._files.items()):
                over_bytes = self.max_bytes and self._total > self.max_bytes
                too_old = self.max_age_s and self._age_s(rels[0], now) > self.max_age_s
                if not (over_bytes or too_old):
                    break
                victims.extend(rels)
                del self._files[key]
                self._total -= size
        for rel in victims:
            try:
                (self.root / rel).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove kept file %s: %s", rel, exc)
        for day in {rel.split("/")[0] for rel in victims}:
            with contextlib.suppress(OSError):
                (self.root / day).rmdir()  # only when empty
        self.removed += len(victims)
        return len(victims)

    def _age_s(self, rel: str, now: float) -> float:
        try:
            return now - (self.root / rel).stat().st_mtime
        except OSError:
            return float("inf")  # already gone: drop it from the books

    def needs_sweep(self) -> bool:
        return bool(self.max_bytes) and self._total > self.max_bytes


__all__ = ["MEDIA_TYPES", "ImageStore", "map_to_png16", "png16_to_map"]
