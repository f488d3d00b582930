"""Byte caches and stores: Redis, in-process LRU, files, null; plus the detector ArrayCache adapter.

Values are raw bytes. Arrays travel as :mod:`models.serialization` blobs (a dtype/shape
header and raw data), never pickle. Keys are computed by the server from content
(model key, weights tag, prompt digest, image hashes).

A :class:`ResilientCache` puts Redis in front of a local fallback: when Redis fails it
logs once, answers from the local cache, and tries Redis again after a retry interval.
It never raises because of the backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.serialization import SerializationError, pack_array, unpack_array

log = logging.getLogger("service.cache")


class CacheUnavailable(RuntimeError):
    """The backend (Redis) did not answer."""


class StoreUnavailable(CacheUnavailable):
    """A write to the shared store could not be made durable: refuse it (503), never fake it."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BlobCache(ABC):
    """get/set bytes with an optional TTL, delete, list keys by prefix."""

    name: str = "cache"

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store ``value``; ``ttl_s`` None or 0 = no expiry."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str) -> list[str]: ...

    def healthy(self) -> bool:
        return True

    def check_writable(self) -> None:
        """Raise :class:`StoreUnavailable` when a write would be refused right now."""
        return None

    def close(self) -> None:
        return None


class NullCache(BlobCache):
    """Keeps nothing (for benchmarks of the uncached path)."""

    name = "null"

    def get(self, key: str) -> bytes | None:
        return None

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        return None

    def delete(self, key: str) -> None:
        return None

    def keys(self, prefix: str) -> list[str]:
        return []


