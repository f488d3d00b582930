"""The inspection flow: everything between the ``/inspect`` router and the inference queue.

The router parses the HTTP request (query, upload) and turns an :class:`Inspection`
into an HTTP answer; this module does the rest, in order:

1. resolve the product recipe and the method (404 / 422 / 503 as :class:`ApiError`): the
   request's ``method``, else the recipe's ``default_method``, else the automatic choice
   (:meth:`InspectionFlow.default_method`: ``anomalydino`` for a product with golden images
   for it, when loaded; else ``winclip``); a product with ``tiling`` uses the method's tiled
   detector (:mod:`service.tiling`);
2. decide the threshold: the product's (calibrated or hand-set), else the generic one, moved
   by the request's ``sensitivity`` (:func:`models.calibration.effective_threshold`);
3. look up the product's reference set (golden images) for the method; a method that
   cannot work without one (AnomalyDINO) is refused with 409 ``references_required``;
4. look up the per-image result cache (:mod:`service.result_cache`, keyed by the sha256
   of the upload): a hit skips 5 (unless a PNG overlay is asked for) and 6;
5. decode the image off the event loop; a tiled product's image needing more than
   ZSI_MAX_TILES tiles is refused (413 ``too_many_tiles``);
6. encode the product's prompts if not done yet, on a text thread, NOT on the model's
   batch worker (:mod:`service.text_work`), so one product's prompts never stall others;
7. queue the image for the method's batching worker (503 full, 504 deadline);
8. decide on the effective threshold (also for a cached score: the threshold is not part of
   the cache key), add the normalised score and the calibration warnings, render (JSON body
   or PNG overlay), and observe stage metrics;
9. make the inspection record durable (:mod:`service.records`) before the answer leaves:
   answers AND refusals raised from step 1 on get a record and an ``inspection_id``.

Records, result caching, calibration and stream banks join the request path here,
never in the router. No tensor maths: detectors and :mod:`models.postprocess` do that.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from models.base import AnomalyResult, Detector, ReferenceSet, ReferencesRequiredError, image_hash
from models.calibration import DEFAULT_SENSITIVITY, effective_threshold, normalize_score
from models.postprocess import anomaly_map_png, boxes_above, overlay_png
from prompts import ProductRecipe
from service.deps import LoadedMethod, Services
from service.errors import ApiError
from service.imaging import decode_image
from service.products import threshold_source
from service.queue import QueueClosed, QueueFull, QueueTimeout, batch_key
from service.records.draft import RecordDraft, recipe_digest
from service.result_cache import CachedResult, encode_entry
from service.schemas import DEMO_WARNING
from service.stream import StreamRun, StreamService
from service.text_work import TextTimeout, TextWork
from service.tiling import check_tiles, tiling_config

log = logging.getLogger("service.inspection")

GENERIC_THRESHOLD = 0.5
#: The method of a request that names none, for a recipe that names none (or no product).
DEFAULT_METHOD = "winclip"
#: The automatic default of a product with golden images for it (docs/anomalydino.md: better
#: published few-shot accuracy than WinCLIP+ at about a tenth of its time per image at 448 px).
FEW_SHOT_METHOD = "anomalydino"
DEMO_LABEL = "DEMO: random-init model, not a real result"
Output = Literal["json", "png"]
T = TypeVar("T")


@dataclass(frozen=True)
class InspectParams:
    """What the client asked for (query parameters of ``POST /inspect``)."""

    product: str | None = None
    method: str | None = None
    output: Output = "json"
    line: str | None = None
    station: str | None = None
    part_id: str | None = None
    sensitivity: float = DEFAULT_SENSITIVITY


@dataclass(frozen=True)
class Decision:
    """How one request decides: the product threshold, moved by the request's sensitivity."""

    threshold: float  # effective: decide ``score >= threshold``
    product_threshold: float
    source: str  # generic | product | calibrated | stream_fallback
    sensitivity: float
    calibration: dict[str, Any] | None  # summary of a calibrated threshold's provenance

    @classmethod
    def of(cls, recipe: ProductRecipe | None, sensitivity: float) -> Decision:
        product_threshold = recipe.threshold if recipe is not None else GENERIC_THRESHOLD
        source = threshold_source(recipe)
        cal = recipe.calibration if recipe is not None and source == "calibrated" else None
        return cls(
            threshold=effective_threshold(product_threshold, sensitivity),
            product_threshold=product_threshold,
            source=source,
            sensitivity=sensitivity,
            calibration=calibration_summary(cal.model_dump(mode="json")) if cal is not None else None,
        )

    @classmethod
    def stream_fallback(cls, threshold: float, sensitivity: float) -> Decision:
        """A stream product warming up: its fallback decides on ``stream.fallback_threshold``."""
        return cls(
            threshold=effective_threshold(threshold, sensitivity),
            product_threshold=threshold,
            source="stream_fallback",
            sensitivity=sensitivity,
            calibration=None,
        )

    def provenance(self, warnings: list[str]) -> dict[str, Any]:
        """The record's ``threshold_provenance``."""
        doc: dict[str, Any] = {
            "product_threshold": self.product_threshold,
            "sensitivity": self.sensitivity,
            "calibration": self.calibration,
        }
        if warnings:
            doc["warnings"] = warnings
        return doc


