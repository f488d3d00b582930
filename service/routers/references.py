"""Golden (normal) images per product: encoded once into reference features, used by /inspect."""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.tiling import TilingConfig
from prompts import ProductRecipe
from service.deps import ApiKeyDep, LoadedMethod, Services, ServicesDep
from service.errors import ApiError
from service.imaging import decode_image, media_type, read_form, too_large_bytes
from service.inspection import FEW_SHOT_METHOD
from service.references import hashes_of
from service.schemas import (
    UNAUTHORIZED,
    ReferencesCreated,
    ReferencesDeleted,
    ReferenceSetCreated,
    ReferenceSetOut,
    ReferencesOut,
    error_responses,
)
from service.tiling import check_tiles, tiling_config

router = APIRouter(
    prefix="/products", tags=["golden images"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED
)
_COMMON = error_responses(s404="Unknown product", s422=("Invalid request", "invalid_parameters"))
_STORE_DOWN = error_responses(
    s503=("Redis is down: the change was NOT saved; retry (Retry-After)", "store_unavailable")
)

ProductId = Annotated[str, Path(description="Product id.", examples=["bottle"])]
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more normal (defect-free) images of the product",
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/{product_id}/references",
    response_model=ReferencesCreated,
    summary="Register golden (normal) images: the product switches to few-shot",
    description="Multipart, one or more files (field `images`; any file field is taken). The images' "
    "reference features are computed once per method and stored: for `?method=` only, else for EVERY "
    "loaded method that uses golden images (WinCLIP+, AnomalyDINO, MuSc; `sets` lists them, the "
    "top-level fields describe the first: the product's default method, else anomalydino), and the "
    "uploaded bytes are kept (threshold calibration scores them leave-one-out). The upload REPLACES the "
    "product's previous golden set for each of those methods, or with `append=true` ADDS to it (at most "
    "ZSI_MAX_REFERENCE_IMAGES in all; the grown set is re-encoded from the kept images). A product with "
    "`tiling` has its golden images tiled as its inspected images are. An identical set already stored "
    "(by any process sharing the store) is reused without model work (`computed: false`).",
    responses={
        **_COMMON,
        **error_responses(
            s400="Not an image, truncated image, a method without golden images, or more files than "
            "ZSI_MAX_REFERENCE_IMAGES",
            s409=(
                "append=true but the stored set's images were not kept (uploaded before images were kept, "
                "expired or unreadable): upload the whole set again",
                "golden_images_missing",
            ),
            s413="An image over ZSI_MAX_IMAGE_BYTES, or the body over ZSI_MAX_IMAGE_BYTES x "
            "ZSI_MAX_REFERENCE_IMAGES (payload_too_large); an image over ZSI_MAX_IMAGE_PIXELS "
            "(image_too_large), or needing more than ZSI_MAX_TILES tiles of a tiled product "
            "(too_many_tiles)",
            s415="Not multipart/form-data, or an unsupported image format",
            s422=("No image file in the upload, too many images in all, or bad parameters", "missing_image"),
        ),
        **_STORE_DOWN,
    },
    openapi_extra=_UPLOAD_BODY,
)
async def add_references(
    product_id: ProductId,
    request: Request,
    services: ServicesDep,
    method: Annotated[
        str | None,
        Query(description="Only this method; default: every loaded method that uses golden images."),
    ] = None,
    append: Annotated[
        bool,
        Query(
            description="Add these images to the product's golden set (of each method) instead of "
            "replacing it (images already in the set are skipped)."
        ),
    ] = False,
) -> ReferencesCreated:
    settings = services.settings
    recipe, _ = await run_in_threadpool(services.products.get, product_id)
    targets = _target_methods(services, recipe, method)
    tiling = tiling_config(recipe, settings)
    await run_in_threadpool(services.references.check_writable)  # 503 before reading or encoding
    if media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "upload golden images as multipart/form-data (field 'images')"
        )
    form = await read_form(
        request, max_files=settings.max_reference_images, limit_setting="ZSI_MAX_REFERENCE_IMAGES"
    )
    blobs: list[bytes] = []
    images: list[np.ndarray] = []
    try:
        uploads = [(name, v) for name, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise ApiError(422, "missing_image", "no image file in the upload (use field 'images')")
        for i, (_, up) in enumerate(uploads):
            if up.size is not None and up.size > settings.max_image_bytes:
                raise too_large_bytes(settings.max_image_bytes)
            data = await up.read()
            images.append(
                await run_in_threadpool(
                    decode_image,
                    data,
                    max_pixels=settings.max_image_pixels,
                    max_bytes=settings.max_image_bytes,
                    name=f"image {i} ({up.filename or 'unnamed'})",
                )
            )
            blobs.append(data)
    finally:
        await form.close()
    for i, img in enumerate(images):  # 413 before any model work
        check_tiles(int(img.shape[0]), int(img.shape[1]), tiling, settings.max_tiles, f"golden image {i}")
    t0 = time.perf_counter()
    sets = [await _encode_set(services, lm, tiling, recipe, blobs, images, append) for lm in targets]
    first = sets[0]
    return ReferencesCreated(
        product=product_id,
        method=first.method,
        model_key=first.model_key,
        count=first.count,
        image_hashes=first.image_hashes,
        computed=any(s.computed for s in sets),
        seconds=round(time.perf_counter() - t0, 4),
        added=first.added,
        images_kept=first.images_kept,
        sets=sets,
    )


def _target_methods(services: Services, recipe: ProductRecipe, method: str | None) -> list[LoadedMethod]:
    """The loaded methods a golden upload encodes for, the product's default one first.

    ``?method=``: that one (400 if it uses no golden images). Otherwise every loaded method
    that uses them, so that the product can answer few-shot with any of them and its
    automatic default (anomalydino when loaded, docs/service.md) finds its bank; 503 while a
    method of ZSI_METHODS is still loading (its set would be missing), 400 when none uses them.
    """
    if method is not None:
        loaded = services.loaded_method(method)
        if not loaded.detector.supports_references:
            raise ApiError(
                400, "references_not_supported", f"method {loaded.method!r} does not use golden images"
            )
        return [loaded]
    still_loading = [m for m in services.settings.methods if m in services.loading]
    if still_loading:
        raise ApiError(
            503,
            "not_ready",
            f"method(s) {', '.join(still_loading)} still loading; retry shortly (golden images are "
            "encoded for every loaded method)",
            headers={"Retry-After": "2"},
        )
    targets = [lm for lm in services.methods.values() if lm.detector.supports_references]
    if not targets:
        raise ApiError(
            400,
            "references_not_supported",
            f"no loaded method uses golden images (ZSI_METHODS={','.join(services.settings.methods)}); "
            "load winclip or anomalydino",
        )
    first = recipe.default_method or FEW_SHOT_METHOD
    return sorted(targets, key=lambda lm: lm.method != first)


async def _encode_set(
    services: Services,
    loaded: LoadedMethod,
    tiling: TilingConfig | None,
    recipe: ProductRecipe,
    blobs: list[bytes],
    images: list[np.ndarray],
    append: bool,
) -> ReferenceSetCreated:
    """Encode (unless already stored), keep the images of, and index one method's set.

    The model work runs on the method's worker thread; with ``append`` the set grows from
    the method's stored set (its kept images) by the new images.
    """
    t0 = time.perf_counter()
    settings = services.settings
    det = loaded.queue.detector_for(tiling)  # tiled like the product's inspections
    store = services.references
    added = len(images)
    if append:
        blobs, images, added = await _with_kept_set(services, recipe.id, det.model_key, blobs, images)
    if len(images) > settings.max_reference_images:
        raise ApiError(
            422,
            "too_many_images",
            f"the golden set would hold {len(images)} images; at most {settings.max_reference_images} "
            "(ZSI_MAX_REFERENCE_IMAGES)",
            count=len(images),
            max_images=settings.max_reference_images,
        )
    hashes = hashes_of(images)
    key = store.blob_key(det.model_key, recipe.id, hashes)
    stored = await run_in_threadpool(store.has_blob, key)
    services.metrics.cache_lookup("references", stored)
    if not stored:
        refs = await loaded.queue.run_exclusive(det.encode_references, images, product=recipe)
        services.metrics.references_encoded.labels(method=det.method).inc(len(images))
        key = await run_in_threadpool(store.save, recipe.id, det, refs)
        hashes = list(refs.image_hashes)
    kept = await run_in_threadpool(store.save_images, recipe.id, blobs)
    await run_in_threadpool(store.set_index_entry, recipe.id, det, hashes, key, kept)
    return ReferenceSetCreated(
        method=det.method,
        model_key=det.model_key,
        count=len(hashes),
        image_hashes=hashes,
        computed=not stored,
        seconds=round(time.perf_counter() - t0, 4),
        added=added,
        images_kept=len(kept),
    )


async def _with_kept_set(
    services: Services, product_id: str, model_key: str, blobs: list[bytes], images: list[np.ndarray]
) -> tuple[list[bytes], list[np.ndarray], int]:
    """``?append=true``: the stored set's kept images, then the new ones not already in it (by pixels)."""
    entry = (await run_in_threadpool(services.references.index, product_id)).get(model_key)
    if not entry:
        return blobs, images, len(images)
    kept = await run_in_threadpool(services.references.kept_images, product_id, model_key)
    if kept.missing:
        raise ApiError(
            409,
            "golden_images_missing",
            f"cannot append: {kept.missing} image(s) of the stored golden set were not kept (uploaded "
            "before golden images were kept, expired or unreadable); upload the whole set again without append",
            missing=kept.missing,
        )
    settings = services.settings
    old_images = [
        await run_in_threadpool(
            decode_image,
            blob,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            name=f"kept golden image {sha[:12]}",
        )
        for sha, blob in kept.images
    ]
    seen = set(hashes_of(old_images))
    new = [(b, im) for b, im, h in zip(blobs, images, hashes_of(images), strict=True) if h not in seen]
    return (
        [b for _, b in kept.images] + [b for b, _ in new],
        old_images + [im for _, im in new],
        len(new),
    )


@router.get(
    "/{product_id}/references",
    response_model=ReferencesOut,
    summary="The product's golden image sets (count and hashes per method)",
    responses=_COMMON,
)
async def list_references(product_id: ProductId, services: ServicesDep) -> ReferencesOut:
    await run_in_threadpool(services.products.get, product_id)
    index = await run_in_threadpool(services.references.index, product_id)
    sets = []
    for entry in index.values():
        hashes = [str(h) for h in entry.get("image_hashes", [])]
        stored = await run_in_threadpool(services.references.has_blob, str(entry.get("key", "")))
        kept = entry.get("images")
        sets.append(
            ReferenceSetOut(
                method=str(entry.get("method", "")),
                model_key=str(entry.get("model_key", "")),
                count=len(hashes),
                image_hashes=hashes,
                stored=stored,
                images_kept=len(kept) if isinstance(kept, list) else 0,
            )
        )
    return ReferencesOut(product=product_id, sets=sets)


@router.delete(
    "/{product_id}/references",
    response_model=ReferencesDeleted,
    summary="Forget the product's golden images (back to zero-shot)",
    responses={**_COMMON, **_STORE_DOWN},
)
async def delete_references(
    product_id: ProductId,
    services: ServicesDep,
    method: Annotated[str | None, Query(description="Only this method's set; default: all.")] = None,
) -> ReferencesDeleted:
    await run_in_threadpool(services.products.get, product_id)
    n = await run_in_threadpool(services.references.clear, product_id, method)
    return ReferencesDeleted(product=product_id, deleted_sets=n)
