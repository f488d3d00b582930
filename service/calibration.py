"""Threshold calibration of a product: everything between ``POST /products/{id}/calibrate`` and the model.

The router parses the request (a JSON body, or multipart with a ``config`` field and image
files) and hands it here. In order:

1. resolve the product (404) and the method (422 / 503); refuse at once (503) when the
   store could not save the result, before any model work;
2. gather the good images: the product's kept golden images (``use_golden``), the extra
   good images sent with the request (field ``good``), and with ``include_reviewed`` the
   inspection records an operator judged good; the labelled defect images likewise
   (field ``defect``, records judged defect) for the recall. No good image at all: 409;
3. score them on the method's model worker (``queue.run_exclusive``), never on the event
   loop, in chunks of ``ZSI_MAX_BATCH`` images so inspections go on in between:

   - golden images of the set the method uses for this product: leave-one-out
     (:meth:`models.base.Detector.leave_one_out`), so no image is scored against itself;
   - golden images when the method has no set here (it inspects the product zero-shot):
     scored as they are, like ``/inspect`` would;
   - extra and reviewed images: scored exactly as ``/inspect`` scores a part (the
     product's prompts and golden set); an image pixel-identical to a golden image, or to
     one already counted, is left out (it would be scored against itself, or twice);
   - a reviewed record whose stored score came from the same method, model, weights,
     precision, prompts and golden set: that score as it is (it was already a fresh,
     out-of-sample score of that part), no model pass and no kept image needed;

4. :func:`models.calibration.calibrate_threshold` (422 ``too_few_images`` / ``saturated``);
5. store the threshold with its provenance in the recipe (an override for a built-in; 409
   if the product was changed meanwhile).

No tensor maths here: the detectors and :mod:`models.calibration` do that.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from models.base import Detector, ReferenceSet, image_hash
from models.calibration import Calibration, CalibrationError, calibrate_threshold
from prompts import ProductRecipe, ThresholdCalibration
from service.deps import LoadedMethod, Services
from service.errors import ApiError
from service.imaging import decode_image, too_large_bytes
from service.products import threshold_source
from service.records import LabelledRecord, reviewed_records
from service.schemas import CalibrateIn, CalibrationOut, CalibrationSources, ScoreSummary
from service.stream import STREAM_METHOD
from service.text_work import TextTimeout
from service.tiling import tiling_tag


@dataclass(frozen=True)
class SentImage:
    """An image file sent with the request, read only when its chunk is scored."""

    name: str
    read: Callable[[], Awaitable[bytes]]
    size: int | None = None


@dataclass
class _Setup:
    """What the product's parts are scored with right now (one calibration request)."""

    loaded: LoadedMethod
    detector: Detector  # the method's detector for this product (tiled when the recipe is)
    recipe: ProductRecipe
    references: ReferenceSet | None
    reference_key: str | None  # content hash of the golden set, as in the records
    prompt_digest: str
    precision: str
    reference_hashes: frozenset[str] = frozenset()
    seen: set[str] = field(default_factory=set)  # pixel hashes already counted


def promise_text(cal: Calibration) -> str:
    """What a calibration promises, in words (stored with it)."""
    same = (
        "a fresh good part exchangeable with the calibration images (same line, camera and lighting; "
        "same method, model, weights, prompts and golden set)"
    )
    if cal.bound == "pac":
        return (
            f"with probability at least {cal.confidence:g} over the draw of the {cal.n} good images, this "
            f"threshold rejects at most {cal.target_false_reject_rate:g} of good parts: {same}, decided at "
            "sensitivity <= 0.5"
        )
    return (
        f"{same} is rejected with probability at most {cal.guaranteed_false_reject_rate:.6g} <= "
        f"{cal.target_false_reject_rate:g} (distribution-free, on average over calibrations), decided at "
        "sensitivity <= 0.5"
    )


def _describe(sources: CalibrationSources) -> str:
    parts = [f"{n} {name.replace('_', ' ')}" for name, n in sources.model_dump().items() if n]
    return ", ".join(parts) or "none"


def _summary(scores: Sequence[float]) -> ScoreSummary:
    if not scores:
        return ScoreSummary(n=0, min=None, median=None, max=None)
    return ScoreSummary(
        n=len(scores), min=min(scores), median=float(statistics.median(scores)), max=max(scores)
    )