class LocalCache(BlobCache):
    """Thread-safe in-process LRU bounded by total bytes, with per-key TTL."""

    name = "local"

    def __init__(
        self, max_bytes: int = 256 * 1024 * 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            value, expires = item
            if expires is not None and self._clock() >= expires:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        value = bytes(value)
        if len(value) > self.max_bytes:
            return
        expires = self._clock() + ttl_s if ttl_s else None
        with self._lock:
            self._drop(key)
            self._items[key] = (value, expires)
            self._size += len(value)
            while self._size > self.max_bytes and self._items:
                self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._size -= len(item[0])

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def keys(self, prefix: str) -> list[str]:
        now = self._clock()
        with self._lock:
            return [
                k
                for k, (_, exp) in self._items.items()
                if k.startswith(prefix) and (exp is None or exp > now)
            ]


class FileStore(BlobCache):
    """Durable store in a directory (one file per key); used for products and references without Redis.

    TTLs are ignored: what is stored here is data the user created.
    """

    name = "files"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    @staticmethod
    def _name(key: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:80]
        return f"{safe}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def _path(self, key: str) -> Path:
        return self.root / self._name(key)

    def get(self, key: str) -> bytes | None:
        try:
            blob = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        klen = int.from_bytes(blob[:4], "little")
        return blob[4 + klen :]

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        k = key.encode()
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_bytes(len(k).to_bytes(4, "little") + k + bytes(value))
        tmp.replace(path)  # atomic: readers see the old or the new value

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if ".tmp" in p.suffix:
                continue
            try:
                with p.open("rb") as f:
                    klen = int.from_bytes(f.read(4), "little")
                    key = f.read(klen).decode()
            except (OSError, UnicodeDecodeError):
                continue
            if key.startswith(prefix):
                out.append(key)
        return sorted(out)


class RedisCache(BlobCache):
    """Redis (redis-py) with short socket timeouts; raises :class:`CacheUnavailable` on any failure."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        import redis  # local import: only needed when configured

        self.url = url
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # No connection is made here: redis-py connects on the first command.
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )

    def _call(self, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except self._errors as exc:
            raise CacheUnavailable(f"redis at {self.url}: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        value = self._call(lambda: self.client.get(key))
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        if ttl_s:
            self._call(lambda: self.client.set(key, value, px=max(1, int(ttl_s * 1000))))
        else:
            self._call(lambda: self.client.set(key, value))

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete(key))

    def keys(self, prefix: str) -> list[str]:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        found = self._call(lambda: list(self.client.scan_iter(match=pattern, count=500)))
        assert isinstance(found, list)
        return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in found)

    def healthy(self) -> bool:
        try:
            return bool(self.client.ping())
        except self._errors:
            return False

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self.client.close()


class ResilientCache(BlobCache):
    """``primary`` (Redis) with a local ``fallback``; never raises because of the primary.

    Writes go to both (the fallback keeps a copy for outages). Reads come from the
    primary while it is up, and what they return is kept in the fallback too, so a
    value this process has read is still served during an outage (a key the primary
    no longer holds is dropped from the fallback). While the primary is down (after a
    failure, for ``retry_s``) reads come from the fallback. The first failure is logged
    once; recovery is logged too.

    That is right for a cache. For data users create, :meth:`durable` gives the view
    whose writes must reach the primary or raise :class:`StoreUnavailable`.
    """

    def __init__(
        self,
        primary: BlobCache,
        fallback: BlobCache,
        *,
        retry_s: float = 5.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.retry_s = retry_s
        self.name = f"{primary.name}+{fallback.name}"
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()
        self._on_state = on_state

    @property
    def primary_up(self) -> bool:
        return not self._down

    def _usable(self) -> bool:
        return not self._down or time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            first = not self._down
            self._down = True
            self._down_until = time.monotonic() + self.retry_s
        if first:
            log.warning(
                "cache backend %s unavailable (%s); using the in-process cache, retrying every %.0fs",
                self.primary.name,
                exc,
                self.retry_s,
            )
            if self._on_state:
                self._on_state(False)

    def _ok(self) -> None:
        if self._down:
            with self._lock:
                was_down, self._down = self._down, False
            if was_down:
                log.warning("cache backend %s is back", self.primary.name)
                if self._on_state:
                    self._on_state(True)

    def get(self, key: str) -> bytes | None:
        if self._usable():
            try:
                value = self.primary.get(key)
            except CacheUnavailable as exc:
                self._failed(exc)
            else:
                self._ok()
                # Keep what was read for an outage (no TTL known here: the LRU bounds it).
                if value is None:
                    self.fallback.delete(key)
                else:
                    self.fallback.set(key, value)
                return value
        return self.fallback.get(key)

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.fallback.set(key, value, ttl_s)
        if self._usable():
            try:
                self.primary.set(key, value, ttl_s)
            except CacheUnavailable as exc:
                self._failed(exc)
            else:
                self._ok()

    def delete(self, key: str) -> None:
        self.fallback.delete(key)
        if self._usable():
            try:
                self.primary.delete(key)
            except CacheUnavailable as exc:
                self._failed(exc)
            else:
                self._ok()

    def keys(self, prefix: str) -> list[str]:
        if self._usable():
            try:
                found = self.primary.keys(prefix)
            except CacheUnavailable as exc:
                self._failed(exc)
            else:
                self._ok()
                return found
        return self.fallback.keys(prefix)

    def healthy(self) -> bool:
        return self.primary_up

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()

    # ------------------------------------------------------------ durable writes
    def _refused(self, exc: CacheUnavailable) -> StoreUnavailable:
        self._failed(exc)
        return StoreUnavailable(
            f"the shared store ({self.primary.name}) is unavailable, so the change was NOT saved; "
            "retry when it is back",
            retry_after_s=max(1, math.ceil(self.retry_s)),
        )

    def set_durable(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Write to the primary (always tried, even while marked down) or raise :class:`StoreUnavailable`."""
        try:
            self.primary.set(key, value, ttl_s)
        except CacheUnavailable as exc:
            raise self._refused(exc) from exc
        self._ok()
        self.fallback.set(key, value, ttl_s)

    def delete_durable(self, key: str) -> None:
        """Delete in the primary or raise :class:`StoreUnavailable` (a lost delete would resurrect data)."""
        try:
            self.primary.delete(key)
        except CacheUnavailable as exc:
            raise self._refused(exc) from exc
        self._ok()
        self.fallback.delete(key)

    def check_writable(self) -> None:
        if self._usable():
            return
        if self.primary.healthy():
            self._ok()
            return
        raise self._refused(CacheUnavailable(f"{self.primary.name} does not answer"))

    def durable(self) -> DurableStore:
        return DurableStore(self)


class DurableStore(BlobCache):
    """The store view of a :class:`ResilientCache` for data users create (products, golden features).

    Reads are the cache's (primary, else the kept local copy). Writes and deletes must
    reach the primary, else they raise :class:`StoreUnavailable` and nothing changes:
    an accepted write is never silently dropped when the primary comes back.
    """

    def __init__(self, shared: ResilientCache) -> None:
        self.shared = shared
        self.name = shared.name

    def get(self, key: str) -> bytes | None:
        return self.shared.get(key)

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.shared.set_durable(key, value, ttl_s)

    def delete(self, key: str) -> None:
        self.shared.delete_durable(key)

    def keys(self, prefix: str) -> list[str]:
        return self.shared.keys(prefix)

    def healthy(self) -> bool:
        return self.shared.healthy()

    def check_writable(self) -> None:
        self.shared.check_writable()

    def close(self) -> None:
        return None  # the shared cache is closed by its owner


class ArrayCacheAdapter:
    """:class:`models.base.ArrayCache` on a :class:`BlobCache` (what detectors get as ``cache=``).

    Arrays are packed with :func:`models.serialization.pack_array`. Keys (computed by the
    detector from model, weights and prompt digest) are namespaced with ``prefix``.
    Decoded arrays are also kept in a small local LRU: the keys are content hashes, so
    a value never changes meaning. A blob that does not decode is a miss: it is deleted
    and counted (``on_corrupt``), and the detector recomputes the value. So is one the
    detector rejects (another shape: ``models.base.usable_cached``): it is counted when the
    recomputed value is stored over it.
    """

    def __init__(
        self,
        cache: BlobCache,
        *,
        prefix: str = "zsi:arr:",
        ttl_s: float | None = None,
        on_lookup: Callable[[bool], None] | None = None,
        on_corrupt: Callable[[], None] | None = None,
        local_items: int = 64,
    ) -> None:
        self.cache = cache
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._on_lookup = on_lookup
        self._on_corrupt = on_corrupt
        self._local: OrderedDict[str, np.ndarray] = OrderedDict()
        self._local_items = local_items
        self._lock = threading.Lock()

    def _remember(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._local[key] = value
            self._local.move_to_end(key)
            while len(self._local) > self._local_items:
                self._local.popitem(last=False)

    def get_array(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._local.get(key)
        if value is None:
            blob = self.cache.get(self.prefix + key)
            if blob is not None:
                try:
                    value = unpack_array(blob)
                except SerializationError as exc:
                    # A miss: the caller recomputes and stores a good value over it.
                    log.warning("dropping a corrupt cache entry %s: %s", key, exc)
                    if self._on_corrupt:
                        self._on_corrupt()
                    with contextlib.suppress(CacheUnavailable):
                        self.cache.delete(self.prefix + key)
                    value = None
                if value is not None:
                    value.setflags(write=False)
                    self._remember(key, value)
        if self._on_lookup:
            self._on_lookup(value is not None)
        return value

    def set_array(self, key: str, value: np.ndarray) -> None:
        arr = np.array(value, copy=True)
        arr.setflags(write=False)
        with self._lock:
            old = self._local.get(key)
        if old is not None and (
            old.shape != arr.shape
            or old.dtype != arr.dtype
            or (old.dtype.kind == "f" and not bool(np.isfinite(old).all()))
        ):
            # A content-addressed value the detector read and rejected (wrong shape, dtype or
            # not finite: models.base.usable_cached) and recomputed: it was corrupt.
            log.warning("replacing a corrupt cache entry %s (%s %s)", key, old.dtype, old.shape)
            if self._on_corrupt:
                self._on_corrupt()
        self._remember(key, arr)
        self.cache.set(self.prefix + key, pack_array(arr), self.ttl_s)
