"""Stream mode: MuSc against a rolling bank of each product's recent accepted parts (issue 14).

A product with ``stream: {...}`` (:class:`prompts.StreamConfig`) is answered by ``musc``
scored against the features of the last images the service judged normal: its **bank**.
Until the bank holds ``min_bank`` images the fallback method (WinCLIP zero-shot by default)
answers with ``warming_up: true``; the MuSc backbone still encodes every warming-up image on
the musc worker, concurrently with the fallback's inference, and the entries of the images
the fallback judged normal fill the bank. Defects never enter it.

Storage (:class:`BankBackend`): one key per bank image (a
:meth:`models.base.ReferenceSet.to_bytes` blob, ``bytes_per_image`` + ~400 header bytes; a
Redis value holds at most 512 MiB, a CLIP ViT-L bank of 32 is 342 MiB) plus a small ordered
index (id, image hash, time, bytes), all under the product and a digest of the MuSc model
key (a bank is only valid for the features it was made with)::

    {prefix}stream:{product}:{model16}:index     LIST of JSON metas, oldest first
    {prefix}stream:{product}:{model16}:e:{id}    one image's features
    {prefix}stream:{product}:epoch               bumped by every reset (DELETE)
    {prefix}stream:{product}:recent              the last guard_window decisions ("1" anomalous)
    {prefix}stream:bytes                         HASH bank -> bytes (the ZSI_STREAM_TOTAL_MB check)

An append is ONE optimistic Redis transaction (``WATCH`` index, epoch and the byte totals;
``MULTI``: set the entry, rewrite the index, delete the evicted entries, update the
totals; ``EXEC``, retried on a conflict), so replicas appending at once never lose,
duplicate or leak entries, the bank never exceeds ``min(bank, ZSI_STREAM_MAX_MB / entry)``
images, and an append prepared before a reset is dropped. Without Redis the same layout
lives in files under ``ZSI_DATA_DIR/stream`` behind an ``flock``.

Each replica keeps the decoded entries it has seen (its **local copy**, bounded by
``ZSI_STREAM_TOTAL_MB``) and refreshes it from the index on every request: only entries it
does not hold yet are read. While Redis is down, stream answers are scored against the
local copy and nothing enters the bank (appends are skipped and counted); a reset is
refused with 503. No tensor maths here: :mod:`models.musc` does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool

from models.base import AnomalyResult, ReferenceMismatchError, ReferenceSet, image_hash
from models.serialization import SerializationError
from prompts import ProductRecipe, StreamConfig
from service.cache import CacheUnavailable, StoreUnavailable
from service.errors import ApiError

if TYPE_CHECKING:
    from service.deps import LoadedMethod, Services

log = logging.getLogger("service.stream")
T = TypeVar("T")

STREAM_METHOD = "musc"
#: Bytes a one-image entry blob adds to ``bytes_per_image`` (JSON header: dtypes, shapes,
#: model key, hash); budgets count ``bytes_per_image + ENTRY_OVERHEAD`` per image.
ENTRY_OVERHEAD = 1024
_MIB = 1024 * 1024
_APPEND_RETRIES = 50

Mode = Literal["warming_up", "stream"]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _counter(raw: bytes | str | None) -> int | None:
    """A stored non-negative integer (epoch, byte total); ``0`` when absent, ``None`` when corrupt."""
    if raw is None:
        return 0
    try:
        value = int(_text(raw))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if value >= 0 else None


def model_digest(model_key: str) -> str:
    """16 hex naming the features a bank holds (MuSc model, weights, size, blocks)."""
    return hashlib.sha256(model_key.encode()).hexdigest()[:16]


def bank_key(ids: Sequence[str]) -> str:
    """16 hex naming one bank state (its entry ids, in order): the answer's reference key."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BankMeta:
    """One bank image in the index: entry id, pixel hash, time added (epoch s), blob bytes."""

    id: str
    hash: str
    added_at: float
    nbytes: int

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "hash": self.hash, "t": self.added_at, "bytes": self.nbytes})

    @classmethod
    def from_json(cls, raw: bytes | str) -> BankMeta | None:
        """The meta, or ``None`` for a corrupt index item (it is then dropped at the next append)."""
        try:
            d = json.loads(raw)
            meta = cls(id=str(d["id"]), hash=str(d["hash"]), added_at=float(d["t"]), nbytes=int(d["bytes"]))
        except (ValueError, TypeError, KeyError):
            return None
        ok = meta.id.isalnum() and meta.nbytes >= 0 and math.isfinite(meta.added_at)
        return meta if ok else None


@dataclass(frozen=True)
class AppendOutcome:
    """What an append did: ``added``, ``duplicate`` (that image is in the bank), ``budget``
    (ZSI_STREAM_TOTAL_MB would be exceeded), ``reset`` (the bank was reset meanwhile) or
    ``contended``; ``size`` is the bank size afterwards (``-1``: unknown)."""

    status: Literal["added", "duplicate", "budget", "reset", "contended"]
    size: int = -1
    evicted: int = 0


