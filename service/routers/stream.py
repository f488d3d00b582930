"""A stream product's bank (MuSc against its recent accepted parts): look at it, empty it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.deps import ApiKeyDep, ServicesDep
from service.schemas import UNAUTHORIZED, StreamDeleted, StreamOut, error_responses

router = APIRouter(prefix="/products", tags=["stream"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)

ProductId = Annotated[str, Path(description="Product id.", examples=["gear"])]
_COMMON = error_responses(
    s404="Unknown product",
    s422=("Invalid request", "invalid_parameters"),
    s503=("musc is not loaded by this service (ZSI_METHODS)", "stream_unavailable"),
)


@router.get(
    "/{product_id}/stream",
    response_model=StreamOut,
    summary="The product's stream bank: size, budget, bytes, oldest/newest time, image hashes",
    description="What the shared store holds for the product's current MuSc model (with Redis: what "
    "every replica scores against). `mode` is `warming_up` until `min_bank` images; `guard` counts the "
    "anomalous answers of the last `guard_window` (a changeover makes everything anomalous: reset).",
    responses=_COMMON,
)
async def get_stream(product_id: ProductId, services: ServicesDep) -> StreamOut:
    return StreamOut(**await services.inspection.stream.status(product_id))


@router.delete(
    "/{product_id}/stream",
    response_model=StreamDeleted,
    summary="Empty the product's stream bank (after a changeover): it warms up again",
    description="Removes every bank image of the product (all MuSc models) and its guard window, and "
    "bumps `epoch`: answers in flight that were scored against the old bank add nothing. The product is "
    "answered by its fallback (`warming_up: true`) until the bank holds `min_bank` images again.",
    responses={
        **error_responses(s404="Unknown product", s422=("Invalid request", "invalid_parameters")),
        **error_responses(
            s503=("Redis is down: the bank was NOT emptied; retry (Retry-After)", "store_unavailable")
        ),
    },
)
async def delete_stream(product_id: ProductId, services: ServicesDep) -> StreamDeleted:
    return StreamDeleted(**await services.inspection.stream.reset(product_id))