class CalibrationFlow:
    """Calibrates products for one app instance (stateless: request state lives in locals)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def run(
        self,
        product_id: str,
        config: CalibrateIn,
        good: Sequence[SentImage] = (),
        defect: Sequence[SentImage] = (),
    ) -> CalibrationOut:
        services = self.services
        settings = services.settings
        t0 = time.perf_counter()
        recipe, _ = await run_in_threadpool(services.products.get, product_id)
        previous_source = threshold_source(recipe)
        method = config.method or await services.inspection.default_method(recipe)
        loaded = services.loaded_method(method)
        det = services.inspection.detector_for(loaded, recipe)  # tiled like the product's inspections
        await run_in_threadpool(services.references.check_writable)  # 503 before any model work
        references, ref_key = None, None
        if det.supports_references:
            references, ref_key = await run_in_threadpool(services.references.lookup, product_id, det)
        if references is None and det.requires_references:  # 409, as /inspect answers
            raise await services.inspection.references_required(loaded.method, det, recipe)
        if references is None and det.method == STREAM_METHOD:
            # musc without its golden set would score the sent images against each other, a chunk at
            # a time: a score no answer gives (plain musc is refused, a stream product's bank differs)
            raise ApiError(
                422,
                "musc_needs_references",
                f"musc scores an image against OTHER images of the product, and product {product_id!r} has "
                f"no golden images for musc: upload them (POST /products/{product_id}/references?method=musc); "
                "calibration scores them leave-one-out (a stream product's rolling bank is not a "
                "calibration set, docs/musc.md)",
                product=product_id,
                method=det.method,
            )
        setup = _Setup(
            loaded=loaded,
            detector=det,
            recipe=recipe,
            references=references,
            reference_key=ref_key.rsplit(":", 1)[-1] if ref_key and references is not None else None,
            prompt_digest=await run_in_threadpool(det.prompt_digest, None, recipe),
            precision=settings.precision,
            reference_hashes=frozenset(references.image_hashes) if references is not None else frozenset(),
        )
        notes: list[str] = []
        sources = CalibrationSources()

        golden: list[tuple[str, bytes]] = []
        if config.use_golden:
            kept = await run_in_threadpool(
                services.references.kept_images, product_id, det.model_key if references is not None else None
            )
            golden = kept.images
            if kept.missing:
                notes.append(
                    f"{kept.missing} golden image(s) left out: their bytes were not kept (uploaded before "
                    "golden images were kept, expired or unreadable); upload the golden set again to use them"
                )
        reviewed: list[LabelledRecord] = []
        if config.include_reviewed:
            reviewed = await self._reviewed(product_id)
        reviewed_good = [r for r in reviewed if r.label == 0]
        if not golden and not good and not reviewed_good:
            raise ApiError(
                409,
                "no_good_images",
                f"product {product_id!r} has no golden images for {det.method} and the request sent no good "
                "images: upload golden images (POST /products/{id}/references), send good images "
                "(multipart field 'good'), or include reviewed records (include_reviewed)",
                product=product_id,
                method=det.method,
            )
        await self._prepare_text(setup)

        good_scores: list[float] = []
        golden_shas = {sha for sha, _ in golden}
        if golden:
            good_scores += await self._score_golden(setup, golden, sources, notes)
        if good:
            scores, skipped = await self._score_sent(setup, good)
            good_scores += scores
            sources.extra = len(scores)
            if skipped:
                notes.append(
                    f"{skipped} good image(s) sent left out: pixel-identical to a golden image of the set "
                    "(it would be scored against itself) or to an image already counted"
                )
        if reviewed_good:
            scores, used, rescored, skipped = await self._score_reviewed(setup, reviewed_good, golden_shas)
            good_scores += scores
            sources.reviewed_scores, sources.reviewed_rescored, sources.reviewed_skipped = (
                used,
                rescored,
                skipped,
            )
            if skipped:
                notes.append(
                    f"{skipped} reviewed-good record(s) left out: scored with another method, model, weights, "
                    "precision, prompts or golden set and no kept image to score anew, a golden image, or a "
                    "repeat of an image already counted"
                )

        defect_scores: list[float] = []
        if defect:
            scores, _ = await self._score_sent(setup, defect, distinct=False)
            defect_scores += scores
        reviewed_defect = [r for r in reviewed if r.label == 1]
        if reviewed_defect:
            scores, _, _, skipped = await self._score_reviewed(setup, reviewed_defect, golden_shas)
            defect_scores += scores
            if skipped:
                notes.append(f"{skipped} reviewed-defect record(s) left out of the recall")

        try:
            cal = calibrate_threshold(
                good_scores, config.target_false_reject_rate, confidence=config.confidence
            )
        except CalibrationError as exc:
            info = {k: v for k, v in exc.as_dict().items() if k not in ("reason", "message")}
            raise ApiError(
                422,
                exc.reason,
                f"{exc} (good scores: {_describe(sources)})",
                **info,
                sources=sources.model_dump(),
                notes=notes,
            ) from None
        recall = None
        if defect_scores:
            recall = sum(s >= cal.threshold for s in defect_scores) / len(defect_scores)
        calibration = ThresholdCalibration(
            threshold=cal.threshold,
            method=det.method,
            model=det.model_name,
            weights=det.weights_tag,
            precision=settings.precision,
            backend=settings.backend,
            prompt_digest=setup.prompt_digest,
            reference_key=setup.reference_key,
            reference_count=references.count if references is not None else 0,
            tiling=tiling_tag(recipe),
            n=cal.n,
            target_false_reject_rate=cal.target_false_reject_rate,
            confidence=cal.confidence,
            bound=cal.bound,
            rank=cal.rank,
            order_statistic=cal.order_statistic,
            guaranteed_false_reject_rate=cal.guaranteed_false_reject_rate,
            calibration_false_reject_rate=cal.calibration_false_reject_rate,
            n_required=cal.n_required,
            promise=promise_text(cal),
            sources=sources.model_dump(),
            recall=recall,
            n_defect=len(defect_scores),
            random_weights=det.random_weights,
            calibrated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        await run_in_threadpool(services.products.set_calibration, product_id, recipe, calibration)
        return CalibrationOut(
            product=product_id,
            method=det.method,
            model=det.model_name,
            weights=det.weights_tag,
            threshold=cal.threshold,
            previous_threshold=recipe.threshold,
            previous_threshold_source=previous_source,  # type: ignore[arg-type]
            calibration=calibration,
            sources=sources,
            good_scores=_summary(good_scores),
            defect_scores=_summary(defect_scores),
            recall=recall,
            notes=notes,
            seconds=round(time.perf_counter() - t0, 4),
        )

    # ------------------------------------------------------------ gathering
    async def _reviewed(self, product_id: str) -> list[LabelledRecord]:
        records = self.services.records
        if records is None or records.engine is None:
            raise ApiError(503, "records_unavailable", "inspection records are not running")
        await run_in_threadpool(records.flush, records.read_wait_s)
        try:
            return await run_in_threadpool(
                lambda: reviewed_records(
                    product_id, data_dir=self.services.settings.data_dir, engine=records.engine
                )
            )
        except SQLAlchemyError as exc:
            raise ApiError(
                503,
                "records_unavailable",
                f"the records database ({records.backend}) is unreachable: {type(exc).__name__}",
                headers={"Retry-After": "5"},
            ) from None

    async def _prepare_text(self, setup: _Setup) -> None:
        """The product's prompts, encoded on the text thread (not the model worker)."""
        timeout_s = max(self.services.settings.request_timeout_s, 300.0)
        try:
            await self.services.inspection.text_work.prepare(
                setup.loaded.method, setup.loaded.detector, setup.recipe, timeout_s=timeout_s
            )
        except TextTimeout as exc:
            raise ApiError(504, "timeout", str(exc), timeout_s=timeout_s) from None

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        s = self.services.settings
        return decode_image(data, max_pixels=s.max_image_pixels, max_bytes=s.max_image_bytes, name=name)

    # -------------------------------------------------------------- scoring
    async def _predict(self, setup: _Setup, images: list[np.ndarray]) -> list[float]:
        """Score images as /inspect scores a part, on the model worker, a chunk at a time."""
        det, chunk = setup.detector, self.services.settings.max_batch
        scores: list[float] = []
        for i in range(0, len(images), chunk):
            results = await setup.loaded.queue.run_exclusive(
                det.predict_batch, images[i : i + chunk], product=setup.recipe, references=setup.references
            )
            scores += [float(r.score) for r in results]
        return scores

    async def _score_golden(
        self,
        setup: _Setup,
        golden: list[tuple[str, bytes]],
        sources: CalibrationSources,
        notes: list[str],
    ) -> list[float]:
        images = [
            await run_in_threadpool(self._decode, blob, f"golden image {sha[:12]}") for sha, blob in golden
        ]
        distinct = {image_hash(img) for img in images}
        setup.seen.update(distinct)
        det = setup.detector
        if setup.references is None:
            # the method inspects this product without golden images: score them as it would
            scores = await self._predict(setup, images)
            sources.golden = len(scores)
            return scores
        if len(distinct) < 2:
            notes.append("a single golden image cannot be scored leave-one-out: it was left out")
            return []
        results = await setup.loaded.queue.run_exclusive(det.leave_one_out, images, product=setup.recipe)
        sources.golden_leave_one_out = len(results)
        return [float(r.score) for r in results]

    async def _score_sent(
        self, setup: _Setup, sent: Sequence[SentImage], *, distinct: bool = True
    ) -> tuple[list[float], int]:
        """Scores of the images sent with the request (read and decoded a chunk at a time)."""
        settings = self.services.settings
        scores: list[float] = []
        skipped = 0
        for start in range(0, len(sent), settings.max_batch):
            images = []
            for item in sent[start : start + settings.max_batch]:
                if item.size is not None and item.size > settings.max_image_bytes:
                    raise too_large_bytes(settings.max_image_bytes)
                image = await run_in_threadpool(self._decode, await item.read(), item.name)
                if distinct:
                    h = image_hash(image)
                    if h in setup.reference_hashes or h in setup.seen:
                        skipped += 1
                        continue
                    setup.seen.add(h)
                images.append(image)
            scores += await self._predict(setup, images)
        return scores, skipped

    def _same_setup(self, setup: _Setup, rec: LabelledRecord) -> bool:
        """Whether a record's stored score is what the current setup would answer for its image."""
        det = setup.detector
        return (
            rec.score is not None
            and rec.method == det.method
            and rec.model == det.model_name
            and rec.weights == det.weights_tag
            and rec.precision == setup.precision
            and rec.prompt_digest == setup.prompt_digest
            and (rec.reference_key or None) == setup.reference_key
        )

    async def _score_reviewed(
        self, setup: _Setup, recs: list[LabelledRecord], golden_shas: set[str]
    ) -> tuple[list[float], int, int, int]:
        """(scores, used as stored, scored anew, left out) of reviewed records."""
        scores: list[float] = []
        used = skipped = 0
        to_score: list[np.ndarray] = []
        seen_bytes: set[str] = set()
        for rec in recs:
            sha = rec.image_sha256
            if sha is not None and (sha in golden_shas or sha in seen_bytes):
                skipped += 1
                continue
            if sha is not None:
                seen_bytes.add(sha)
            if self._same_setup(setup, rec):
                assert rec.score is not None
                scores.append(float(rec.score))
                used += 1
                continue
            if rec.image_path is None:
                skipped += 1
                continue
            image = await run_in_threadpool(_read_image, self, rec.image_path, rec.id)
            h = image_hash(image) if image is not None else None
            if image is None or h in setup.reference_hashes or h in setup.seen:
                skipped += 1
                continue
            setup.seen.add(h)  # type: ignore[arg-type]
            to_score.append(image)
        scores += await self._predict(setup, to_score)
        return scores, used, len(to_score), skipped


def _read_image(flow: CalibrationFlow, path: Path, record_id: str) -> np.ndarray | None:
    """A record's kept image, or None when retention removed it meanwhile or it no longer decodes."""
    try:
        return flow._decode(path.read_bytes(), f"kept image of inspection {record_id}")
    except (OSError, ApiError):
        return None


__all__ = ["CalibrationFlow", "SentImage", "promise_text"]
