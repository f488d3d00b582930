"""POST /inspect: one camera image in, a score, a decision, a map and regions out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from models.calibration import DEFAULT_SENSITIVITY
from service.deps import ApiKeyDep, Services, ServicesDep
from service.errors import ApiError
from service.imaging import RAW_TYPES, media_type, read_capped, read_form, too_large_bytes
from service.inspection import InspectParams
from service.schemas import InspectResponse, error_responses

router = APIRouter(prefix="/inspect", tags=["inspection"], dependencies=[ApiKeyDep])

#: ``line``, ``station``, ``part_id``: 1-64 characters, a letter or digit first, then letters,
#: digits, space and ``. _ : / # + -`` (safe in CSV exports, logs and file names).
CLIENT_FIELD = r"^[A-Za-z0-9][A-Za-z0-9 ._:/#+\-]{0,63}$"

_BINARY = {"type": "string", "format": "binary"}
_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart upload in field `image`, or the raw bytes as the body "
        "with Content-Type image/png, image/jpeg, image/bmp or image/tiff.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {**_BINARY, "description": "PNG, JPEG, BMP or TIFF file"}},
                }
            },
            **{t: {"schema": _BINARY} for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff")},
        },
    }
}
_ERRORS = error_responses(
    s400=("Empty body, not an image, truncated image", "not_an_image"),
    s401="Missing or wrong X-API-Key (when ZSI_API_KEY is set)",
    s404="Unknown product",
    s413="Body over ZSI_MAX_IMAGE_BYTES (payload_too_large) or image over ZSI_MAX_IMAGE_PIXELS (image_too_large)",
    s415="Unsupported content type or image format",
    s422=("Bad parameters (unknown method, bad output)", "unknown_method"),
    s503="Queue full (Retry-After), loading, or weights missing",
    s504="Not answered before ZSI_REQUEST_TIMEOUT_S",
)


async def read_upload(request: Request, services: Services) -> bytes:
    """The image bytes of a multipart (field ``image``) or raw-body request, size-capped.

    A client that hangs up mid-upload is a refusal (``client_disconnected``, recorded like
    any other), not a server error.
    """
    try:
        return await _read_upload(request, services)
    except ClientDisconnect:
        raise ApiError(
            400, "client_disconnected", "the client closed the connection before the image was read"
        ) from None


async def _read_upload(request: Request, services: Services) -> bytes:
    max_bytes = services.settings.max_image_bytes
    ctype = media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        form = await read_form(request, max_files=1, limit_setting="one image per /inspect request")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422,
                "missing_image",
                "multipart upload without a file in field 'image'",
                fields=list(form.keys()),
            )
        if upload.size is not None and upload.size > max_bytes:
            raise too_large_bytes(max_bytes)
        data = await upload.read()
        await form.close()
        return data
    if ctype in RAW_TYPES or ctype == "application/octet-stream":
        return await read_capped(request.stream(), max_bytes)
    if not ctype:
        body = await read_capped(request.stream(), max_bytes)
        if not body:
            raise ApiError(400, "empty_body", "the request has no body: send an image")
        raise ApiError(
            415,
            "unsupported_media_type",
            "set Content-Type to image/png, image/jpeg, image/bmp or image/tiff",
        )
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {ctype!r} is not accepted; use multipart/form-data (field 'image') or "
        "image/png, image/jpeg, image/bmp, image/tiff",
    )


@router.post(
    "",
    response_model=InspectResponse,
    summary="Inspect one image",
    description="Scores one image of a product. `output=json` (default) answers the score, decision, "
    "anomaly map (8-bit PNG, base64) and regions; `output=png` answers the image with a JET heat map "
    "(fixed 0..1 scale) and the score written on it (headers X-Anomaly-Score, X-Normalized-Score, X-Decision, "
    "X-Threshold, X-Product-Threshold, X-Threshold-Source). `threshold` is the product threshold (calibrated "
    "by POST /products/{id}/calibrate, or hand-set) moved by `sensitivity`. "
    "Every answer is recorded (GET /inspections/{id}; id in `inspection_id` and X-Inspection-Id); a "
    "repeated identical image is answered from the result cache (`cached: true`, X-Cache: hit).",
    responses={200: {"content": {"image/png": {"schema": _BINARY}}}, **_ERRORS},
    openapi_extra=_REQUEST_BODY,
)
async def inspect_image(
    request: Request,
    response: Response,
    services: ServicesDep,
    product: Annotated[
        str | None,
        Query(
            description="Product id (GET /products); omit for generic 'object' prompts.", examples=["bottle"]
        ),
    ] = None,
    method: Annotated[
        str | None,
        Query(description="Detection method; default: the product's, else winclip.", examples=["winclip"]),
    ] = None,
    output: Annotated[Literal["json", "png"], Query(description="json (default) or png overlay.")] = "json",
    line: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=CLIENT_FIELD,
            description="Production line (kept in the record).",
            examples=["L2"],
        ),
    ] = None,
    station: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=CLIENT_FIELD,
            description="Station / camera (kept in the record).",
            examples=["cam-3"],
        ),
    ] = None,
    part_id: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=CLIENT_FIELD,
            description="Part serial or id (kept in the record).",
            examples=["SN-0042"],
        ),
    ] = None,
    sensitivity: Annotated[
        float,
        Query(
            ge=0.0,
            le=1.0,
            description="0.5 (default) decides at the product threshold; higher rejects more parts "
            "(1: every part), lower fewer (0: only scores of 1.0). Anomalous when normalized_score >= "
            "1 - sensitivity. A calibrated false-reject promise holds for sensitivity <= 0.5 only.",
            examples=[0.5],
        ),
    ] = DEFAULT_SENSITIVITY,
) -> Any:
    params = InspectParams(
        product=product,
        method=method,
        output=output,
        line=line,
        station=station,
        part_id=part_id,
        sensitivity=sensitivity,
    )
    ins = await services.inspection.run(params, lambda: read_upload(request, services))
    if ins.png is not None:
        return Response(ins.png, media_type="image/png", headers=ins.headers)
    response.headers.update(ins.headers)
    return ins.body
