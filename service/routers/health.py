"""Liveness and readiness (always open, even with an API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import ServicesDep
from service.errors import error_body
from service.schemas import Health, Ready, error_responses

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The process is alive")
async def health_check() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    summary="Ready when every configured method is loaded",
    responses=error_responses(
        s503=("Loading (Retry-After), or weights missing (with the fetch command)", "not_ready")
    ),
)
async def ready(services: ServicesDep) -> Ready | JSONResponse:
    states = services.method_states()
    records = services.records.status() if services.records is not None else None
    if all(s["state"] == "loaded" for s in states.values()):
        return Ready(methods=states, records=records, device=services.device, warnings=services.warnings)
    failed = {m: s for m, s in states.items() if s["state"] == "failed"}
    if failed:
        fetch = [s["fetch"] for s in failed.values() if s.get("fetch")]
        message = f"not ready: {', '.join(failed)} could not be loaded" + (
            f"; fetch the weights with: {' && '.join(fetch)}" if fetch else ""
        )
        code = (
            "weights_missing"
            if any(s.get("error") == "weights_missing" for s in failed.values())
            else "load_failed"
        )
        headers = None
    else:
        message, code, headers = "not ready: models are loading", "not_ready", {"Retry-After": "2"}
    return JSONResponse(
        error_body(
            code, message, methods=states, records=records, device=services.device, warnings=services.warnings
        ),
        status_code=503,
        headers=headers,
    )