class BankBackend(ABC):
    """Where banks live (Redis or files). Every method may raise :class:`CacheUnavailable`."""

    name = "bank"

    @abstractmethod
    def read(self, product: str, model: str) -> tuple[int, list[BankMeta]]:
        """``(epoch, metas oldest first)`` of one bank."""

    @abstractmethod
    def blobs(self, product: str, model: str, ids: Sequence[str]) -> list[bytes | None]:
        """The entry blobs of ``ids`` (``None`` where gone)."""

    @abstractmethod
    def append(
        self,
        product: str,
        model: str,
        meta: BankMeta,
        blob: bytes,
        *,
        epoch: int,
        max_images: int,
        max_bytes: int,
        total_bytes: int,
    ) -> AppendOutcome:
        """Add one entry atomically, evicting the oldest beyond ``max_images`` / ``max_bytes``."""

    @abstractmethod
    def drop(self, product: str, model: str, entry_id: str) -> None:
        """Remove one entry (corrupt) from the index and the store."""

    @abstractmethod
    def clear(self, product: str) -> tuple[int, int]:
        """Empty every bank of the product and its guard window; ``(images removed, new epoch)``."""

    @abstractmethod
    def record(self, product: str, anomalous: bool, window: int) -> list[bool]:
        """Push one decision into the product's guard window; the window, newest first."""

    @abstractmethod
    def recent(self, product: str, window: int) -> list[bool]:
        """The guard window, newest first."""

    @abstractmethod
    def total_bytes(self) -> int:
        """Bytes of every stream bank in this store."""

    def close(self) -> None:
        return None


def _plan(
    metas: Sequence[BankMeta], meta: BankMeta, max_images: int, max_bytes: int
) -> tuple[list[BankMeta], list[BankMeta]] | None:
    """``(kept, evicted)`` after appending ``meta``, oldest evicted first; None when it cannot fit."""
    kept = [*metas, meta]
    evicted: list[BankMeta] = []
    while kept and (len(kept) > max_images or sum(m.nbytes for m in kept) > max_bytes):
        evicted.append(kept.pop(0))
    if not kept or kept[-1] is not meta:
        return None
    return kept, evicted


