"""Prometheus exposition of this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ApiKeyDep, ServicesDep
from service.schemas import UNAUTHORIZED

router = APIRouter(prefix="/metrics", tags=["system"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)


@router.get("", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(services: ServicesDep) -> Response:
    for method, lm in services.methods.items():
        services.metrics.queue_depth.labels(method=method).set(lm.queue.depth)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
