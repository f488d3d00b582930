"""The inspection flow: everything between the ``/inspect`` router and the inference queue.

The router parses the HTTP request (query, upload) and turns an :class:`Inspection`
into an HTTP answer; this module does the rest, in order:

1. resolve the product recipe and the method (404 / 422 / 503 as :class:`ApiError`);
2. decide the threshold (the product's, else the generic one);
3. decode the image off the event loop;
4. look up the product's reference set (golden images) for the method;
5. encode the product's prompts if not done yet, on a text thread, NOT on the model's
   batch worker (:mod:`service.text_work`), so one product's prompts never stall others;
6. queue the image for the method's batching worker (503 full, 504 deadline);
7. decide and render (JSON body or PNG overlay), and observe stage metrics.

Records, result caching, calibration and stream banks join the request path here,
never in the router. No tensor maths: detectors and :mod:`models.postprocess` do that.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from models.base import AnomalyResult, ReferenceSet, image_hash
from models.postprocess import anomaly_map_png, boxes_above, overlay_png
from prompts import ProductRecipe
from service.deps import LoadedMethod, Services
from service.errors import ApiError
from service.imaging import decode_image
from service.queue import QueueClosed, QueueFull, QueueTimeout, batch_key
from service.schemas import DEMO_WARNING
from service.text_work import TextTimeout, TextWork

GENERIC_THRESHOLD = 0.5
DEMO_LABEL = "DEMO: random-init model, not a real result"
Output = Literal["json", "png"]
T = TypeVar("T")


@dataclass(frozen=True)
class InspectParams:
    """What the client asked for (query parameters of ``POST /inspect``)."""

    product: str | None = None
    method: str | None = None
    output: Output = "json"


@dataclass
class Inspection:
    """One answered inspection: the model result, the decision and the rendered answer.

    ``body`` is the JSON answer (``output=json``) or ``None``; ``png`` the overlay
    (``output=png``) or ``None``; ``headers`` go on the HTTP answer either way.
    """

    params: InspectParams
    recipe: ProductRecipe | None
    method: str
    result: AnomalyResult
    decision: Literal["anomalous", "normal"]
    threshold: float
    references: ReferenceSet | None
    timings: dict[str, float]
    demo: bool
    body: dict[str, Any] | None = None
    png: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Clock:
    """Named stage durations, measured from one start."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


