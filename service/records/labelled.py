"""Reviewed records as labelled data, for calibration and evaluation (no HTTP).

Operators' verdicts (``PUT /inspections/{id}/review``) turn answered inspections into a
labelled set: ``good`` = normal (label 0), ``defect`` = anomalous (label 1).

- Calibration: :func:`good_images` lists the kept images of records an operator judged
  ``good``: extra normal images of the product.
- Evaluation: :func:`reviewed_records` lists every reviewed answered record of a
  product with its label, the score the service gave and the kept image (if any);
  ``anomaly-inspect eval ZSI_DATA_DIR --layout records`` scores the kept images of
  every reviewed product as a labelled set (:mod:`service.evaluation.datasets`).

Both read the records database of the given settings (``ZSI_DATABASE_URL``, else the
SQLite file under ``ZSI_DATA_DIR``) and are blocking: call them from a worker thread
inside the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.records.db import default_url, make_engine
from service.records.models import InspectionRecord

Verdict = Literal["good", "defect"]


@dataclass(frozen=True)
class LabelledRecord:
    """One reviewed inspection.

    Attributes:
        label: 0 for ``good`` (normal), 1 for ``defect`` (anomalous).
        image_path: absolute path of the kept image (the uploaded bytes), or None when the
            product did not keep images or retention removed the file.
        score: the image score the service answered (None for a refusal, never listed here).
        prompt_digest, reference_key, precision: what that score was computed with (with
            method, model and weights: whether the score can stand for the current setup).
        image_sha256: sha256 of the uploaded bytes.
    """

    id: str
    product: str
    verdict: Verdict
    label: int
    score: float | None
    decision: str | None
    threshold: float | None
    method: str | None
    model: str | None
    weights: str | None
    recipe_digest: str | None
    created_at: datetime
    reviewer: str | None
    reviewed_at: datetime | None
    image_path: Path | None
    map_path: Path | None
    prompt_digest: str | None = None
    reference_key: str | None = None
    precision: str | None = None
    image_sha256: str | None = None


def _engine(database_url: str | None, data_dir: str | Path) -> Engine:
    return make_engine(database_url or default_url(data_dir))


def reviewed_records(
    product: str,
    *,
    data_dir: str | Path = "data",
    database_url: str | None = None,
    engine: Engine | None = None,
    verdict: Verdict | None = None,
    method: str | None = None,
    require_image: bool = False,
) -> list[LabelledRecord]:
    """Reviewed answered records of ``product``, oldest first.

    Args:
        data_dir: ``ZSI_DATA_DIR`` (kept images live under ``records/images`` there).
        database_url: ``ZSI_DATABASE_URL``; None = the SQLite file under ``data_dir``.
        engine: an open engine instead of ``database_url`` (not disposed here).
        verdict: only ``good`` or only ``defect``.
        method: only records scored by this method.
        require_image: only records whose kept image is still on disk.
    """
    own = engine is None
    eng = engine if engine is not None else _engine(database_url, data_dir)
    image_root = Path(data_dir).resolve() / "records" / "images"
    r = InspectionRecord
    stmt = select(r).where(r.product == product, r.review_verdict.is_not(None), r.status == 200)
    if verdict is not None:
        stmt = stmt.where(r.review_verdict == verdict)
    if method is not None:
        stmt = stmt.where(r.method == method)
    stmt = stmt.order_by(r.created_at, r.id)
    out: list[LabelledRecord] = []
    try:
        with Session(eng) as s:
            for rec in s.scalars(stmt):
                image = image_root / rec.image_path if rec.image_path else None
                amap = image_root / rec.map_path if rec.map_path else None
                if image is not None and not image.is_file():
                    image = None
                if amap is not None and not amap.is_file():
                    amap = None
                if require_image and image is None:
                    continue
                v: Verdict = "good" if rec.review_verdict == "good" else "defect"
                out.append(
                    LabelledRecord(
                        id=rec.id,
                        product=product,
                        verdict=v,
                        label=0 if v == "good" else 1,
                        score=rec.score,
                        decision=rec.decision,
                        threshold=rec.threshold,
                        method=rec.method,
                        model=rec.model,
                        weights=rec.weights,
                        recipe_digest=rec.recipe_digest,
                        created_at=rec.created_at,
                        reviewer=rec.reviewer,
                        reviewed_at=rec.reviewed_at,
                        image_path=image,
                        map_path=amap,
                        prompt_digest=rec.prompt_digest,
                        reference_key=rec.reference_key,
                        precision=rec.precision,
                        image_sha256=rec.image_sha256,
                    )
                )
    finally:
        if own:
            eng.dispose()
    return out


def reviewed_products(engine: Engine) -> list[str]:
    """Products with at least one reviewed answered record, in name order."""
    r = InspectionRecord
    stmt = (
        select(r.product)
        .where(r.product.is_not(None), r.review_verdict.is_not(None), r.status == 200)
        .distinct()
        .order_by(r.product)
    )
    with Session(engine) as s:
        return [p for p in s.scalars(stmt) if p is not None]


def good_images(
    product: str,
    *,
    data_dir: str | Path = "data",
    database_url: str | None = None,
    engine: Engine | None = None,
    method: str | None = None,
) -> list[Path]:
    """Kept images of ``product`` that an operator judged ``good``: extra normal images for calibration."""
    recs = reviewed_records(
        product,
        data_dir=data_dir,
        database_url=database_url,
        engine=engine,
        verdict="good",
        method=method,
        require_image=True,
    )
    return [r.image_path for r in recs if r.image_path is not None]


__all__ = ["LabelledRecord", "good_images", "reviewed_products", "reviewed_records"]
