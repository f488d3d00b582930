"""Bounded batching inference queue, one per loaded method (issue 7).

Requests for the same method and the same batch key (product recipe and reference
set) are gathered into one batch of at most ``max_batch`` images, waiting at most
``max_wait_s`` for company, run once through ``detector.predict_batch`` on the
method's single worker thread (one model copy per process, never on the event
loop), and answered one by one through asyncio futures.

A product with high-resolution ``tiling`` runs through the tiled wrapper of the
detector (:meth:`InferenceQueue.detector_for`): its batches hold one recipe, hence one
tiling, and all tiles of the batch's images go through the model in batches of
``tiling.batch`` tiles (:mod:`models.tiling`).

Full queue -> :class:`QueueFull` (the service answers 503 + Retry-After).
A request still waiting at its deadline -> :class:`QueueTimeout` (504), whether its own
timer or the worker notices first; a request whose caller is cancelled (client gone)
re-raises ``CancelledError`` and its job is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from models.base import AnomalyResult, Detector, ReferenceSet
from models.tiling import TiledDetector, TilingConfig

if TYPE_CHECKING:
    from prompts import ProductRecipe
    from service.metrics import Metrics

log = logging.getLogger("service.queue")
T = TypeVar("T")


class QueueFull(RuntimeError):
    """No place left in the queue; retry after ``retry_after_s``."""

    def __init__(self, method: str, retry_after_s: int) -> None:
        super().__init__(f"the {method} queue is full; retry in {retry_after_s} s")
        self.method = method
        self.retry_after_s = retry_after_s


class QueueTimeout(TimeoutError):
    """The request was not answered before its deadline."""


class QueueClosed(RuntimeError):
    """The queue was shut down."""


@dataclass
class _Job:
    image: np.ndarray
    key: Hashable
    product: ProductRecipe | None
    references: ReferenceSet | None
    future: asyncio.Future[tuple[AnomalyResult, dict[str, float]]]
    enqueued: float
    deadline: float
    info: dict[str, float] = field(default_factory=dict)
    tiling: TilingConfig | None = None


@dataclass
class QueueStats:
    batches: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    rejected: int = 0
    timed_out: int = 0


class InferenceQueue:
    """Batching queue in front of one detector.

    Create inside a running event loop; call :meth:`start` once and :meth:`close` at shutdown.
    """

    def __init__(
        self,
        detector: Detector,
        *,
        method: str | None = None,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_size: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self.detector = detector
        self.method = method or detector.method
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_size = max_size
        self.metrics = metrics
        self.stats = QueueStats()
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # One worker thread per model: batches and reference encodings run one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{self.method}")
        self._batch_seconds = 0.05  # running estimate for Retry-After
        self._stats_lock = threading.Lock()
        self._tiled: dict[TilingConfig, Detector] = {}  # one wrapper per tiling (keeps its counters)
        self._tiled_lock = threading.Lock()

    MAX_TILINGS = 256  # distinct tilings remembered (the wrappers are small; the model is shared)

    def detector_for(self, tiling: TilingConfig | None) -> Detector:
        """The detector, or its tiled wrapper for ``tiling`` (same model, same worker thread)."""
        if tiling is None:
            return self.detector
        with self._tiled_lock:
            det = self._tiled.get(tiling)
            if det is None:
                if len(self._tiled) >= self.MAX_TILINGS:
                    self._tiled.pop(next(iter(self._tiled)))
                det = self._tiled[tiling] = TiledDetector(self.detector, tiling)
            return det

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-{self.method}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(QueueClosed("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after_s(self) -> int:
        batches_ahead = math.ceil((len(self._pending) + 1) / self.max_batch)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    # ------------------------------------------------------------------- submit
    async def submit(
        self,
        image: np.ndarray,
        *,
        key: Hashable,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
        timeout_s: float = 30.0,
        tiling: TilingConfig | None = None,
    ) -> tuple[AnomalyResult, dict[str, float]]:
        """Queue one image; returns its result and ``{"queue_wait": s, "inference": s, "batch_size": n}``.

        ``tiling``: run it through :meth:`detector_for` (``references`` must then be a set
        encoded tiled the same way); requests of one ``key`` must share it.

        Raises:
            QueueFull: ``max_size`` requests are already waiting.
            QueueTimeout: not answered within ``timeout_s``.
        """
        if self._closed or self._task is None or self._wakeup is None:
            raise QueueClosed("the inference queue is not running")
        if len(self._pending) >= self.max_size:
            self.stats.rejected += 1
            if self.metrics:
                self.metrics.rejected.labels(method=self.method, reason="queue_full").inc()
            raise QueueFull(self.method, self.retry_after_s())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(
            image=image,
            key=key,
            product=product,
            references=references,
            future=loop.create_future(),
            enqueued=now,
            deadline=now + timeout_s,
            tiling=tiling,
        )
        self._pending.append(job)
        self._set_depth()
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except (asyncio.TimeoutError, QueueTimeout):
            # Our own timer fired, or the worker found the job past its deadline first
            # (it then sets QueueTimeout on the future; it never cancels a job).
            job.future.cancel()  # the worker skips it (or drops its result)
            self._count_timeout()
            raise QueueTimeout(f"no answer from the {self.method} model within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            # The caller was cancelled (client gone, shutdown): the shield kept the job's
            # future alive, so cancel it (the worker skips it) and let the cancellation go on.
            job.future.cancel()
            raise

    def _count_timeout(self) -> None:
        self.stats.timed_out += 1
        if self.metrics:
            self.metrics.rejected.labels(method=self.method, reason="timeout").inc()

    async def run_exclusive(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run other model work (reference encoding) on the model's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------- worker
    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(method=self.method).set(len(self._pending))

    def _take_batch(self, key: Hashable) -> list[_Job]:
        batch: list[_Job] = []
        keep: deque[_Job] = deque()
        now = time.monotonic()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():  # timed out or cancelled while waiting
                continue
            if now >= job.deadline:
                # An exception, not cancel(): a cancelled future would reach the waiting
                # request as CancelledError (a plain-text 500), not as a 504.
                job.future.set_exception(QueueTimeout("deadline passed while waiting"))
                continue
            if job.key == key and len(batch) < self.max_batch:
                batch.append(job)
            else:
                keep.append(job)
        self._pending = keep
        self._set_depth()
        return batch

    def _count_same(self, key: Hashable) -> int:
        return sum(1 for j in self._pending if j.key == key and not j.future.done())

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            # Wait (briefly) for company with the same key, unless the batch is already full.
            wait_until = first.enqueued + self.max_wait_s
            while self._count_same(first.key) < self.max_batch and time.monotonic() < wait_until:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_until - time.monotonic())
            batch = self._take_batch(first.key)
            if not batch:
                continue
            started = time.monotonic()
            head = batch[0]
            try:
                results = await loop.run_in_executor(
                    self._executor,
                    functools.partial(
                        self.detector_for(head.tiling).predict_batch,
                        [j.image for j in batch],
                        product=head.product,
                        references=head.references,
                    ),
                )
            except Exception as exc:
                log.exception("batch of %d failed on %s", len(batch), self.method)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.images += len(batch)
                self.stats.batch_sizes.append(len(batch))
            if self.metrics:
                self.metrics.batches.labels(method=self.method).inc()
                self.metrics.batch_size.labels(method=self.method).observe(len(batch))
            for job, res in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(
                        (
                            res,
                            {
                                "queue_wait": started - job.enqueued,
                                "inference": elapsed,
                                "batch_size": float(len(batch)),
                            },
                        )
                    )


def batch_key(
    product: ProductRecipe | None, references: ReferenceSet | None, ref_key: str | None
) -> Hashable:
    """Requests batch together only with the same recipe and the same reference set."""
    recipe = product.model_dump_json() if product is not None else None
    return (recipe, ref_key if references is not None else None)


__all__ = ["InferenceQueue", "QueueClosed", "QueueFull", "QueueStats", "QueueTimeout", "batch_key"]
