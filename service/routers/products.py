"""Product recipes: built-ins from prompts/, plus created ones and overrides (shared store)."""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Path, Response, status
from starlette.concurrency import run_in_threadpool

from prompts import ProductRecipe
from service.deps import ApiKeyDep, ServicesDep
from service.products import threshold_source
from service.schemas import (
    UNAUTHORIZED,
    Deleted,
    ProductIn,
    ProductInfo,
    ProductList,
    ProductOut,
    error_responses,
)

router = APIRouter(prefix="/products", tags=["products"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)
_BAD_ID = error_responses(s422=("Invalid request", "invalid_parameters"))
_STORE_DOWN = error_responses(
    s503=("Redis is down: the change was NOT saved; retry (Retry-After)", "store_unavailable")
)

ProductId = Annotated[
    str, Path(description="Product id (lowercase letters, digits, '_', '-').", examples=["bottle"])
]


def product_out(recipe: ProductRecipe, source: str) -> ProductOut:
    return ProductOut(
        **recipe.model_dump(),
        source=source,  # type: ignore[arg-type]
        threshold_source=threshold_source(recipe),  # type: ignore[arg-type]
    )


def product_info(recipe: ProductRecipe, source: str) -> ProductInfo:
    return ProductInfo(
        **recipe.model_dump(),
        source=source,  # type: ignore[arg-type]
        threshold_source=threshold_source(recipe),  # type: ignore[arg-type]
    )


@router.get("", response_model=ProductList, summary="All products (built-in, created, overridden)")
async def list_products(services: ServicesDep) -> ProductList:
    found = await run_in_threadpool(services.products.list)
    return ProductList(products=[product_info(r, s) for r, s in found])


@router.get(
    "/{product_id}",
    response_model=ProductOut,
    summary="One product recipe",
    responses={**error_responses(s404="Unknown product"), **_BAD_ID},
)
async def get_product(product_id: ProductId, services: ServicesDep) -> ProductOut:
    recipe, source = await run_in_threadpool(services.products.get, product_id)
    return product_out(recipe, source)


@router.put(
    "/{product_id}",
    response_model=ProductOut,
    summary="Create a product, replace a created one, or override a built-in",
    description="201 when created, 200 when replaced. A PUT on a built-in id stores an override "
    "(the built-in file stays untouched; DELETE removes the override). A calibrated threshold "
    "(POST /products/{id}/calibrate) is kept when the body omits `threshold` or repeats the "
    "calibrated value; any other `threshold` is hand-set and clears the calibration.",
    responses={
        201: {"model": ProductOut, "description": "Created"},
        **error_responses(
            s413=(
                "the request body is larger than the limit of 1048576 bytes (ZSI_MAX_JSON_BYTES)",
                "payload_too_large",
                {"max_bytes": 1048576},
            ),
            s422=("Invalid recipe (placeholder, lengths, counts) or product id", "invalid_product"),
        ),
        **_STORE_DOWN,
    },
)
async def put_product(
    product_id: ProductId, body: ProductIn, response: Response, services: ServicesDep
) -> ProductOut:
    recipe, source, created = await run_in_threadpool(
        functools.partial(
            services.products.put,
            product_id,
            body.model_dump(exclude_none=True),
            threshold_given="threshold" in body.model_fields_set,
        )
    )
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return product_out(recipe, source)


@router.delete(
    "/{product_id}",
    response_model=Deleted,
    summary="Delete a created product (and its golden images) or a built-in's override",
    responses={
        **error_responses(s404="Unknown product", s409="Plain built-in product"),
        **_BAD_ID,
        **_STORE_DOWN,
    },
)
async def delete_product(product_id: ProductId, services: ServicesDep) -> Deleted:
    source = await run_in_threadpool(services.products.delete, product_id)
    if source == "custom":
        await run_in_threadpool(services.references.clear, product_id)
        await services.inspection.stream.forget(product_id)  # its stream bank too
    return Deleted(id=product_id, deleted=source)
