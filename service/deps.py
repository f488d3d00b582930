"""Service state and FastAPI dependencies (named aliases, as in the FastAPI template)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from models.base import Detector
from service.cache import ArrayCacheAdapter, BlobCache
from service.errors import ApiError
from service.metrics import Metrics
from service.products import ProductStore
from service.queue import InferenceQueue
from service.references import ReferenceStore
from service.settings import Settings

if TYPE_CHECKING:
    from service.inspection import InspectionFlow
    from service.records import RecordService
    from service.result_cache import ResultCache

#: ``factory(method, settings=..., device=..., cache=...) -> Detector``
DetectorFactory = Callable[..., Detector]


@dataclass
class LoadedMethod:
    method: str
    detector: Detector
    queue: InferenceQueue
    load_seconds: float


@dataclass
class Services:
    """Everything one app instance holds (attached to ``app.state.services``)."""

    settings: Settings
    metrics: Metrics
    cache: BlobCache
    store: BlobCache
    array_cache: ArrayCacheAdapter
    products: ProductStore
    references: ReferenceStore
    detector_factory: DetectorFactory
    device: str | None = None
    methods: dict[str, LoadedMethod] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    loaded: asyncio.Event | None = None
    #: durable inspection records (journal + database writer); None only outside create_app
    records: RecordService | None = None
    #: per-image result cache; None when ZSI_RESULT_CACHE=false
    result_cache: ResultCache | None = None
    #: things an operator must know (e.g. the CPU fallback of ZSI_DEVICE=auto): /ready and /models
    warnings: list[str] = field(default_factory=list)
    #: the inspection flow between the /inspect router and the queues (set by create_app)
    inspection: InspectionFlow = field(init=False)

    @property
    def demo(self) -> bool:
        return self.settings.demo

    def method_states(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for m in self.settings.methods:
            if m in self.methods:
                lm = self.methods[m]
                out[m] = {
                    "state": "loaded",
                    **lm.detector.describe(),
                    "load_seconds": round(lm.load_seconds, 3),
                }
            elif m in self.failures:
                out[m] = {"state": "failed", **self.failures[m]}
            else:
                out[m] = {"state": "loading"}
        return out

    def loaded_method(self, method: str) -> LoadedMethod:
        """The loaded method, or the error that explains why it is not there."""
        if method in self.methods:
            return self.methods[method]
        if method in self.failures:
            f = self.failures[method]
            details = {k: v for k, v in f.items() if k not in ("error", "message")}
            raise ApiError(
                503,
                f.get("error", "method_unavailable"),
                f.get("message", f"{method} failed to load"),
                **details,
            )
        if method in self.settings.methods:
            raise ApiError(
                503,
                "not_ready",
                f"method {method!r} is still loading; retry shortly",
                headers={"Retry-After": "2"},
            )
        from models import list_detectors

        if method not in list_detectors():
            raise ApiError(
                422,
                "unknown_method",
                f"unknown method {method!r}; known: {', '.join(list_detectors())}",
                method=method,
            )
        raise ApiError(
            400,
            "method_not_loaded",
            f"method {method!r} is not loaded by this service (ZSI_METHODS={','.join(self.settings.methods)})",
            method=method,
            loaded=sorted(self.methods),
        )


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Needed when ZSI_API_KEY is set."
)


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    expected = get_services(request).settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send it in the X-API-Key header",
            headers={"WWW-Authenticate": "X-API-Key"},
        )


ApiKeyDep = Depends(require_api_key)
