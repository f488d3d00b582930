"""``create_app(settings)``: the FastAPI app factory (``uvicorn service.app:create_app --factory``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from models.base import ArrayCache, Detector, WeightsError
from service.cache import ArrayCacheAdapter, BlobCache, FileStore, LocalCache, RedisCache, ResilientCache
from service.deps import DetectorFactory, LoadedMethod, Services
from service.errors import install_error_handlers
from service.inspection import InspectionFlow
from service.logs import configure_logging
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.products import ProductStore
from service.queue import InferenceQueue
from service.records import RecordService
from service.references import ReferenceStore
from service.result_cache import ResultCache
from service.routers import calibration, health, inspect, inspections, metrics, products, references, system
from service.routers import stream as stream_router
from service.schemas import DEMO_WARNING
from service.settings import Settings, resolve_device

log = logging.getLogger("service")

API_DESCRIPTION = """
Zero-shot industrial anomaly inspection (WinCLIP / WinCLIP+, and the other methods
listed in ZSI_METHODS). Post one camera image to **POST /inspect** with a product id;
register golden (normal) images with **POST /products/{id}/references** to switch that
product to few-shot, and set its threshold from good images at a target false-reject rate with
**POST /products/{id}/calibrate**. Errors are always `{"error": {"code", "message", ...}}`.
"""


#: how the service stores MuSc bank features: float16, half the bytes of the model's exact
#: float32 default (the budgets in docs/musc.md are counted in it; maps within ~2e-3)
MUSC_BANK_DTYPE = "float16"


def storage_options(method: str) -> dict[str, Any]:
    """How the service keeps a method's references (real and demo models alike)."""
    if method == "musc":
        return {"bank_dtype": MUSC_BANK_DTYPE}
    return {}


def method_options(method: str, settings: Settings) -> dict[str, Any]:
    """The service's options of one method (real models only; demo mode keeps the tiny config)."""
    if method == "anomalydino":
        return {"image_size": settings.anomalydino_image_size}
    return storage_options(method)


def default_detector_factory(method: str, *, settings: Settings, device: str, cache: ArrayCache) -> Detector:
    """Demo: the tiny random-init model; otherwise the real one from ``settings.weights_dir``."""
    import models

    if settings.demo:
        return models.load_tiny_detector(method, device=device, cache=cache, **storage_options(method))
    return models.load_detector_from_dir(
        method,
        settings.weights_dir,
        device=device,
        cache=cache,
        precision=settings.precision,
        tower_backend=settings.backend,
        **method_options(method, settings),
    )


def _weights_failure(method: str, settings: Settings, exc: Exception) -> dict[str, Any]:
    from models import method_spec
    from models.weights import fetch_hint, missing_weights

    info: dict[str, Any] = {"method": method, "error": "weights_missing", "message": str(exc)}
    try:
        needed = method_spec(method).required_weights(
            precision=settings.precision, tower_backend=settings.backend
        )
        missing = missing_weights(needed, settings.weights_dir)
        info["missing"] = missing
        info["weights_dir"] = str(settings.weights_dir)
        if missing:
            info["fetch"] = fetch_hint(missing, settings.weights_dir)
    except Exception:  # the message alone still says what to do
        log.debug("could not list missing weights for %s", method, exc_info=True)
    return info


def store_namespace(settings: Settings) -> tuple[str, Path]:
    """(Redis key prefix, data directory): demo mode gets its own, so that products and golden
    images created on random-init models never show up in the real service."""
    if settings.demo:
        return f"{settings.key_prefix}demo:", Path(settings.data_dir) / "demo"
    return settings.key_prefix, Path(settings.data_dir)


