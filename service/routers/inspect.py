"""POST /inspect: one camera image in, a score, a decision, a map and regions out."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.base import AnomalyResult, image_hash
from models.postprocess import anomaly_map_png, boxes_above, overlay_png
from prompts import ProductRecipe
from service.deps import ApiKeyDep, Services, ServicesDep
from service.errors import ApiError
from service.imaging import RAW_TYPES, decode_image, media_type, read_capped, too_large_bytes
from service.queue import QueueClosed, QueueFull, QueueTimeout, batch_key
from service.schemas import DEMO_WARNING, ErrorBody, InspectResponse

router = APIRouter(prefix="/inspect", tags=["inspection"], dependencies=[ApiKeyDep])

GENERIC_THRESHOLD = 0.5
DEMO_LABEL = "DEMO: random-init model, not a real result"
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
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Empty body, not an image, truncated image"},
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key (when configured)"},
    404: {"model": ErrorBody, "description": "Unknown product"},
    413: {"model": ErrorBody, "description": "Image over the byte or pixel limit"},
    415: {"model": ErrorBody, "description": "Unsupported content type or image format"},
    422: {"model": ErrorBody, "description": "Bad parameters (unknown method, bad output)"},
    503: {"model": ErrorBody, "description": "Queue full (Retry-After), loading, or weights missing"},
    504: {"model": ErrorBody, "description": "Not answered before ZSI_REQUEST_TIMEOUT_S"},
}


async def read_upload(request: Request, services: Services) -> bytes:
    """The image bytes of a multipart (field ``image``) or raw-body request, size-capped."""
    max_bytes = services.settings.max_image_bytes
    ctype = media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
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


def _render_json(
    result: AnomalyResult, image: np.ndarray, threshold: float, max_regions: int
) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    amap = result.anomaly_map
    boxes = boxes_above(amap, threshold)
    out = {
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
    return out, time.perf_counter() - t0


@router.post(
    "",
    response_model=InspectResponse,
    summary="Inspect one image",
    description="Scores one image of a product. `output=json` (default) answers the score, decision, "
    "anomaly map (8-bit PNG, base64) and regions; `output=png` answers the image with a JET heat map "
    "(fixed 0..1 scale) and the score written on it (headers X-Anomaly-Score, X-Decision, X-Threshold).",
    responses={200: {"content": {"image/png": {"schema": _BINARY}}}, **_ERRORS},
    openapi_extra=_REQUEST_BODY,
)
async def inspect_image(
    request: Request,
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
) -> Any:
    t_start = time.perf_counter()
    settings = services.settings
    recipe: ProductRecipe | None = None
    if product is not None:
        recipe, _ = await run_in_threadpool(services.products.get, product)
    method_name = method or (recipe.default_method if recipe is not None else "winclip")
    loaded = services.loaded_method(method_name)
    det = loaded.detector
    threshold = recipe.threshold if recipe is not None else GENERIC_THRESHOLD

    data = await read_upload(request, services)
    t_read = time.perf_counter()
    image = await run_in_threadpool(
        decode_image, data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
    )
    del data
    t_decode = time.perf_counter()

    references, ref_key = None, None
    if recipe is not None and det.supports_references:
        references, ref_key = await run_in_threadpool(services.references.lookup, recipe.id, det)
        services.metrics.cache_lookup("references", references is not None)
    t_refs = time.perf_counter()

    try:
        result, qinfo = await loaded.queue.submit(
            image,
            key=batch_key(recipe, references, ref_key),
            product=recipe,
            references=references,
            timeout_s=settings.request_timeout_s,
        )
    except QueueFull as exc:
        raise ApiError(
            503,
            "queue_full",
            f"the {method_name} queue is full ({settings.queue_size} waiting); retry in {exc.retry_after_s} s",
            headers={"Retry-After": str(exc.retry_after_s)},
            retry_after_s=exc.retry_after_s,
        ) from None
    except QueueTimeout as exc:
        raise ApiError(504, "timeout", str(exc), timeout_s=settings.request_timeout_s) from None
    except QueueClosed as exc:
        raise ApiError(503, "shutting_down", str(exc), headers={"Retry-After": "5"}) from None
    t_infer = time.perf_counter()

    decision = "anomalous" if result.score >= threshold else "normal"
    stage = services.metrics.stage
    if output == "png":
        label = DEMO_LABEL if det.random_weights else None
        png = await run_in_threadpool(
            overlay_png, image, result.anomaly_map, result.score, threshold=threshold, label=label
        )
        t_end = time.perf_counter()
        stage.labels(method=method_name, stage="render").observe(t_end - t_infer)
        _observe_stages(services, method_name, t_start, t_read, t_decode, t_refs, qinfo, t_end)
        headers = {
            "X-Anomaly-Score": f"{result.score:.6f}",
            "X-Decision": decision,
            "X-Threshold": f"{threshold:.6f}",
            "X-Method": result.method,
            "X-Used-References": str(result.used_references).lower(),
        }
        if det.random_weights or services.demo:
            headers["X-Demo"] = "true"
            headers["X-Warning"] = DEMO_WARNING
        return Response(png, media_type="image/png", headers=headers)

    rendered, render_s = await run_in_threadpool(_render_json, result, image, threshold, settings.max_regions)
    t_end = time.perf_counter()
    stage.labels(method=method_name, stage="render").observe(render_s)
    _observe_stages(services, method_name, t_start, t_read, t_decode, t_refs, qinfo, t_end)
    timings = {
        "read": t_read - t_start,
        "decode": t_decode - t_read,
        "references": t_refs - t_decode,
        "queue_wait": qinfo["queue_wait"],
        "inference": qinfo["inference"],
        **{f"model_{k}": float(v) for k, v in result.timings.items()},
        "render": render_s,
        "total": t_end - t_start,
    }
    body: dict[str, Any] = {
        "score": result.score,
        "decision": decision,
        "threshold": threshold,
        "product": recipe.id if recipe is not None else None,
        "method": result.method,
        "model": result.model,
        "weights": result.weights,
        "prompt_digest": result.prompt_digest,
        "used_references": result.used_references,
        "reference_count": references.count if references is not None else 0,
        **rendered,
        "batch_size": int(qinfo["batch_size"]),
        "timings_ms": {k: round(v * 1000.0, 3) for k, v in timings.items()},
        "details": dict(result.details),
    }
    if det.random_weights or services.demo:
        body["demo"] = True
        body["warning"] = DEMO_WARNING
    return body


def _observe_stages(
    services: Services,
    method: str,
    t_start: float,
    t_read: float,
    t_decode: float,
    t_refs: float,
    qinfo: dict[str, float],
    t_end: float,
) -> None:
    stage = services.metrics.stage
    stage.labels(method=method, stage="read").observe(t_read - t_start)
    stage.labels(method=method, stage="decode").observe(t_decode - t_read)
    stage.labels(method=method, stage="references").observe(t_refs - t_decode)
    stage.labels(method=method, stage="queue_wait").observe(qinfo["queue_wait"])
    stage.labels(method=method, stage="inference").observe(qinfo["inference"])
    stage.labels(method=method, stage="total").observe(t_end - t_start)
