"""Inspection records: list / filter / export, one record, its kept image and overlay, operator review.

Every database call runs in the threadpool. Reads first wait (at most
``ZSI_RECORDS_READ_WAIT_S``) for the background writer to store what was answered
before them, so an answer's record can be read right after it. While the database is
unreachable these endpoints answer 503 ``records_unavailable`` (inspection goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from service.deps import ApiKeyDep, Services, ServicesDep
from service.errors import ApiError
from service.records import RecordService
from service.records.images import MEDIA_TYPES, png16_to_map
from service.records.query import (
    BadCursor,
    RecordFilter,
    RecordNotFound,
    csv_pages,
    get_record,
    kept_paths,
    list_records,
    review_record,
)
from service.records.store import utcnow
from service.schemas import NO_NUL, UNAUTHORIZED, InspectionList, InspectionOut, ReviewIn, error_responses

router = APIRouter(prefix="/inspections", tags=["records"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)
T = TypeVar("T")

RECORD_ID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
InspectionId = Annotated[str, Path(pattern=RECORD_ID, description="The inspection id (UUID).")]
ClientField = Annotated[str | None, Query(max_length=64, pattern=NO_NUL)]
_ERRORS = error_responses(
    s404=("Unknown inspection id", "unknown_inspection", {}),
    s422=("Bad filter or cursor", "invalid_cursor", {}),
    s503=("Records database unreachable (records wait in the journal)", "records_unavailable", {}),
)


def record_filter(
    product: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="Product id.")] = None,
    decision: Annotated[Literal["anomalous", "normal"] | None, Query()] = None,
    review: Annotated[
        Literal["unreviewed", "reviewed", "good", "defect"] | None,
        Query(description="Review state: unreviewed, reviewed (any verdict), good or defect."),
    ] = None,
    outcome: Annotated[
        Literal["answered", "refused"] | None, Query(description="answered (200) or refused (4xx/5xx).")
    ] = None,
    line: ClientField = None,
    station: ClientField = None,
    part_id: ClientField = None,
    since: Annotated[
        datetime | None, Query(description="From this time on (ISO 8601; no zone = UTC).")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Before this time (ISO 8601; no zone = UTC).")
    ] = None,
    min_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    max_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    cached: Annotated[
        bool | None, Query(description="Only cache hits (true) or model passes (false).")
    ] = None,
) -> RecordFilter:
    return RecordFilter(
        product=product,
        decision=decision,
        review=review,
        outcome=outcome,
        line=line,
        station=station,
        part_id=part_id,
        since=since,
        until=until,
        min_score=min_score,
        max_score=max_score,
        cached=cached,
    )


FilterDep = Annotated[RecordFilter, Depends(record_filter)]


def _records(services: Services) -> RecordService:
    if services.records is None or services.records.engine is None:
        raise ApiError(503, "records_unavailable", "inspection records are not running")
    return services.records


def _unavailable(records: RecordService, exc: Exception) -> ApiError:
    return ApiError(
        503,
        "records_unavailable",
        f"the records database ({records.backend}) is unreachable: {type(exc).__name__}; records "
        "made meanwhile wait in the local journal (see GET /ready)",
        headers={"Retry-After": "5"},
        pending=records.pending_records,
    )


async def _db(records: RecordService, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Wait for the writer to catch up (bounded), then run ``fn`` in the threadpool."""
    await run_in_threadpool(records.flush, records.read_wait_s)
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except SQLAlchemyError as exc:
        raise _unavailable(records, exc) from None


def _not_found(inspection_id: str) -> ApiError:
    return ApiError(
        404,
        "unknown_inspection",
        f"no inspection {inspection_id!r} (GET /inspections lists them)",
        id=inspection_id,
    )


@router.get(
    "",
    response_model=InspectionList,
    summary="Inspection records, newest first (filters, cursor pagination)",
    responses=_ERRORS,
)
async def list_inspections(
    services: ServicesDep,
    flt: FilterDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Records per page.")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page.")
    ] = None,
) -> InspectionList:
    records = _records(services)
    assert records.engine is not None
    try:
        items, next_cursor = await _db(records, list_records, records.engine, flt, limit=limit, cursor=cursor)
    except BadCursor as exc:
        raise ApiError(422, "invalid_cursor", str(exc)) from None
    return InspectionList(
        inspections=[InspectionOut.model_validate(i) for i in items], next_cursor=next_cursor
    )


@router.get(
    "/export.csv",
    summary="The filtered records as CSV (streamed, newest first)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}, **_ERRORS},
)
async def export_csv(services: ServicesDep, flt: FilterDep) -> StreamingResponse:
    records = _records(services)
    engine = records.engine
    assert engine is not None
    pages = csv_pages(engine, flt)
    first = await _db(records, next, pages, "")  # a database error is a JSON 503 before the stream starts

    def stream() -> Iterator[str]:
        yield first
        yield from pages

    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        stream(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="inspections-{stamp}.csv"'},
    )