def calibration_summary(cal: dict[str, Any]) -> dict[str, Any]:
    """The part of a calibration's provenance every answer and record carries."""
    keys = (
        "method",
        "model",
        "weights",
        "precision",
        "prompt_digest",
        "reference_key",
        "n",
        "target_false_reject_rate",
        "confidence",
        "bound",
        "guaranteed_false_reject_rate",
        "calibrated_at",
    )
    return {k: cal.get(k) for k in keys}


def calibration_mismatches(
    recipe: ProductRecipe, result: AnomalyResult, reference_key: str | None, precision: str
) -> list[str]:
    """What differs between the product's calibration and the setup that produced ``result``."""
    cal = recipe.calibration
    if cal is None:
        return []
    now = {
        "method": result.method,
        "model": result.model,
        "weights": result.weights,
        "precision": precision,
        "prompts": result.prompt_digest,
        "golden set": reference_key,
    }
    then = {
        "method": cal.method,
        "model": cal.model,
        "weights": cal.weights,
        "precision": cal.precision if cal.precision is not None else precision,
        "prompts": cal.prompt_digest,
        "golden set": cal.reference_key,
    }
    return [k for k in now if now[k] != then[k]]


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
    threshold: float  # effective (the product threshold moved by the sensitivity)
    references: ReferenceSet | None
    timings: dict[str, float]
    demo: bool
    body: dict[str, Any] | None = None
    png: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    record_id: str = ""
    cached: bool = False
    recorded: bool = True
    rule: Decision | None = None
    normalized_score: float = 0.0
    warnings: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    stream: StreamRun | None = None


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
        self.stream = StreamService(services)  # stream products' banks (service/stream.py)

    def close(self) -> None:
        self.text_work.close()
        self.stream.close()

    # ------------------------------------------------------------ resolution
    async def resolve(self, params: InspectParams) -> tuple[ProductRecipe | None, LoadedMethod]:
        """The product recipe (or None) and the loaded method; raises the 4xx/503 that explains why not."""
        recipe: ProductRecipe | None = None
        if params.product is not None:
            recipe, _ = await run_in_threadpool(self.services.products.get, params.product)
        method_name = params.method or await self.default_method(recipe)
        if recipe is not None and self.stream.applies(recipe, method_name):
            return recipe, self.stream.musc_for(recipe)  # 503 stream_unavailable without musc
        return recipe, self.services.loaded_method(method_name)

    async def default_method(self, recipe: ProductRecipe | None) -> str:
        """The method of a request that names none: the recipe's ``default_method``, else automatic.

        Automatic (a recipe with ``default_method: null``): ``anomalydino`` when ZSI_METHODS
        lists it and the product has golden images encoded for it (every golden upload
        encodes for every loaded method that uses them), else ``winclip`` (WinCLIP+ with
        golden images, zero-shot without). A product whose anomalydino bank no longer fits
        (tiling, image size or weights changed) stays on anomalydino and is told to upload
        its golden images again, and one whose anomalydino is still loading (or failed) gets
        that 503: the answering method never switches silently.
        """
        if recipe is None:
            return DEFAULT_METHOD
        if recipe.default_method is not None:
            return recipe.default_method
        if FEW_SHOT_METHOD not in self.services.settings.methods:
            return DEFAULT_METHOD
        has = await run_in_threadpool(self.services.references.methods_with_sets, recipe.id)
        return FEW_SHOT_METHOD if FEW_SHOT_METHOD in has else DEFAULT_METHOD

    def detector_for(self, loaded: LoadedMethod, recipe: ProductRecipe | None) -> Detector:
        """The method's detector for this product: tiled when the recipe has ``tiling``."""
        return loaded.queue.detector_for(tiling_config(recipe, self.services.settings))

    @staticmethod
    def threshold_for(recipe: ProductRecipe | None) -> float:
        """The product threshold (before sensitivity): the recipe's, else the generic one."""
        return recipe.threshold if recipe is not None else GENERIC_THRESHOLD

    @staticmethod
    def warnings_for(
        recipe: ProductRecipe | None,
        rule: Decision,
        result: AnomalyResult,
        reference_key: str | None,
        precision: str,
    ) -> tuple[list[str], list[str]]:
        """(warnings for the answer, what no longer matches the calibration)."""
        if recipe is None or rule.source != "calibrated" or recipe.calibration is None:
            return [], []
        cal = recipe.calibration
        stale = calibration_mismatches(recipe, result, reference_key, precision)
        warnings = []
        if stale:
            warnings.append(
                f"the threshold of {recipe.id!r} was calibrated with another {', '.join(stale)} "
                f"({cal.method}/{cal.model}/{cal.weights}, prompts {cal.prompt_digest}, golden set "
                f"{cal.reference_key or 'none'}, on {cal.calibrated_at}): its false-reject promise does not "
                f"hold for this answer; calibrate again (POST /products/{recipe.id}/calibrate)"
            )
        if rule.sensitivity > DEFAULT_SENSITIVITY:
            warnings.append(
                f"sensitivity {rule.sensitivity:g} > 0.5 lowers the calibrated threshold: the promised "
                f"false-reject rate (<= {cal.target_false_reject_rate:g}) does not hold at this threshold"
            )
        return warnings, stale

    # ------------------------------------------------------------------ run
    async def run(
        self,
        params: InspectParams,
        read_body: Callable[[], Any],
    ) -> Inspection:
        """Inspect the image that ``await read_body()`` returns (bytes), as ``params`` ask.

        The body is read only after the product and method are known to be usable, so a
        request for an unknown product is refused without reading its upload.

        Every answer from here on, a refusal too, is recorded before it leaves; its id is
        ``inspection_id`` in the JSON (``error.inspection_id`` for a refusal) and the
        ``X-Inspection-Id`` header.
        """
        draft = RecordDraft(
            output=params.output,
            product=params.product,
            method=params.method,
            precision=self.services.settings.precision,
            line=params.line,
            station=params.station,
            part_id=params.part_id,
        )
        try:
            return await self._inspect(params, read_body, draft)
        except ApiError as exc:
            draft.refused(exc.status, exc.code, exc.message)
            await self._persist(draft)
            exc.details["inspection_id"] = draft.id
            exc.headers = {**exc.headers, "X-Inspection-Id": draft.id}
            raise
        except Exception as exc:
            log.exception("inspection %s failed", draft.id)
            message = f"internal error: {type(exc).__name__}"
            draft.refused(500, "internal_error", message)
            await self._persist(draft)
            raise ApiError(
                500,
                "internal_error",
                message,
                headers={"X-Inspection-Id": draft.id},
                inspection_id=draft.id,
            ) from exc

    async def _inspect(
        self, params: InspectParams, read_body: Callable[[], Any], draft: RecordDraft
    ) -> Inspection:
        services = self.services
        settings = services.settings
        clock = _Clock()
        recipe, loaded = await self.resolve(params)
        stream: StreamRun | None = None
        if recipe is not None and self.stream.applies(recipe, loaded.method):
            # a stream product: musc against the bank, or its fallback while the bank warms up
            stream = await self.stream.start(recipe, loaded)
            loaded = stream.answering
            draft.stream_mode, draft.bank_size = stream.mode, stream.size  # a refusal records them too
        det = self.detector_for(loaded, recipe)
        rule = Decision.of(recipe, params.sensitivity)
        if stream is not None and stream.threshold is not None:
            rule = Decision.stream_fallback(stream.threshold, params.sensitivity)  # the fallback's scale
        threshold = rule.threshold
        demo = det.random_weights or services.demo
        draft.method, draft.model, draft.weights, draft.demo = (
            loaded.method,
            det.model_name,
            det.weights_tag,
            demo,
        )
        draft.threshold, draft.threshold_source = threshold, rule.source
        draft.threshold_provenance = rule.provenance([])
        if recipe is not None:
            draft.product, draft.recipe_digest = recipe.id, recipe_digest(recipe)
        clock.lap("resolve")

        data: bytes = await read_body()
        draft.image_bytes = len(data)
        clock.lap("read")

        references, ref_key = None, None
        if recipe is not None and det.supports_references and (stream is None or stream.mode == "warming_up"):
            references, ref_key = await run_in_threadpool(services.references.lookup, recipe.id, det)
            services.metrics.cache_lookup("references", references is not None)
        draft.reference_key = ref_key.rsplit(":", 1)[-1] if ref_key and references is not None else None
        draft.reference_count = references.count if references is not None else 0
        if stream is None:
            if references is None and requires_references(det):
                raise await self.references_required(loaded.method, det, recipe)
            self.stream.check_plain_musc(loaded.method, recipe, references)  # 422: nothing to score against
        elif stream.mode == "stream":
            draft.reference_key, draft.reference_count = stream.reference_key, stream.size
        clock.lap("references")

        # stream answers depend on the bank (and feed it): never from the result cache
        cache_key, hit = await run_in_threadpool(
            self._cache_lookup, det, data, recipe, ref_key, draft, stream is None
        )
        if hit is not None and hit.image_width * hit.image_height > settings.max_image_pixels:
            hit = None  # the pixel limit was lowered since: decode (and refuse) as usual
        clock.lap("cache")

        image: np.ndarray | None = None
        if hit is None or params.output == "png":
            image = await run_in_threadpool(
                decode_image, data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
            )
            clock.lap("decode")
        if recipe is not None and recipe.tiling is not None:  # 413 past ZSI_MAX_TILES (a cache hit too)
            if image is not None:
                height, width = int(image.shape[0]), int(image.shape[1])
            else:
                assert hit is not None
                height, width = hit.image_height, hit.image_width
            check_tiles(height, width, tiling_config(recipe, settings), settings.max_tiles)
        kept_bytes = data if recipe is not None and recipe.keep_images else None
        del data

        qinfo = {"queue_wait": 0.0, "inference": 0.0, "batch_size": 0.0}
        if hit is not None:
            result = hit.to_result()
        else:
            assert image is not None
            timeout_s = settings.request_timeout_s - await self._prepare_text(loaded, recipe)
            clock.lap("prompts")
            if stream is not None:
                result, qinfo = await self.stream.score(
                    stream,
                    image,
                    timeout_s,
                    lambda: self._submit(loaded, image, recipe, references, ref_key, timeout_s),
                )
            else:
                result, qinfo = await self._submit(loaded, image, recipe, references, ref_key, timeout_s)
        clock.stages["queue_wait"] = qinfo["queue_wait"]
        clock.stages["inference"] = qinfo["inference"]
        clock.last = time.perf_counter()

        decision: Literal["anomalous", "normal"] = "anomalous" if result.score >= threshold else "normal"
        warnings, stale = self.warnings_for(recipe, rule, result, draft.reference_key, settings.precision)
        if stream is not None:
            await self.stream.finish(stream, result, decision, threshold)  # accepted parts join the bank
            if stream.mode == "stream":
                draft.reference_count = stream.scored_against
            draft.stream_mode, draft.bank_size = stream.mode, stream.bank_size
            clock.lap("stream")
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
            record_id=draft.id,
            cached=hit is not None,
            rule=rule,
            normalized_score=normalize_score(float(result.score), rule.product_threshold),
            warnings=warnings,
            stale=stale,
            stream=stream,
        )
        if params.output == "png":
            assert image is not None
            label = DEMO_LABEL if det.random_weights else None
            inspection.png = await run_in_threadpool(
                overlay_png, image, result.anomaly_map, result.score, threshold=threshold, label=label
            )
            rendered = await run_in_threadpool(
                self._render_json, result, image, threshold, hit, cache_key, with_png=False
            )
            clock.lap("render")
        else:
            rendered = await run_in_threadpool(self._render_json, result, image, threshold, hit, cache_key)
            clock.lap("render")
            inspection.body = self._body(inspection, rendered, qinfo)
        clock.stages["total"] = clock.total()
        timings_ms = self._timings_ms(inspection)
        self._fill_record(draft, inspection, rendered, qinfo, timings_ms)
        inspection.recorded = await self._persist(
            draft, image=kept_bytes, anomaly_map=result.anomaly_map if kept_bytes is not None else None
        )
        clock.lap("record")
        clock.stages["total"] = clock.total()
        if inspection.body is not None:
            inspection.body["timings_ms"] = self._timings_ms(inspection)
        inspection.headers = self._headers(inspection)
        self._observe(inspection)
        return inspection

    # ------------------------------------------------------- result cache
    def _cache_lookup(
        self,
        det: Any,
        data: bytes,
        recipe: ProductRecipe | None,
        ref_key: str | None,
        draft: RecordDraft,
        use_cache: bool = True,
    ) -> tuple[str | None, CachedResult | None]:
        """Hash the upload (for the record and the key) and look the result up (worker thread)."""
        draft.image_sha256 = hashlib.sha256(data).hexdigest()
        cache = self.services.result_cache
        if cache is None or not use_cache:
            return None, None
        settings = self.services.settings
        key = cache.key(
            det,
            precision=settings.precision,
            backend=settings.backend,
            image_sha256=draft.image_sha256,
            recipe=recipe,
            ref_key=ref_key,
        )
        return key, cache.get(key)

    # ------------------------------------------------------------ records
    async def _persist(
        self, draft: RecordDraft, *, image: bytes | None = None, anomaly_map: np.ndarray | None = None
    ) -> bool:
        """Durable record before the answer leaves (worker thread); False when it was dropped."""
        records = self.services.records
        if records is None:
            return False

        def write() -> bool:
            fmt = _image_format(image) if image is not None else None
            return records.persist(draft.as_record(), image=image, image_format=fmt, anomaly_map=anomaly_map)

        return await run_in_threadpool(write)

    @staticmethod
    def _fill_record(
        draft: RecordDraft,
        ins: Inspection,
        rendered: dict[str, Any],
        qinfo: dict[str, float],
        timings_ms: dict[str, float],
    ) -> None:
        result = ins.result
        draft.prompt_digest, draft.model, draft.weights = result.prompt_digest, result.model, result.weights
        draft.used_references = result.used_references
        draft.score, draft.decision, draft.cached = float(result.score), ins.decision, ins.cached
        draft.set_normalized(ins.normalized_score)
        if ins.rule is not None:
            draft.threshold_provenance = ins.rule.provenance(ins.warnings)
        draft.regions, draft.regions_truncated = rendered["regions"], rendered["regions_truncated"]
        draft.image_width, draft.image_height = rendered["image"]["width"], rendered["image"]["height"]
        draft.batch_size = int(qinfo["batch_size"])
        draft.timings_ms = timings_ms

    async def _prepare_text(self, loaded: LoadedMethod, recipe: ProductRecipe | None) -> float:
        """Encode the product's prompts off the model's worker (seconds spent; 504 past the deadline)."""
        timeout_s = self.services.settings.request_timeout_s
        try:
            return await self.text_work.prepare(loaded.method, loaded.detector, recipe, timeout_s=timeout_s)
        except TextTimeout as exc:
            raise ApiError(504, "timeout", str(exc), timeout_s=timeout_s) from None

    async def references_required(self, method: str, det: Detector, recipe: ProductRecipe | None) -> ApiError:
        """409 ``references_required``: what to upload, and where (the request is not queued)."""
        if recipe is None:
            return ApiError(
                409,
                "references_required",
                f"method {method!r} compares each image with golden (normal) images of a product: name "
                "the product (?product=ID) and upload its golden images first with "
                "POST /products/ID/references (multipart, field 'images')",
                method=method,
            )
        upload = f"POST /products/{recipe.id}/references"
        index = await run_in_threadpool(self.services.references.index, recipe.id)
        if det.model_key in index:
            message = (
                f"the stored golden-image features of product {recipe.id!r} for {method} are gone "
                f"(expired or unreadable): upload the golden images again with {upload} "
                "(multipart, field 'images')"
            )
        elif any(e.get("method") == method for e in index.values()):
            message = (
                f"the golden images of product {recipe.id!r} were encoded for another {method} "
                f"configuration (tiling, input size or weights changed; this one is {det.model_key}): "
                f"upload them again with {upload} (multipart, field 'images')"
            )
        else:
            message = (
                f"method {method!r} compares each image with golden (normal) images, and product "
                f"{recipe.id!r} has none for it: upload a few defect-free images with {upload} "
                "(multipart, field 'images'), then inspect again"
            )
        return ApiError(409, "references_required", message, product=recipe.id, method=method, upload=upload)

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
                tiling=tiling_config(recipe, settings),
            )
        except ReferencesRequiredError as exc:  # the detector's own check (the flow checks first)
            raise ApiError(409, "references_required", str(exc), method=loaded.method) from None
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
    def _render_json(
        self,
        result: AnomalyResult,
        image: np.ndarray | None,
        threshold: float,
        hit: CachedResult | None = None,
        cache_key: str | None = None,
        *,
        with_png: bool = True,
    ) -> dict[str, Any]:
        """The map, regions and image parts of the answer (worker thread).

        From a cache ``hit``: min/max and the image part as stored, the regions as stored
        when the threshold is the one they were computed at, else recomputed from the
        cached map. On a miss with a ``cache_key`` the result is stored. ``with_png=False``
        (``output=png``: regions for the record only) leaves the map PNG out.
        """
        max_regions = self.services.settings.max_regions
        amap = result.anomaly_map
        if hit is not None and hit.regions_threshold == threshold and hit.regions_max == max_regions:
            regions = [dict(r) for r in hit.regions]
            truncated = hit.regions_truncated
        else:
            boxes = boxes_above(amap, threshold)
            regions = [b.as_dict() for b in boxes[:max_regions]]
            truncated = len(boxes) > max_regions
        if hit is not None:
            lo, hi = hit.map_min, hit.map_max
            width, height, pixel_hash = hit.image_width, hit.image_height, hit.pixel_hash
        else:
            assert image is not None
            lo, hi = float(amap.min()), float(amap.max())
            width, height, pixel_hash = int(image.shape[1]), int(image.shape[0]), image_hash(image)
        cache = self.services.result_cache
        if hit is None and cache is not None and cache_key is not None:
            cache.put(
                cache_key,
                encode_entry(
                    result,
                    image_width=width,
                    image_height=height,
                    pixel_hash=pixel_hash,
                    threshold=threshold,
                    max_regions=max_regions,
                    regions=regions,
                    regions_truncated=truncated,
                ),
            )
        return {
            "anomaly_map": {
                "png_base64": base64.b64encode(anomaly_map_png(amap)).decode("ascii") if with_png else "",
                "width": int(amap.shape[1]),
                "height": int(amap.shape[0]),
                "min": lo,
                "max": hi,
            },
            "regions": regions,
            "regions_truncated": truncated,
            "image": {"width": width, "height": height, "sha256_16": pixel_hash},
        }

    @staticmethod
    def _body(ins: Inspection, rendered: dict[str, Any], qinfo: dict[str, float]) -> dict[str, Any]:
        result = ins.result
        rule = ins.rule
        assert rule is not None
        body: dict[str, Any] = {
            "score": result.score,
            "normalized_score": ins.normalized_score,
            "decision": ins.decision,
            "threshold": ins.threshold,
            "product_threshold": rule.product_threshold,
            "threshold_source": rule.source,
            "sensitivity": rule.sensitivity,
            "calibration": rule.calibration,
            "warnings": list(ins.warnings),
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
            "inspection_id": ins.record_id,
            "cached": ins.cached,
        }
        if ins.stream is not None:
            body["warnings"] = [*body.get("warnings", []), *ins.stream.warnings]
            body["warming_up"] = ins.stream.mode == "warming_up"
            body["bank_size"] = ins.stream.bank_size
            body["stream"] = ins.stream.info()
            if ins.stream.mode == "stream":
                body["reference_count"] = ins.stream.scored_against
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
            "cache": t.get("cache", 0.0),
            **({"stream": t["stream"]} if "stream" in t else {}),  # bank append + guard
            "render": t.get("render", 0.0),
            "record": t.get("record", 0.0),
            "total": t.get("total", 0.0),
        }
        return {k: round(v * 1000.0, 3) for k, v in ordered.items()}

    @staticmethod
    def _headers(ins: Inspection) -> dict[str, str]:
        headers = {
            "X-Anomaly-Score": f"{ins.result.score:.6f}",
            "X-Decision": ins.decision,
            "X-Threshold": f"{ins.threshold:.6f}",
            "X-Normalized-Score": f"{ins.normalized_score:.6f}",
            "X-Method": ins.result.method,
            "X-Used-References": str(ins.result.used_references).lower(),
            "X-Inspection-Id": ins.record_id,
            "X-Cache": "hit" if ins.cached else "miss",
        }
        if ins.rule is not None:
            headers["X-Product-Threshold"] = f"{ins.rule.product_threshold:.6f}"
            headers["X-Threshold-Source"] = ins.rule.source
            headers["X-Sensitivity"] = f"{ins.rule.sensitivity:g}"
        if ins.stale:
            headers["X-Calibration-Stale"] = ",".join(s.replace(" ", "-") for s in ins.stale)
        if ins.stream is not None:
            headers["X-Stream-Mode"] = ins.stream.mode
            headers["X-Bank-Size"] = str(ins.stream.bank_size)
        if not ins.recorded:
            headers["X-Record"] = "dropped"
        if ins.demo:
            headers["X-Demo"] = "true"
            headers["X-Warning"] = DEMO_WARNING
        return headers

    # ---------------------------------------------------------------- metrics
    def _observe(self, ins: Inspection) -> None:
        stage = self.services.metrics.stage
        for name in (
            "read",
            "decode",
            "references",
            "cache",
            "prompts",
            "queue_wait",
            "inference",
            "render",
            "record",
            "total",
        ):
            if name in ins.timings:
                stage.labels(method=ins.method, stage=name).observe(ins.timings[name])


def requires_references(det: Detector) -> bool:
    """True for a method that cannot answer without golden images (``describe()`` says so)."""
    return bool(det.describe().get("requires_references", False))


def _image_format(data: bytes) -> str | None:
    """PNG / JPEG / BMP / TIFF from the header (the bytes decoded already, so this cannot fail badly)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:
        return None


__all__ = [
    "DEFAULT_METHOD",
    "DEMO_LABEL",
    "FEW_SHOT_METHOD",
    "GENERIC_THRESHOLD",
    "Decision",
    "InspectParams",
    "Inspection",
    "InspectionFlow",
    "calibration_mismatches",
    "calibration_summary",
    "requires_references",
]
