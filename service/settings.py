"""Service settings: environment variables with the ``ZSI_`` prefix (pydantic-settings)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; read from ``ZSI_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="ZSI_", env_file=".env", extra="ignore")

    weights_dir: Path = Field(default=Path("weights"), description="Directory with the checkpoint files.")
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ZSI_REDIS_URL", "REDIS_URL", "redis_url"),
        description="redis://host:port/db; unset = in-process LRU cache and ZSI_DATA_DIR files.",
    )
    key_prefix: str = Field(default="zsi:", description="Prefix of every Redis key this service writes.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available.")
    methods: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("winclip",), description="Comma list of methods loaded at startup."
    )
    demo: bool = Field(
        default=False,
        description="Tiny random-init models on the CPU; every answer labelled demo; products and "
        "golden images kept apart (key prefix + 'demo:', ZSI_DATA_DIR/demo).",
    )
    api_key: SecretStr | None = Field(default=None, description="When set, requests need header X-API-Key.")
    data_dir: Path = Field(
        default=Path("data"), description="Where products/references persist without Redis."
    )
    cache_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="TTL of cached text prototypes; 0 = none."
    )
    reference_ttl_s: int = Field(default=0, ge=0, description="TTL of stored reference features; 0 = none.")
    local_cache_mb: int = Field(default=256, ge=1, description="Budget of the in-process LRU cache.")
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Redis socket (connect) timeout.")
    redis_retry_s: float = Field(
        default=5.0, ge=0, description="Seconds before retrying a Redis that failed."
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="Largest inference batch.")
    max_wait_ms: float = Field(default=5.0, ge=0, description="How long a batch waits for more requests.")
    queue_size: int = Field(default=64, ge=1, description="Waiting requests per method before 503.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one inference request.")
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Largest image, and largest /inspect request body (multipart framing included).",
    )
    max_json_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest body of the JSON routes (PUT /products/{id})."
    )
    max_image_pixels: int = Field(default=40_000_000, ge=4, description="Largest image (width x height).")
    max_reference_images: int = Field(
        default=32,
        ge=1,
        description="Most golden images of a product's set (per upload, and in total with ?append=true); "
        "the golden-upload and calibration body cap is ZSI_MAX_IMAGE_BYTES x this.",
    )
    max_calibration_images: int = Field(
        default=256, ge=1, description="Most extra images (good + defect) sent with one calibration request."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="Visual tower precision.")
    backend: Literal["torch", "onnx"] = Field(default="torch", description="Visual tower backend.")
    max_regions: int = Field(default=100, ge=0, description="Most regions listed in an /inspect answer.")
    # -- AnomalyDINO and high-resolution tiling (docs/anomalydino.md) --
    anomalydino_image_size: int = Field(
        default=448,
        ge=28,
        le=1344,
        description="AnomalyDINO input size: each image's SHORTER side is resized to it, aspect kept "
        "(anomalib's int image_size; a 2448x2048 (width x height) image at 448 becomes 535x448). The "
        "paper's 448 (default); 252 faster, coarser; 672 finer, ~2.3x the tokens of 448. Part of the "
        "banks' model key (.../short448): after a change, golden images are encoded again on their next "
        "upload. Demo mode keeps the tiny model's own size (shorter side 56).",
    )
    max_tiles: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Most tiles per image of a tiled product (413 too_many_tiles beyond); a 2448x2048 "
        'image is 30 tiles at {"tile": 518, "overlap": 64}, 42 at {"tile": 448, "overlap": 64}.',
    )
    tile_batch: int = Field(
        default=8, ge=1, le=256, description="Tiles per model call of a tiled product (memory bound)."
    )
    # -- inspection records (docs/records.md) --
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the records database (postgresql://user:pw@host/db); "
        "unset = SQLite file ZSI_DATA_DIR/records/inspections.db.",
    )
    db_auto_migrate: bool = Field(
        default=True, description="Run the Alembic migrations at start (else: anomaly-inspect db upgrade)."
    )
    db_timeout_s: float = Field(default=3.0, gt=0, description="Connect timeout of the records database.")
    records_fsync: bool = Field(
        default=True,
        description="fsync the local journal before answering (off: survives a process kill only).",
    )
    records_journal_max_mb: float = Field(
        default=256.0, gt=0, description="Records kept in the local journal while the database is down."
    )
    records_batch: int = Field(default=256, ge=1, description="Most records per database transaction.")
    records_retry_s: float = Field(default=5.0, gt=0, description="Longest wait between database retries.")
    records_read_wait_s: float = Field(
        default=2.0, ge=0, description="How long a records read waits for the writer to catch up."
    )
    records_image_max_age_days: float = Field(
        default=30.0, ge=0, description="Kept images/maps older than this are removed; 0 = no age limit."
    )
    records_image_max_mb: float = Field(
        default=2048.0, ge=0, description="Kept images/maps beyond this total are removed, oldest first."
    )
    # -- per-image result cache --
    result_cache: bool = Field(default=True, description="Answer repeated identical images from the cache.")
    result_cache_ttl_s: int = Field(default=3600, ge=1, description="TTL of a cached result.")
    result_cache_mb: int = Field(default=64, ge=1, description="In-process budget of cached results.")
    result_cache_max_entry_kb: int = Field(
        default=4096, ge=1, description="Results whose stored map is larger are not cached."
    )
    # -- stream mode (MuSc against each product's recent accepted parts; docs/musc.md) --
    stream_max_mb: float = Field(
        default=512.0,
        gt=0,
        description="Byte budget of ONE stream product's bank (fp16 features, one key per image): it holds at "
        "most min(stream.bank, this / bytes per image) images, the oldest evicted first. 512 MiB = 47 "
        "CLIP ViT-L/14@518 images (10.7 MiB each) or 63 DINOv2 ViT-B/14 (8.0 MiB).",
    )
    stream_total_mb: float = Field(
        default=4096.0,
        gt=0,
        description="Budget of ALL stream banks together in the shared store (an append that would exceed "
        "it is skipped, counted and warned about), and of the decoded bank copies each replica keeps in RAM.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the service's own loggers (third-party ones: WARNING)."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("methods", mode="before")
    @classmethod
    def _split_methods(cls, value: object) -> object:
        if isinstance(value, str):
            value = [m.strip() for m in value.split(",")]
        if isinstance(value, (list, tuple)):
            out = tuple(dict.fromkeys(str(m).strip() for m in value if str(m).strip()))
            if not out:
                raise ValueError("ZSI_METHODS must name at least one method")
            return out
        return value

    @field_validator("redis_url", "database_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        """A URL SQLAlchemy can parse, with an installed driver: refused at start, clearly."""
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        from service.records.db import normalize_url

        example = "postgresql://user:password@host:5432/dbname or sqlite:////path/inspections.db"
        try:
            url = make_url(normalize_url(value))
            url.get_dialect().import_dbapi()
        except ArgumentError:
            raise ValueError(f"ZSI_DATABASE_URL is not a database URL; expected {example}") from None
        except (NoSuchModuleError, ImportError) as exc:
            raise ValueError(
                f"ZSI_DATABASE_URL: no driver for this database ({exc}); this service installs the "
                f"PostgreSQL driver (psycopg 3) and SQLite: {example}"
            ) from None
        return value


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when the installed torch sees a GPU, else ``cpu`` (torch imported lazily)."""
    if device != "auto":
        return device
    try:
        torch = importlib.import_module("torch")
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