@router.get(
    "/{inspection_id}", response_model=InspectionOut, summary="One inspection record", responses=_ERRORS
)
async def get_inspection(inspection_id: InspectionId, services: ServicesDep) -> InspectionOut:
    records = _records(services)
    try:
        item = await _db(records, get_record, records.engine, inspection_id)
    except RecordNotFound:
        raise _not_found(inspection_id) from None
    return InspectionOut.model_validate(item)


async def _kept(services: Services, inspection_id: str) -> tuple[FilePath, FilePath, dict[str, Any]]:
    """``(image file, map file, record)`` of an inspection that kept them; 404 JSON otherwise."""
    records = _records(services)
    try:
        image_rel, map_rel, item = await _db(records, kept_paths, records.engine, inspection_id)
    except RecordNotFound:
        raise _not_found(inspection_id) from None
    if image_rel is None or map_rel is None:
        raise ApiError(
            404,
            "image_not_kept",
            f"inspection {inspection_id} kept no image: set keep_images on the product (PUT /products/{{id}}) "
            "to keep future ones",
            id=inspection_id,
        )
    image, amap = records.images.path(image_rel), records.images.path(map_rel)
    if not (image.is_file() and amap.is_file()):
        raise ApiError(
            404,
            "image_expired",
            f"the kept files of inspection {inspection_id} were removed by the retention limit "
            "(ZSI_RECORDS_IMAGE_MAX_AGE_DAYS / ZSI_RECORDS_IMAGE_MAX_MB)",
            id=inspection_id,
        )
    return image, amap, item


@router.get(
    "/{inspection_id}/image",
    summary="The kept image (the uploaded bytes) of an inspection",
    response_class=FileResponse,
    responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}}, **_ERRORS},
)
async def get_image(inspection_id: InspectionId, services: ServicesDep) -> FileResponse:
    path, _, _ = await _kept(services, inspection_id)
    media = MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")
    return FileResponse(path, media_type=media, headers={"X-Inspection-Id": inspection_id})


@router.get(
    "/{inspection_id}/overlay.png",
    summary="The kept image with its kept anomaly map overlaid (as POST /inspect?output=png)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_ERRORS},
)
async def get_overlay(inspection_id: InspectionId, services: ServicesDep) -> Response:
    image_path, map_path, item = await _kept(services, inspection_id)
    settings = services.settings

    def render() -> bytes:
        from models.postprocess import overlay_png
        from service.imaging import decode_image
        from service.inspection import DEMO_LABEL

        image = decode_image(
            image_path.read_bytes(), max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
        )
        amap = png16_to_map(map_path.read_bytes())
        label = DEMO_LABEL if item["demo"] else None
        return overlay_png(image, amap, float(item["score"]), threshold=item["threshold"], label=label)

    png = await run_in_threadpool(render)
    return Response(png, media_type="image/png", headers={"X-Inspection-Id": inspection_id})


@router.put(
    "/{inspection_id}/review",
    response_model=InspectionOut,
    summary="Record an operator's verdict (good / defect) on an inspection",
    description="The reviewer comes from the body's `reviewer` or the `X-Operator` header (one is "
    "required). Every verdict is kept (review_history); the record shows the latest.",
    responses={
        **_ERRORS,
        **error_responses(s409=("A refusal has no decision to review", "refused_inspection", {})),
    },
)
async def put_review(
    inspection_id: InspectionId,
    body: ReviewIn,
    services: ServicesDep,
    x_operator: Annotated[
        str | None, Header(max_length=128, description="Who reviews (when the body names no reviewer).")
    ] = None,
) -> InspectionOut:
    records = _records(services)
    reviewer = (body.reviewer or x_operator or "").strip()
    if not reviewer:
        raise ApiError(
            422,
            "reviewer_required",
            "say who reviews: a 'reviewer' field in the body or an X-Operator header",
        )
    try:
        current = await _db(records, get_record, records.engine, inspection_id, with_reviews=False)
    except RecordNotFound:
        raise _not_found(inspection_id) from None
    if current["status"] != 200:
        raise ApiError(
            409,
            "refused_inspection",
            f"inspection {inspection_id} was refused ({current['status']}): it has no decision to review",
            id=inspection_id,
        )
    try:
        item = await _db(
            records,
            review_record,
            records.engine,
            inspection_id,
            verdict=body.verdict,
            note=body.note,
            reviewer=reviewer,
            at=datetime.now(timezone.utc),
        )
    except RecordNotFound:
        raise _not_found(inspection_id) from None
    return InspectionOut.model_validate(item)
