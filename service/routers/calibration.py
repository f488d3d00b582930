"""POST /products/{id}/calibrate: set the product's threshold from good images (service/calibration.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from service.calibration import CalibrationFlow, SentImage
from service.deps import ApiKeyDep, ServicesDep
from service.errors import ApiError
from service.imaging import media_type, read_capped, read_form
from service.schemas import UNAUTHORIZED, CalibrateIn, CalibrationOut, error_responses

router = APIRouter(prefix="/products", tags=["calibration"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)

ProductId = Annotated[str, Path(description="Product id.", examples=["bottle"])]
_CONFIG = CalibrateIn.model_json_schema()  # inline: no route takes it as a typed body
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "JSON (the options; an empty body takes the defaults), or multipart/form-data with "
        "the options as a JSON string in field `config` and extra images in fields `good` (good parts) "
        "and `defect` (defective parts, for the recall).",
        "content": {
            "application/json": {"schema": _CONFIG, "example": {"target_false_reject_rate": 0.05}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "config": {
                            "type": "string",
                            "description": "The JSON options (CalibrateIn)",
                            "example": '{"target_false_reject_rate": 0.05}',
                        },
                        "good": {**_FILES, "description": "Extra good images (PNG, JPEG, BMP, TIFF)"},
                        "defect": {**_FILES, "description": "Labelled defect images (recall only)"},
                    },
                }
            },
        },
    }
}


def _config(raw: bytes | str) -> CalibrateIn:
    try:
        return CalibrateIn.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())) or "body", "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        raise ApiError(422, "invalid_parameters", f"invalid request: {summary}", problems=problems) from None


def _files(form: FormData) -> tuple[list[SentImage], list[SentImage]]:
    sent: dict[str, list[SentImage]] = {"good": [], "defect": []}
    for name, value in form.multi_items():
        if not isinstance(value, UploadFile) or name == "config":
            continue
        if name not in sent:
            raise ApiError(
                422,
                "invalid_parameters",
                f"unknown file field {name!r}: send good images in 'good', defect images in 'defect'",
            )
        label = f"{name} image {len(sent[name])} ({value.filename or 'unnamed'})"
        sent[name].append(SentImage(label, value.read, value.size))
    return sent["good"], sent["defect"]


@router.post(
    "/{product_id}/calibrate",
    response_model=CalibrationOut,
    summary="Set the product's threshold from good images at a target false-reject rate",
    description="Scores the product's golden images (leave-one-out when the method uses them: no image "
    "is scored against itself), the good images sent with the request and, with `include_reviewed`, "
    "the records an operator judged good; sets the threshold just above the k-th smallest good score "
    "(distribution-free bound: a fresh good part is rejected with probability <= the target). The "
    "threshold and its provenance are stored with the product (an override for a built-in) and used "
    "by every /inspect answer. Runs on the method's model worker; takes about one inference per image.",
    responses={
        **error_responses(
            s400="An image is not readable, or more files than ZSI_MAX_CALIBRATION_IMAGES",
            s404="Unknown product",
            s409=(
                "No golden images and no good images sent (no_good_images), a method that needs its own "
                "golden set (anomalydino) without one (references_required), or the product changed "
                "meanwhile (product_changed)",
                "no_good_images",
            ),
            s413="Body over its cap (JSON: ZSI_MAX_JSON_BYTES; multipart: ZSI_MAX_IMAGE_BYTES x "
            "ZSI_MAX_REFERENCE_IMAGES), an image over ZSI_MAX_IMAGE_BYTES or ZSI_MAX_IMAGE_PIXELS",
            s415="Neither JSON nor multipart/form-data",
            s422=(
                "too few good images for the target (too_few_images: n, n_required), scores saturate "
                "(saturated), or bad options",
                "too_few_images",
                {"n": 8, "n_required": 19, "target_false_reject_rate": 0.05},
            ),
            s503="Method loading, Redis down (store_unavailable), or records unreachable (include_reviewed)",
        ),
    },
    openapi_extra=_BODY,
)
async def calibrate(product_id: ProductId, request: Request, services: ServicesDep) -> CalibrationOut:
    await run_in_threadpool(services.products.get, product_id)  # 404 before reading a body
    settings = services.settings
    flow = CalibrationFlow(services)
    ctype = media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        form = await read_form(
            request, max_files=settings.max_calibration_images, limit_setting="ZSI_MAX_CALIBRATION_IMAGES"
        )
        try:
            raw = form.get("config")  # a JSON string, or a JSON file (curl -F config=@options.json)
            text = await raw.read() if isinstance(raw, UploadFile) else raw
            config = _config(text or "{}")
            good, defect = _files(form)
            return await flow.run(product_id, config, good, defect)
        finally:
            await form.close()
    if ctype in ("application/json", ""):
        try:
            body = await read_capped(request.stream(), settings.max_json_bytes)
        except ApiError as exc:
            if exc.code != "payload_too_large":
                raise
            raise ApiError(
                413,
                "payload_too_large",
                f"the request body is larger than the limit of {settings.max_json_bytes} bytes "
                "(ZSI_MAX_JSON_BYTES; send images as multipart/form-data)",
                max_bytes=settings.max_json_bytes,
            ) from None
        return await flow.run(product_id, _config(body))
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {ctype!r} is not accepted; send JSON, or multipart/form-data with a 'config' field "
        "and image files in 'good' / 'defect'",
    )