def _build_stores(settings: Settings, metrics: Metrics) -> tuple[BlobCache, BlobCache]:
    """(cache for prototypes, durable store for products and references)."""
    local = LocalCache(max_bytes=settings.local_cache_mb * 1024 * 1024)
    if settings.redis_url:
        redis = RedisCache(settings.redis_url, timeout_s=settings.redis_timeout_s)
        metrics.cache_backend_up.set(1)

        def on_state(up: bool) -> None:
            metrics.cache_backend_up.set(1 if up else 0)

        shared = ResilientCache(redis, local, retry_s=settings.redis_retry_s, on_state=on_state)
        return shared, shared.durable()  # writes of user data reach Redis or are refused (503)
    metrics.cache_backend_up.set(0)
    return local, FileStore(store_namespace(settings)[1] / "store")


def _build_records(settings: Settings, metrics: Metrics) -> RecordService:
    """Inspection records: local journal + writer to ZSI_DATABASE_URL (SQLite under ZSI_DATA_DIR by default)."""
    return RecordService(
        settings.data_dir,
        settings.database_url,
        fsync=settings.records_fsync,
        journal_max_bytes=int(settings.records_journal_max_mb * 1024 * 1024),
        batch=settings.records_batch,
        retry_s=settings.records_retry_s,
        db_timeout_s=settings.db_timeout_s,
        auto_migrate=settings.db_auto_migrate,
        image_max_age_s=settings.records_image_max_age_days * 86400.0,
        image_max_bytes=int(settings.records_image_max_mb * 1024 * 1024),
        read_wait_s=settings.records_read_wait_s,
        registry=metrics.registry,
    )


def _build_result_cache(settings: Settings, metrics: Metrics, cache: BlobCache) -> ResultCache | None:
    """Results in Redis (with their own in-process fallback) or in an in-process LRU of their own,
    so large maps never push text prototypes out of the shared local cache."""
    if not settings.result_cache:
        return None
    local = LocalCache(max_bytes=settings.result_cache_mb * 1024 * 1024)
    backend: BlobCache = local
    if isinstance(cache, ResilientCache):
        backend = ResilientCache(cache.primary, local, retry_s=settings.redis_retry_s)
    return ResultCache(
        backend,
        prefix=settings.key_prefix,
        ttl_s=settings.result_cache_ttl_s,
        max_entry_bytes=settings.result_cache_max_entry_kb * 1024,
        on_lookup=lambda hit: metrics.cache_lookup("results", hit),
        on_corrupt=lambda: metrics.cache_corrupt.labels(kind="results").inc(),
    )


async def _load_models(app: FastAPI) -> None:
    services: Services = app.state.services
    settings = services.settings
    try:
        if settings.demo and settings.device == "auto":
            services.device = "cpu"  # tiny random-init models: no GPU start-up for a demo
        else:
            services.device = await asyncio.to_thread(resolve_device, settings.device)
            if settings.device == "auto" and services.device == "cpu":
                note = (
                    "ZSI_DEVICE=auto found no CUDA GPU: running on the CPU (WinCLIP takes seconds "
                    "per image). Check the GPU / driver / CUDA torch, or set ZSI_DEVICE=cpu to choose it."
                )
                services.warnings.append(note)
                log.warning(note)
        for method in settings.methods:
            t0 = time.perf_counter()
            try:
                det = await asyncio.to_thread(
                    services.detector_factory,
                    method,
                    settings=settings,
                    device=services.device,
                    cache=services.array_cache,
                )
            except WeightsError as exc:
                services.failures[method] = _weights_failure(method, settings, exc)
                log.error("method %s not loaded: %s", method, exc)
                continue
            except Exception as exc:
                services.failures[method] = {
                    "method": method,
                    "error": "load_failed",
                    "message": f"{type(exc).__name__}: {exc}",
                }
                log.exception("method %s failed to load", method)
                continue
            finally:
                services.loading.discard(method)
            if settings.demo and not det.random_weights:
                log.warning("ZSI_DEMO is set but %s reports real weights", method)
            q = InferenceQueue(
                det,
                method=method,
                max_batch=settings.max_batch,
                max_wait_s=settings.max_wait_ms / 1000.0,
                max_size=settings.queue_size,
                metrics=services.metrics,
            )
            q.start()
            services.methods[method] = LoadedMethod(method, det, q, time.perf_counter() - t0)
            services.metrics.models_loaded.labels(method=method).set(1)
            log.info("method %s loaded in %.1fs (%s)", method, time.perf_counter() - t0, det.describe())
    finally:
        assert services.loaded is not None
        services.loaded.set()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    services.loaded = asyncio.Event()
    services.loading = set(services.settings.methods)
    if services.settings.demo:
        log.warning(DEMO_WARNING)
    if services.records is not None:
        await asyncio.to_thread(services.records.start)
    loader = asyncio.create_task(_load_models(app), name="load-models")
    try:
        yield
    finally:
        if not loader.done():
            loader.cancel()
        for lm in list(services.methods.values()):
            await lm.queue.close()
        if services.records is not None:
            await asyncio.to_thread(services.records.stop)
        services.inspection.close()
        services.cache.close()
        if services.store is not services.cache:
            services.store.close()


