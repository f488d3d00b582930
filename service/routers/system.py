"""What is loaded: methods, device, weights, demo flag."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ApiKeyDep, ServicesDep
from service.schemas import UNAUTHORIZED, ModelInfo, ModelsOut

router = APIRouter(prefix="/models", tags=["system"], dependencies=[ApiKeyDep], responses=UNAUTHORIZED)


@router.get("", response_model=ModelsOut, summary="Loaded methods, device, weights and demo flag")
async def list_models(services: ServicesDep) -> ModelsOut:
    return ModelsOut(
        device=services.device,
        warnings=services.warnings,
        demo_mode=services.demo,
        cache=services.cache.name,
        cache_backend_up=services.cache.healthy() if services.settings.redis_url else False,
        methods=[ModelInfo(**{**s, "method": m}) for m, s in services.method_states().items()],
    )