class RedisBankBackend(BankBackend):
    """Banks in Redis (shared by every replica); see the module docstring for the keys."""

    name = "redis"

    def __init__(
        self, url: str, *, prefix: str, timeout_s: float, on_corrupt: Callable[[int], None] | None = None
    ) -> None:
        import redis

        self.url = url
        self.prefix = f"{prefix}stream:"
        # corrupt bookkeeping (an epoch or byte total that is not an integer, an index item that
        # is not a meta) is read as absent, repaired by the next append or reset, and counted here
        self._on_corrupt = on_corrupt
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._watch_error: type[BaseException] = redis.WatchError
        # Entry blobs are MiB: reads get a longer socket timeout than the cache's (per recv).
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=max(timeout_s, 2.0),
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )

    def _k(self, product: str, model: str, what: str) -> str:
        return f"{self.prefix}{product}:{model}:{what}"

    def _epoch_key(self, product: str) -> str:
        return f"{self.prefix}{product}:epoch"

    def _recent_key(self, product: str) -> str:
        return f"{self.prefix}{product}:recent"

    @property
    def _bytes_key(self) -> str:
        return f"{self.prefix}bytes"

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as exc:
            if isinstance(exc, self._watch_error):
                raise
            raise CacheUnavailable(f"redis at {self.url}: {exc}") from exc

    def _corrupt(self, n: int, what: str) -> None:
        if n:
            log.warning("stream bank store: %d corrupt %s read as absent", n, what)
            if self._on_corrupt:
                self._on_corrupt(n)

    def read(self, product: str, model: str) -> tuple[int, list[BankMeta]]:
        def run() -> tuple[int, list[BankMeta]]:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self._epoch_key(product))
            pipe.lrange(self._k(product, model, "index"), 0, -1)
            raw_epoch, items = pipe.execute()
            metas = [m for m in (BankMeta.from_json(x) for x in items) if m is not None]
            epoch = _counter(raw_epoch)
            return (0 if epoch is None else epoch), metas  # counted and repaired by append / clear

        return self._call(run)

    def blobs(self, product: str, model: str, ids: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for s in range(0, len(ids), 4):  # a few entries per round trip bounds the reply size
            keys = [self._k(product, model, f"e:{i}") for i in ids[s : s + 4]]
            got: list[Any] = self._call(partial(self.client.mget, keys))
            out.extend(v if isinstance(v, bytes) else None for v in got)
        return out

    def append(
        self,
        product: str,
        model: str,
        meta: BankMeta,
        blob: bytes,
        *,
        epoch: int,
        max_images: int,
        max_bytes: int,
        total_bytes: int,
    ) -> AppendOutcome:
        index = self._k(product, model, "index")
        epoch_key = self._epoch_key(product)
        bank_field = f"{product}:{model}"

        def attempt() -> AppendOutcome | None:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(index, epoch_key, self._bytes_key)
                    stored_epoch = _counter(pipe.get(epoch_key))
                    if (stored_epoch or 0) != epoch:
                        return AppendOutcome("reset")
                    items = pipe.lrange(index, 0, -1)
                    metas = [m for m in (BankMeta.from_json(x) for x in items) if m is not None]
                    bad_items = len(items) - len(metas)  # dropped by the rewrite below
                    if any(m.hash == meta.hash for m in metas):
                        return AppendOutcome("duplicate", size=len(metas))
                    plan = _plan(metas, meta, max_images, max_bytes)
                    if plan is None:
                        return AppendOutcome("budget", size=len(metas))
                    kept, evicted = plan
                    mine = sum(m.nbytes for m in kept)
                    totals = {f: _counter(v) for f, v in pipe.hgetall(self._bytes_key).items()}
                    bad_totals = [f for f, v in totals.items() if v is None]
                    others = sum(v or 0 for f, v in totals.items() if _text(f) != bank_field)
                    if others + mine > total_bytes:
                        return AppendOutcome("budget", size=len(metas))
                    pipe.multi()
                    if stored_epoch is None:
                        pipe.set(epoch_key, 0)  # read as 0 by every replica meanwhile
                    if bad_totals:
                        pipe.hdel(self._bytes_key, *bad_totals)  # a bank's next append writes it again
                    pipe.set(self._k(product, model, f"e:{meta.id}"), blob)
                    pipe.delete(index)
                    pipe.rpush(index, *[m.to_json() for m in kept])
                    if evicted:
                        pipe.delete(*[self._k(product, model, f"e:{m.id}") for m in evicted])
                    pipe.hset(self._bytes_key, bank_field, mine)
                    pipe.execute()
                    self._corrupt(bad_items + len(bad_totals) + (stored_epoch is None), "bank records")
                    return AppendOutcome("added", size=len(kept), evicted=len(evicted))
                except self._watch_error:
                    return None  # another replica changed the bank first: read it again

        for _ in range(_APPEND_RETRIES):
            outcome = self._call(attempt)
            if outcome is not None:
                return outcome
            time.sleep(0.002)
        return AppendOutcome("contended")

    def drop(self, product: str, model: str, entry_id: str) -> None:
        index = self._k(product, model, "index")

        def run() -> None:
            items = self.client.lrange(index, 0, -1)
            pipe = self.client.pipeline(transaction=True)
            for raw in items:
                m = BankMeta.from_json(raw)
                if m is not None and m.id == entry_id:
                    pipe.lrem(index, 0, _text(raw))
            pipe.delete(self._k(product, model, f"e:{entry_id}"))
            pipe.execute()

        self._call(run)

    def clear(self, product: str) -> tuple[int, int]:
        epoch_key = self._epoch_key(product)
        head = f"{self.prefix}{product}:"

        def attempt() -> tuple[int, int] | None:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    keys = [k.decode() for k in self.client.scan_iter(match=f"{head}*", count=500)]
                    indexes = [k for k in keys if k.endswith(":index")]
                    # an append that lands between the scan and EXEC changes a watched key: scan again
                    pipe.watch(epoch_key, self._bytes_key, *indexes)
                    n = sum(int(pipe.llen(k)) for k in indexes)
                    fields = [f"{product}:{k[len(head) :].split(':')[0]}" for k in indexes]
                    doomed = [k for k in keys if k != epoch_key]
                    corrupt_epoch = _counter(pipe.get(epoch_key)) is None
                    pipe.multi()
                    if corrupt_epoch:
                        # INCR would fail on it; replicas read it as 0: start again past that
                        pipe.set(epoch_key, 1)
                    else:
                        pipe.incr(epoch_key)  # an append prepared before this reset is dropped
                    if doomed:
                        pipe.delete(*doomed)
                    if fields:
                        pipe.hdel(self._bytes_key, *fields)
                    first = pipe.execute()[0]
                    self._corrupt(int(corrupt_epoch), "bank epoch")
                    return n, 1 if corrupt_epoch else int(first)
                except self._watch_error:
                    return None

        for _ in range(_APPEND_RETRIES):
            out = self._call(attempt)
            if out is not None:
                return out
            time.sleep(0.002)
        raise CacheUnavailable(f"redis at {self.url}: the bank of {product} kept changing during the reset")

    def record(self, product: str, anomalous: bool, window: int) -> list[bool]:
        key = self._recent_key(product)

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(key, b"1" if anomalous else b"0")
            pipe.ltrim(key, 0, window - 1)
            pipe.lrange(key, 0, window - 1)
            return [v == b"1" for v in pipe.execute()[2]]

        return self._call(run)

    def recent(self, product: str, window: int) -> list[bool]:
        got = self._call(lambda: self.client.lrange(self._recent_key(product), 0, window - 1))
        return [v == b"1" for v in got]

    def total_bytes(self) -> int:
        got = self._call(lambda: self.client.hvals(self._bytes_key))
        return sum(_counter(v) or 0 for v in got)  # a corrupt total: 0 until its bank's next append

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self.client.close()


class FileBankBackend(BankBackend):
    """Banks in files (no Redis): ``root/{product}/{model16}/index.json`` + ``{id}.bin``.

    Every change holds an exclusive ``flock`` on ``root/.lock`` (processes and threads of
    one host); files are replaced atomically, so readers never see half a write.
    """

    name = "files"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _dir(self, product: str, model: str) -> Path:
        return self.root / product / model

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def _io(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except OSError as exc:
            raise CacheUnavailable(f"stream bank files under {self.root}: {exc}") from exc

    def _metas(self, product: str, model: str) -> list[BankMeta]:
        try:
            doc = json.loads((self._dir(product, model) / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        except ValueError:
            return []
        items = doc if isinstance(doc, list) else []
        return [m for m in (BankMeta.from_json(json.dumps(x)) for x in items) if m is not None]

    def _save_metas(self, product: str, model: str, metas: Sequence[BankMeta]) -> None:
        doc = [json.loads(m.to_json()) for m in metas]
        self._write(self._dir(product, model) / "index.json", json.dumps(doc).encode())

    def _epoch(self, product: str) -> int:
        try:
            return int((self.root / product / "epoch").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def read(self, product: str, model: str) -> tuple[int, list[BankMeta]]:
        return self._io(lambda: (self._epoch(product), self._metas(product, model)))

    def blobs(self, product: str, model: str, ids: Sequence[str]) -> list[bytes | None]:
        def one(i: str) -> bytes | None:
            try:
                return (self._dir(product, model) / f"{i}.bin").read_bytes()
            except FileNotFoundError:
                return None

        return self._io(lambda: [one(i) for i in ids])

    def append(
        self,
        product: str,
        model: str,
        meta: BankMeta,
        blob: bytes,
        *,
        epoch: int,
        max_images: int,
        max_bytes: int,
        total_bytes: int,
    ) -> AppendOutcome:
        def run() -> AppendOutcome:
            with self._locked():
                if self._epoch(product) != epoch:
                    return AppendOutcome("reset")
                metas = self._metas(product, model)
                if any(m.hash == meta.hash for m in metas):
                    return AppendOutcome("duplicate", size=len(metas))
                plan = _plan(metas, meta, max_images, max_bytes)
                if plan is None:
                    return AppendOutcome("budget", size=len(metas))
                kept, evicted = plan
                mine = sum(m.nbytes for m in kept)
                others = self._total_bytes() - sum(m.nbytes for m in metas)
                if others + mine > total_bytes:
                    return AppendOutcome("budget", size=len(metas))
                d = self._dir(product, model)
                self._write(d / f"{meta.id}.bin", blob)
                self._save_metas(product, model, kept)
                for m in evicted:
                    (d / f"{m.id}.bin").unlink(missing_ok=True)
                return AppendOutcome("added", size=len(kept), evicted=len(evicted))

        return self._io(run)

    def drop(self, product: str, model: str, entry_id: str) -> None:
        def run() -> None:
            with self._locked():
                metas = self._metas(product, model)
                self._save_metas(product, model, [m for m in metas if m.id != entry_id])
                (self._dir(product, model) / f"{entry_id}.bin").unlink(missing_ok=True)

        self._io(run)

    def clear(self, product: str) -> tuple[int, int]:
        def run() -> tuple[int, int]:
            with self._locked():
                base = self.root / product
                n = 0
                epoch = self._epoch(product) + 1
                self._write(base / "epoch", str(epoch).encode())
                if base.is_dir():
                    for d in base.iterdir():
                        if d.is_dir():
                            n += len(self._metas(product, d.name))
                            for f in d.iterdir():
                                f.unlink(missing_ok=True)
                            d.rmdir()
                    (base / "recent.json").unlink(missing_ok=True)
                return n, epoch

        return self._io(run)

    def _recent(self, product: str) -> list[bool]:
        try:
            doc = json.loads((self.root / product / "recent.json").read_bytes())
            return [bool(x) for x in doc] if isinstance(doc, list) else []
        except (FileNotFoundError, ValueError):
            return []

    def record(self, product: str, anomalous: bool, window: int) -> list[bool]:
        def run() -> list[bool]:
            with self._locked():
                got = [anomalous, *self._recent(product)][:window]
                self._write(self.root / product / "recent.json", json.dumps(got).encode())
                return got

        return self._io(run)

    def recent(self, product: str, window: int) -> list[bool]:
        return self._io(lambda: self._recent(product)[:window])

    def _total_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(
            sum(m.nbytes for m in self._metas(p.name, d.name))
            for p in self.root.iterdir()
            if p.is_dir()
            for d in p.iterdir()
            if d.is_dir()
        )

    def total_bytes(self) -> int:
        return self._io(self._total_bytes)


# --------------------------------------------------------------------------- the flow


@dataclass
class _LocalBank:
    """This replica's decoded copy of one bank: entries by id, and the last index it read."""

    epoch: int = 0
    metas: list[BankMeta] = field(default_factory=list)
    entries: dict[str, ReferenceSet] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas if m.id in self.entries)


@dataclass
class StreamRun:
    """One stream request's state (a local object of the request, never kept on the service)."""

    recipe: ProductRecipe
    config: StreamConfig
    musc: LoadedMethod
    answering: LoadedMethod
    mode: Mode
    model: str
    epoch: int
    entries: list[ReferenceSet]  # the bank it is scored against, oldest first (capacity newest)
    ids: list[str]
    capacity: int
    store_ok: bool
    threshold: float | None  # the fallback's threshold while warming up (None: the product's)
    warnings: list[str] = field(default_factory=list)
    entry: ReferenceSet | None = None
    appended: str = "not_attempted"
    bank_size: int = 0
    scored_against: int = 0
    guard: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def reference_key(self) -> str | None:
        return bank_key(self.ids) if self.mode == "stream" and self.ids else None

    def info(self) -> dict[str, Any]:
        """The answer's ``stream`` object."""
        return {
            "mode": self.mode,
            "bank_size": self.bank_size,
            "scored_against": self.scored_against,
            "min_bank": self.config.min_bank,
            "capacity": self.capacity,
            "fallback": self.config.fallback if self.mode == "warming_up" else None,
            "appended": self.appended,
            "store_available": self.store_ok,
            "guard": self.guard,
            "warnings": list(self.warnings),
        }


class StreamService:
    """Stream banks of one app instance (``services.inspection.stream``)."""

    def __init__(self, services: Services) -> None:
        from service.app import store_namespace  # local: service.app imports the flow

        self.services = services
        settings = services.settings
        prefix, data_dir = store_namespace(settings)
        self.backend: BankBackend
        if settings.redis_url:
            self.backend = RedisBankBackend(
                settings.redis_url,
                prefix=prefix,
                timeout_s=settings.redis_timeout_s,
                on_corrupt=lambda n: services.metrics.cache_corrupt.labels(kind="stream_bank").inc(n),
            )
        else:
            self.backend = FileBankBackend(Path(data_dir) / "stream")
        self.max_bytes = int(settings.stream_max_mb * _MIB)
        self.total_bytes = int(settings.stream_total_mb * _MIB)
        self._retry_s = settings.redis_retry_s
        self._down_until = 0.0
        self._down = False
        self._local: OrderedDict[str, _LocalBank] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._in_flight = 0
        r = services.metrics.registry
        self.appends = Counter(
            "zsi_stream_bank_appends",
            "Stream bank appends by result (added, duplicate, rejected, skipped_*)",
            ["result"],
            registry=r,
        )
        self.answers = Counter("zsi_stream_answers", "Stream-product answers by mode", ["mode"], registry=r)
        self.counts: dict[str, int] = {}

    def close(self) -> None:
        self.backend.close()

    # ------------------------------------------------------------- the store
    def _usable(self) -> bool:
        return not self._down or time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if not self._down:
            log.warning(
                "stream bank store %s unavailable (%s): scoring against local copies, "
                "no appends; retrying every %.0fs",
                self.backend.name,
                exc,
                self._retry_s,
            )
        self._down = True
        self._down_until = time.monotonic() + self._retry_s

    def _ok(self) -> None:
        if self._down:
            log.warning("stream bank store %s is back", self.backend.name)
        self._down = False

    def _store(self, fn: Callable[[], T]) -> T:
        """Run a backend call; raises :class:`CacheUnavailable` (and marks the store down) on failure."""
        if not self._usable():
            raise CacheUnavailable(f"the stream bank store ({self.backend.name}) is down")
        try:
            out = fn()
        except CacheUnavailable as exc:
            self._failed(exc)
            raise
        self._ok()
        return out

    def _lock_for(self, ns: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(ns, threading.Lock())

    def _count(self, result: str) -> None:
        self.appends.labels(result=result).inc()
        with self._guard:
            self.counts[result] = self.counts.get(result, 0) + 1

    def capacity(self, config: StreamConfig, det: Any) -> int:
        """Most images the product's bank may hold: ``min(bank, ZSI_STREAM_MAX_MB // entry bytes)``."""
        return int(min(config.bank, self.max_bytes // self.entry_bytes(det)))

    @staticmethod
    def entry_bytes(det: Any) -> int:
        return int(det.bytes_per_image) + ENTRY_OVERHEAD

    def load(self, product: str, det: Any) -> tuple[_LocalBank, bool]:
        """This replica's copy of the product's bank, refreshed from the store (worker thread).

        Returns ``(copy, store_ok)``: with the store down, the last copy this replica saw.
        Entries it does not hold yet are read and checked; a corrupt or foreign one is
        dropped from the store and counted.
        """
        model = model_digest(det.model_key)
        ns = f"{product}:{model}"
        with self._lock_for(ns):
            with self._guard:
                local = self._local.get(ns) or _LocalBank()
            try:
                epoch, metas = self._store(lambda: self.backend.read(product, model))
                missing = [m.id for m in metas if m.id not in local.entries]
                blobs = self._store(lambda: self.backend.blobs(product, model, missing)) if missing else []
            except CacheUnavailable:
                return local, False
            entries = {m.id: local.entries[m.id] for m in metas if m.id in local.entries}
            for entry_id, blob in zip(missing, blobs, strict=True):
                if blob is None:
                    continue  # evicted since the index was read
                try:
                    entry = ReferenceSet.from_bytes(blob)
                    if entry.count != 1 or entry.model_key != det.model_key:
                        raise ReferenceMismatchError(f"entry of {entry.count} images from {entry.model_key}")
                    det.check_references(entry)
                except (SerializationError, ValueError, ReferenceMismatchError) as exc:
                    log.warning("dropping a corrupt stream bank entry %s of %s: %s", entry_id, product, exc)
                    self.services.metrics.cache_corrupt.labels(kind="stream_bank").inc()
                    with contextlib.suppress(CacheUnavailable):
                        self._store(partial(self.backend.drop, product, model, entry_id))
                    continue
                entries[entry_id] = entry
            fresh = _LocalBank(epoch=epoch, metas=[m for m in metas if m.id in entries], entries=entries)
            with self._guard:
                self._local[ns] = fresh
                self._local.move_to_end(ns)
                # this replica's decoded copies: the least recently used go beyond ZSI_STREAM_TOTAL_MB
                while sum(b.nbytes for b in self._local.values()) > self.total_bytes and len(self._local) > 1:
                    self._local.popitem(last=False)
            return fresh, True

    def _remember(self, run: StreamRun, meta: BankMeta, entry: ReferenceSet, size: int) -> None:
        """Our own appended entry joins the local copy (the next refresh does not read it back, and an
        outage right after still scores against it); ``size`` is the bank size after the append."""
        det: Any = run.musc.detector
        ns = f"{run.recipe.id}:{model_digest(det.model_key)}"
        with self._lock_for(ns), self._guard:
            local = self._local.get(ns)
            if local is not None and local.epoch == run.epoch:
                local.entries[meta.id] = entry
                if meta.id not in {m.id for m in local.metas}:
                    local.metas = [*local.metas, meta][-size:]

    # -------------------------------------------------------------- requests
    def applies(self, recipe: ProductRecipe | None, method: str) -> bool:
        """A stream answer: a stream product, answered by musc (a request naming another method is not)."""
        return recipe is not None and recipe.stream is not None and method == STREAM_METHOD

    def musc_for(self, recipe: ProductRecipe) -> LoadedMethod:
        """The loaded musc method, or a 503 that says the stream product needs it."""
        try:
            return self.services.loaded_method(STREAM_METHOD)
        except ApiError as exc:
            if exc.code in ("not_ready",):
                raise
            loaded = ",".join(self.services.settings.methods)
            raise ApiError(
                503,
                "stream_unavailable",
                f"product {recipe.id!r} is a stream product answered by musc, which this service does not "
                f"have ({exc.code}: {exc.message}); add musc to ZSI_METHODS (now {loaded}) and its weights",
                product=recipe.id,
                cause=exc.code,
            ) from None

    async def start(self, recipe: ProductRecipe, musc: LoadedMethod) -> StreamRun:
        """Read the bank and decide who answers: musc (``stream``) or the fallback (``warming_up``)."""
        config = recipe.stream
        assert config is not None
        det = musc.detector
        capacity = self.capacity(config, det)
        if capacity < config.min_bank:
            raise ApiError(
                422,
                "stream_budget",
                f"product {recipe.id!r}: min_bank {config.min_bank} images of {self.entry_bytes(det)} bytes "
                f"do not fit the per-product bank budget ZSI_STREAM_MAX_MB="
                f"{self.services.settings.stream_max_mb:g} (room for {capacity}); lower stream.min_bank or "
                "raise ZSI_STREAM_MAX_MB",
                product=recipe.id,
                capacity=capacity,
            )
        local, store_ok = await run_in_threadpool(self.load, recipe.id, det)
        metas = [m for m in local.metas if m.id in local.entries][-capacity:]
        run = StreamRun(
            recipe=recipe,
            config=config,
            musc=musc,
            answering=musc,
            mode="stream",
            model=model_digest(det.model_key),
            epoch=local.epoch,
            entries=[local.entries[m.id] for m in metas],
            ids=[m.id for m in metas],
            capacity=capacity,
            store_ok=store_ok,
            threshold=None,
        )
        if not store_ok:
            run.warnings.append(
                f"the shared bank store ({self.backend.name}) is unavailable: this answer used this "
                f"replica's copy of the bank ({run.size} images) and nothing enters the bank until it is back"
            )
        if run.size < config.min_bank:
            run.mode = "warming_up"
            run.threshold = config.fallback_threshold
            try:
                run.answering = self.services.loaded_method(config.fallback)
            except ApiError as exc:
                raise ApiError(
                    503,
                    "stream_fallback_unavailable",
                    f"product {recipe.id!r} is warming up (bank {run.size}/{config.min_bank}) and its fallback "
                    f"method {config.fallback!r} is not available ({exc.code}: {exc.message})",
                    product=recipe.id,
                    bank_size=run.size,
                    headers=exc.headers,
                ) from None
        return run

    async def _musc_job(
        self, run: StreamRun, fn: Callable[[], T], timeout_s: float
    ) -> tuple[T, float, float]:
        """``fn()`` on the musc worker thread: ``(result, seconds waited, seconds run)``.

        At most ZSI_QUEUE_SIZE stream jobs wait per replica (503 + Retry-After beyond);
        one not answered within ``timeout_s`` is a 504 (if it has not started, it never runs).
        """
        settings = self.services.settings
        if self._in_flight >= settings.queue_size:
            retry = max(1, math.ceil(self._in_flight * 0.5))
            raise ApiError(
                503,
                "queue_full",
                f"the musc stream queue is full ({settings.queue_size} waiting); retry in {retry} s",
                headers={"Retry-After": str(retry)},
                retry_after_s=retry,
            )
        queued = time.perf_counter()
        started: list[float] = []

        def job() -> T:
            started.append(time.perf_counter())
            return fn()

        self._in_flight += 1
        try:
            out = await asyncio.wait_for(run.musc.queue.run_exclusive(job), max(timeout_s, 0.001))
        except asyncio.TimeoutError:
            raise ApiError(
                504, "timeout", f"no answer from the musc model within {timeout_s:g} s", timeout_s=timeout_s
            ) from None
        finally:
            self._in_flight -= 1
        begun = started[0] if started else queued
        return out, begun - queued, time.perf_counter() - begun

    async def score(
        self,
        run: StreamRun,
        image: np.ndarray,
        timeout_s: float,
        submit: Callable[[], Awaitable[tuple[AnomalyResult, dict[str, float]]]],
    ) -> tuple[AnomalyResult, dict[str, float]]:
        """The answer's result (musc against the bank, or the fallback's via ``submit()``), and the
        image's bank entry in ``run.entry`` (one MuSc backbone pass either way)."""
        det: Any = run.musc.detector
        if run.mode == "warming_up":
            # The fallback answers; the musc backbone encodes the image meanwhile (its own worker),
            # so the answer waits for the slower of the two, not their sum.
            encode = asyncio.ensure_future(
                self._musc_job(run, lambda: det.encode_references([image]), timeout_s)
            )
            try:
                result, qinfo = await submit()
            except BaseException:
                encode.cancel()
                with contextlib.suppress(BaseException):
                    await encode
                raise
            try:
                run.entry = (await encode)[0]
            except ApiError as exc:
                run.appended = "skipped_busy" if exc.status in (503, 504) else "failed"
                run.warnings.append(f"the image was not encoded for the bank ({exc.code}): {exc.message}")
            except Exception as exc:  # the answer stands; only the bank misses this image
                log.exception("musc encoding for the %s bank failed", run.recipe.id)
                run.appended = "failed"
                run.warnings.append(f"the image was not encoded for the bank: {type(exc).__name__}")
            return result, qinfo
        own = image_hash(image)
        entries = [e for e in run.entries if e.image_hashes[0] != own]  # never score an image against itself

        def predict() -> Any:
            from models.musc import bank_concat

            return det.predict_stream(image, bank=bank_concat(entries))

        pred, waited, took = await self._musc_job(run, predict, timeout_s)
        run.entry = pred.entry
        run.scored_against = len(entries)
        return pred.result, {"queue_wait": waited, "inference": took, "batch_size": 1.0}

    async def finish(self, run: StreamRun, result: AnomalyResult, decision: str, threshold: float) -> None:
        """After the decision: append the image's entry if it was accepted, update the guard."""
        config = run.config
        run.bank_size = run.size
        accepted = decision == "normal" and float(result.score) < threshold * (1.0 - config.accept_margin)
        if decision != "normal":
            run.appended = "rejected_anomalous"
        elif not accepted:
            run.appended = "rejected_margin"
        elif run.entry is not None:
            entry = run.entry
            blob = entry.to_bytes()
            meta = BankMeta(
                id=uuid.uuid4().hex,
                hash=entry.image_hashes[0],
                added_at=float(entry.arrays["added_at"][0]),
                nbytes=len(blob),
            )
            try:
                outcome = await run_in_threadpool(
                    self._store,
                    lambda: self.backend.append(
                        run.recipe.id,
                        run.model,
                        meta,
                        blob,
                        epoch=run.epoch,
                        max_images=run.capacity,
                        max_bytes=self.max_bytes,
                        total_bytes=self.total_bytes,
                    ),
                )
            except CacheUnavailable:
                run.appended = "skipped_store_unavailable"
                if run.store_ok:
                    run.store_ok = False
                    run.warnings.append(
                        f"the shared bank store ({self.backend.name}) is unavailable: this image did not "
                        "enter the bank"
                    )
            else:
                run.appended = {
                    "added": "added",
                    "duplicate": "duplicate",
                    "budget": "skipped_budget",
                    "reset": "skipped_reset",
                    "contended": "skipped_contended",
                }[outcome.status]
                if outcome.size >= 0:
                    run.bank_size = outcome.size
                if outcome.status == "added":
                    await run_in_threadpool(self._remember, run, meta, entry, outcome.size)
                elif outcome.status == "budget":
                    run.warnings.append(
                        "the stream banks' byte budget (ZSI_STREAM_TOTAL_MB="
                        f"{self.services.settings.stream_total_mb:g}) is full: this image did not enter the bank"
                    )
        self._count(run.appended)
        self.answers.labels(mode=run.mode).inc()
        run.guard = await run_in_threadpool(self._record_guard, run, decision != "normal")
        if run.guard.get("tripped"):
            run.warnings.append(self._guard_warning(run.recipe.id, run.guard))

    def _record_guard(self, run: StreamRun, anomalous: bool) -> dict[str, Any]:
        config = run.config
        if config.guard_window == 0:
            return {"window": 0}
        try:
            recent = self._store(lambda: self.backend.record(run.recipe.id, anomalous, config.guard_window))
        except CacheUnavailable:
            return {"window": config.guard_window, "available": False}
        return self._guard_state(config, recent)

    @staticmethod
    def _guard_state(config: StreamConfig, recent: Sequence[bool]) -> dict[str, Any]:
        n, k = len(recent), int(sum(recent))
        rate = k / n if n else 0.0
        tripped = n >= max(1, config.guard_window // 2) and rate >= config.guard_rate
        return {
            "window": config.guard_window,
            "seen": n,
            "anomalous": k,
            "anomalous_rate": round(rate, 4),
            "limit": config.guard_rate,
            "tripped": tripped,
        }

    @staticmethod
    def _guard_warning(product: str, guard: dict[str, Any]) -> str:
        return (
            f"{guard['anomalous']} of the last {guard['seen']} answers of {product!r} were anomalous "
            f"(>= {guard['limit']:.0%}): a changeover or a drift? Anomalous parts never enter the bank, so "
            f"it will not adapt; if the line changed on purpose, reset it: DELETE /products/{product}/stream"
        )

    def check_plain_musc(
        self, method: str, recipe: ProductRecipe | None, references: ReferenceSet | None
    ) -> None:
        """musc outside stream mode needs a golden set: one image alone has nothing to be scored against."""
        if method == STREAM_METHOD and references is None:
            what = f"product {recipe.id!r}" if recipe is not None else "a request without a product"
            raise ApiError(
                422,
                "musc_needs_references",
                f"musc scores an image against OTHER images of the product: {what} has neither a stream bank "
                "(set 'stream' on the product, docs/musc.md) nor golden images for musc "
                "(POST /products/{id}/references?method=musc)",
            )

    # -------------------------------------------------------- the endpoints
    async def status(self, product_id: str) -> dict[str, Any]:
        """``GET /products/{id}/stream``: the bank as the store holds it (404 unknown product)."""
        services = self.services
        recipe, _ = await run_in_threadpool(services.products.get, product_id)
        musc = self.musc_for(recipe)
        det: Any = musc.detector
        config = recipe.stream
        model = model_digest(det.model_key)
        ns = f"{product_id}:{model}"
        with self._guard:
            local = self._local.get(ns) or _LocalBank()
        try:
            epoch, metas = await run_in_threadpool(self._store, lambda: self.backend.read(product_id, model))
            store_ok = True
        except CacheUnavailable:
            epoch, metas, store_ok = local.epoch, local.metas, False
        warnings: list[str] = []
        total: int | None = None
        guard: dict[str, Any] = {"window": 0}
        if store_ok:
            with contextlib.suppress(CacheUnavailable):
                total = await run_in_threadpool(self._store, self.backend.total_bytes)
            if config is not None and config.guard_window:
                try:
                    recent = await run_in_threadpool(
                        self._store, lambda: self.backend.recent(product_id, config.guard_window)
                    )
                    guard = self._guard_state(config, recent)
                except CacheUnavailable:
                    guard = {"window": config.guard_window, "available": False}
        else:
            warnings.append(
                f"the shared bank store ({self.backend.name}) is unavailable: this is this replica's last copy"
            )
        capacity = self.capacity(config, det) if config is not None else 0
        if guard.get("tripped"):
            warnings.append(self._guard_warning(product_id, guard))
        if config is None and metas:
            warnings.append(
                f"{product_id!r} is not a stream product: this bank is unused (DELETE empties it)"
            )
        if config is not None and capacity < config.min_bank:
            warnings.append(
                f"the per-product budget ZSI_STREAM_MAX_MB holds only {capacity} images: fewer than min_bank"
            )
        times = [m.added_at for m in metas]
        size = len(metas)
        mode = (
            "off"
            if config is None
            else ("stream" if min(size, capacity) >= config.min_bank else "warming_up")
        )
        return {
            "product": product_id,
            "enabled": config is not None,
            "settings": config.model_dump() if config is not None else None,
            "mode": mode,
            "warming_up": mode == "warming_up",
            "size": size,
            "min_bank": config.min_bank if config is not None else None,
            "capacity": capacity,
            "method": STREAM_METHOD,
            "model_key": det.model_key,
            "bank_key": bank_key([m.id for m in metas]) if metas else None,
            "epoch": epoch,
            "bytes": sum(m.nbytes for m in metas),
            "bytes_per_image": int(det.bytes_per_image),
            "budget_bytes": min(self.max_bytes, capacity * self.entry_bytes(det))
            if config
            else self.max_bytes,
            "max_bytes": self.max_bytes,
            "total_bytes": total,
            "total_budget_bytes": self.total_bytes,
            "oldest_added_at": _iso(min(times)) if times else None,
            "newest_added_at": _iso(max(times)) if times else None,
            "entries": [{"hash": m.hash, "added_at": _iso(m.added_at), "bytes": m.nbytes} for m in metas],
            "image_hashes": [m.hash for m in metas],
            "store": self.backend.name,
            "store_available": store_ok,
            "local_copy": sum(1 for m in metas if m.id in local.entries),
            "guard": guard,
            "appends_this_replica": dict(self.counts),
            "warnings": warnings,
        }

    async def reset(self, product_id: str) -> dict[str, Any]:
        """``DELETE /products/{id}/stream``: empty every bank of the product (503 when the store is down)."""
        await run_in_threadpool(self.services.products.get, product_id)
        return await self.forget(product_id)

    async def forget(self, product_id: str) -> dict[str, Any]:
        """Empty the product's banks (also when the product itself was just deleted)."""
        try:
            n, epoch = await run_in_threadpool(self.backend.clear, product_id)
        except CacheUnavailable as exc:
            self._failed(exc)
            raise StoreUnavailable(
                f"the stream bank store ({self.backend.name}) is unavailable, so the bank was NOT emptied; "
                "retry when it is back",
                retry_after_s=max(1, math.ceil(self._retry_s)),
            ) from exc
        self._ok()
        with self._guard:
            for ns in [k for k in self._local if k.startswith(f"{product_id}:")]:
                del self._local[ns]
        log.info("stream bank of %s emptied (%d images removed)", product_id, n)
        return {"product": product_id, "deleted_images": n, "epoch": epoch}


__all__ = [
    "ENTRY_OVERHEAD",
    "STREAM_METHOD",
    "AppendOutcome",
    "BankBackend",
    "BankMeta",
    "FileBankBackend",
    "RedisBankBackend",
    "StreamRun",
    "StreamService",
    "bank_key",
    "model_digest",
]