def _swagger_assets() -> Path | None:
    """Swagger UI files shipped by the ``swagger-ui-py`` package (no CDN: lines are often offline)."""
    try:
        import swagger_ui
    except ImportError:
        return None
    static = Path(swagger_ui.__file__).resolve().parent / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


def _local_docs(app: FastAPI, assets: Path, title: str) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-static", StaticFiles(directory=assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui_html() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )


def create_app(
    settings: Settings | None = None, *, detector_factory: DetectorFactory | None = None
) -> FastAPI:
    """Build the app. Nothing connects or loads here: models load in the lifespan hook.

    Args:
        settings: defaults to ``Settings()`` read from the ``ZSI_*`` environment.
        detector_factory: ``factory(method, settings=, device=, cache=) -> Detector`` (tests inject
            their own; default :func:`default_detector_factory`).
    """
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics_ = Metrics()
    cache, store = _build_stores(settings, metrics_)
    key_prefix = store_namespace(settings)[0]
    array_cache = ArrayCacheAdapter(
        cache,
        prefix=f"{key_prefix}arr:",
        ttl_s=settings.cache_ttl_s or None,
        on_lookup=lambda hit: metrics_.cache_lookup("text_prototypes", hit),
        on_corrupt=lambda: metrics_.cache_corrupt.labels(kind="text_prototypes").inc(),
    )

    def corrupt(kind: str) -> None:
        metrics_.cache_corrupt.labels(kind=kind).inc()

    services = Services(
        settings=settings,
        metrics=metrics_,
        cache=cache,
        store=store,
        array_cache=array_cache,
        products=ProductStore(store, prefix=key_prefix, on_corrupt=corrupt),
        references=ReferenceStore(
            store, prefix=key_prefix, ttl_s=settings.reference_ttl_s, on_corrupt=corrupt
        ),
        detector_factory=detector_factory or default_detector_factory,
    )
    services.records = _build_records(settings, metrics_)
    services.result_cache = _build_result_cache(settings, metrics_, cache)
    services.inspection = InspectionFlow(services)
    title = "Zero-shot anomaly inspection" + (" (DEMO: random-init models)" if settings.demo else "")
    assets = _swagger_assets()
    app = FastAPI(
        title=title,
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None if assets else "/docs",
        redoc_url=None,  # ReDoc loads its script from a CDN; lines are often offline: /docs only
    )
    if assets:
        _local_docs(app, assets, title)
    app.state.services = services
    install_error_handlers(app)
    for r in (
        health.router,
        inspect.router,
        inspections.router,
        products.router,
        references.router,
        stream_router.router,
        calibration.router,
        system.router,
        metrics.router,
    ):
        app.include_router(r)
    app.add_middleware(ServiceMiddleware, services=services)
    return app