class InspectionFlow:
    """Runs inspections for one app instance (``services.inspection``)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.text_work = TextWork()  # prompt encoding, off the models' batch workers

    def close(self) -> None:
        self.text_work.close()

    # ------------------------------------------------------------ resolution
    async def resolve(self, params: InspectParams) -> tuple[ProductRecipe | None, LoadedMethod]:
        """The product recipe (or None) and the loaded method; raises the 4xx/503 that explains why not."""
        recipe: ProductRecipe | None = None
        if params.product is not None:
            recipe, _ = await run_in_threadpool(self.services.products.get, params.product)
        method_name = params.method or (recipe.default_method if recipe is not None else "winclip")
        return recipe, self.services.loaded_method(method_name)

    @staticmethod
    def threshold_for(recipe: ProductRecipe | None) -> float:
        return recipe.threshold if recipe is not None else GENERIC_THRESHOLD

    # ------------------------------------------------------------------ run
    async def run(
        self,
        params: InspectParams,
        read_body: Callable[[], Any],
    ) -> Inspection:
        """Inspect the image that ``await read_body()`` returns (bytes), as ``params`` ask.

        The body is read only after the product and method are known to be usable, so a
        request for an unknown product is refused without reading its upload.
        """
        services = self.services
        settings = services.settings
        clock = _Clock()
        recipe, loaded = await self.resolve(params)
        det = loaded.detector
        threshold = self.threshold_for(recipe)
        clock.lap("resolve")

        data: bytes = await read_body()
        clock.lap("read")
        image = await run_in_threadpool(
            decode_image, data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
        )
        del data
        clock.lap("decode")

        references, ref_key = None, None
        if recipe is not None and det.supports_references:
            references, ref_key = await run_in_threadpool(services.references.lookup, recipe.id, det)
            services.metrics.cache_lookup("references", references is not None)
        clock.lap("references")

        timeout_s = settings.request_timeout_s - await self._prepare_text(loaded, recipe)
        clock.lap("prompts")
        result, qinfo = await self._submit(loaded, image, recipe, references, ref_key, timeout_s)
        clock.stages["queue_wait"] = qinfo["queue_wait"]
        clock.stages["inference"] = qinfo["inference"]
        clock.last = time.perf_counter()

        decision: Literal["anomalous", "normal"] = "anomalous" if result.score >= threshold else "normal"
        demo = det.random_weights or services.demo
        inspection = Inspection(
            params=params,
            recipe=recipe,
            method=loaded.method,
            result=result,
            decision=decision,
            threshold=threshold,
            references=references,
            timings=clock.stages,
            demo=demo,
        )
        if params.output == "png":
            label = DEMO_LABEL if det.random_weights else None
            inspection.png = await run_in_threadpool(
                overlay_png, image, result.anomaly_map, result.score, threshold=threshold, label=label
            )
            clock.lap("render")
        else:
            rendered = await run_in_threadpool(self._render_json, result, image, threshold)
            clock.lap("render")
            inspection.body = self._body(inspection, rendered, qinfo)
        clock.stages["total"] = clock.total()
        if inspection.body is not None:
            inspection.body["timings_ms"] = self._timings_ms(inspection)
        inspection.headers = self._headers(inspection)
        self._observe(inspection)
        return inspection

    async def _prepare_text(self, loaded: LoadedMethod, recipe: ProductRecipe | None) -> float:
        """Encode the product's prompts off the model's worker (seconds spent; 504 past the deadline)."""
        timeout_s = self.services.settings.request_timeout_s
        try:
            return await self.text_work.prepare(loaded.method, loaded.detector, recipe, timeout_s=timeout_s)
        except TextTimeout as exc:
            raise ApiError(504, "timeout", str(exc), timeout_s=timeout_s) from None

    async def _submit(
        self,
        loaded: LoadedMethod,
        image: np.ndarray,
        recipe: ProductRecipe | None,
        references: ReferenceSet | None,
        ref_key: str | None,
        timeout_s: float,
    ) -> tuple[AnomalyResult, dict[str, float]]:
        settings = self.services.settings
        try:
            return await loaded.queue.submit(
                image,
                key=batch_key(recipe, references, ref_key),
                product=recipe,
                references=references,
                timeout_s=max(timeout_s, 0.001),
            )
        except QueueFull as exc:
            raise ApiError(
                503,
                "queue_full",
                f"the {loaded.method} queue is full ({settings.queue_size} waiting); "
                f"retry in {exc.retry_after_s} s",
                headers={"Retry-After": str(exc.retry_after_s)},
                retry_after_s=exc.retry_after_s,
            ) from None
        except QueueTimeout as exc:
            raise ApiError(504, "timeout", str(exc), timeout_s=settings.request_timeout_s) from None
        except QueueClosed as exc:
            raise ApiError(503, "shutting_down", str(exc), headers={"Retry-After": "5"}) from None

    # -------------------------------------------------------------- rendering
    def _render_json(self, result: AnomalyResult, image: np.ndarray, threshold: float) -> dict[str, Any]:
        max_regions = self.services.settings.max_regions
        amap = result.anomaly_map
        boxes = boxes_above(amap, threshold)
        return {
            "anomaly_map": {
                "png_base64": base64.b64encode(anomaly_map_png(amap)).decode("ascii"),
                "width": int(amap.shape[1]),
                "height": int(amap.shape[0]),
                "min": float(amap.min()),
                "max": float(amap.max()),
            },
            "regions": [b.as_dict() for b in boxes[:max_regions]],
            "regions_truncated": len(boxes) > max_regions,
            "image": {
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "sha256_16": image_hash(image),
            },
        }

    @staticmethod
    def _body(ins: Inspection, rendered: dict[str, Any], qinfo: dict[str, float]) -> dict[str, Any]:
        result = ins.result
        body: dict[str, Any] = {
            "score": result.score,
            "decision": ins.decision,
            "threshold": ins.threshold,
            "product": ins.recipe.id if ins.recipe is not None else None,
            "method": result.method,
            "model": result.model,
            "weights": result.weights,
            "prompt_digest": result.prompt_digest,
            "used_references": result.used_references,
            "reference_count": ins.references.count if ins.references is not None else 0,
            **rendered,
            "batch_size": int(qinfo["batch_size"]),
            "details": dict(result.details),
        }
        if ins.demo:
            body["demo"] = True
            body["warning"] = DEMO_WARNING
        return body

    @staticmethod
    def _timings_ms(ins: Inspection) -> dict[str, float]:
        t = ins.timings
        ordered = {
            "read": t.get("read", 0.0),
            "decode": t.get("decode", 0.0),
            "references": t.get("references", 0.0),
            "prompts": t.get("prompts", 0.0),
            "queue_wait": t.get("queue_wait", 0.0),
            "inference": t.get("inference", 0.0),
            **{f"model_{k}": float(v) for k, v in ins.result.timings.items()},
            "render": t.get("render", 0.0),
            "total": t.get("total", 0.0),
        }
        return {k: round(v * 1000.0, 3) for k, v in ordered.items()}

    @staticmethod
    def _headers(ins: Inspection) -> dict[str, str]:
        headers = {
            "X-Anomaly-Score": f"{ins.result.score:.6f}",
            "X-Decision": ins.decision,
            "X-Threshold": f"{ins.threshold:.6f}",
            "X-Method": ins.result.method,
            "X-Used-References": str(ins.result.used_references).lower(),
        }
        if ins.demo:
            headers["X-Demo"] = "true"
            headers["X-Warning"] = DEMO_WARNING
        return headers

    # ---------------------------------------------------------------- metrics
    def _observe(self, ins: Inspection) -> None:
        stage = self.services.metrics.stage
        for name in ("read", "decode", "references", "prompts", "queue_wait", "inference", "render", "total"):
            if name in ins.timings:
                stage.labels(method=ins.method, stage=name).observe(ins.timings[name])


__all__ = ["DEMO_LABEL", "GENERIC_THRESHOLD", "InspectParams", "Inspection", "InspectionFlow"]
