"""Prompt (text) encoding off the model's batch worker.

A product's first inspection encodes its prompt set into text prototypes (WinCLIP:
every state in every template). Done inside ``predict_batch`` on the model's single
worker thread, a product with many prompt states would hold every other product's
batches behind it. So the inspection flow asks :class:`TextWork` to compute them
first, on a separate bounded executor (one thread per method), before queueing the
image; the batch then finds them in the detector's cache. Other products' batches
run meanwhile.

Concurrent first requests of one prompt set share one computation; a prompt set
known to be ready costs a dictionary lookup on the event loop, no thread hop (it is
checked again on the text thread, a cache hit, after ``recheck_s``, in case the cache
entry expired meanwhile).
The work itself is bounded by the product schema (counts and lengths of prompt
fields, :mod:`prompts`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from models.base import Detector

if TYPE_CHECKING:
    from prompts import ProductRecipe

log = logging.getLogger("service.text_work")


def text_task(detector: Detector, recipe: ProductRecipe | None) -> tuple[Hashable, Callable[[], Any]] | None:
    """(key, work) that fills the detector's text cache for ``recipe``; None when it has none.

    WinCLIP: ``text_prototypes(product=recipe)``, one per prompt set. AnomalyCLIP:
    ``text_embeddings()``, one for all products (object-agnostic prompts).
    """
    prototypes = getattr(detector, "text_prototypes", None)
    if callable(prototypes):
        recipe_key = recipe.model_dump_json() if recipe is not None else None
        return ("prototypes", recipe_key), functools.partial(prototypes, product=recipe)
    embeddings = getattr(detector, "text_embeddings", None)
    if callable(embeddings):
        return ("embeddings",), embeddings
    return None


class TextTimeout(TimeoutError):
    """The prompt set was not encoded before the request's deadline (the work goes on)."""


class TextWork:
    """One bounded text-encoding thread per method, shared by all requests of the app."""

    def __init__(self, *, max_ready: int = 4096, recheck_s: float = 600.0) -> None:
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._inflight: dict[tuple[str, Hashable], asyncio.Future[Any]] = {}
        self._ready: OrderedDict[tuple[str, Hashable], float] = OrderedDict()  # key -> when
        self._max_ready = max_ready
        self._recheck_s = recheck_s

    def _executor(self, method: str) -> ThreadPoolExecutor:
        ex = self._executors.get(method)
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"text-{method}")
            self._executors[method] = ex
        return ex

    async def prepare(
        self, method: str, detector: Detector, recipe: ProductRecipe | None, *, timeout_s: float
    ) -> float:
        """Make sure ``recipe``'s text prototypes are computed; returns the seconds waited.

        Raises:
            TextTimeout: not done within ``timeout_s`` (the computation continues and is
                cached, so a retry finds it ready).
        """
        task = text_task(detector, recipe)
        if task is None:
            return 0.0
        key = (method, task[0])
        loop = asyncio.get_running_loop()
        started = loop.time()
        ready_at = self._ready.get(key)
        if ready_at is not None and started - ready_at < self._recheck_s:
            self._ready.move_to_end(key)
            return 0.0
        future = self._inflight.get(key)
        if future is None:
            future = loop.run_in_executor(self._executor(method), task[1])
            self._inflight[key] = future
            future.add_done_callback(functools.partial(self._done, key))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            raise TextTimeout(
                f"the prompts of this product are still being encoded (more than {timeout_s:g} s); "
                "retry shortly: the result is kept"
            ) from None
        return loop.time() - started

    def _done(self, key: tuple[str, Hashable], future: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return  # the next request tries again; the exception reached the waiting requests
        self._ready[key] = asyncio.get_running_loop().time()
        self._ready.move_to_end(key)
        while len(self._ready) > self._max_ready:
            self._ready.popitem(last=False)

    def close(self) -> None:
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()


__all__ = ["TextTimeout", "TextWork", "text_task"]
