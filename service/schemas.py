"""Request and response bodies (one schema per direction), documented for /docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from prompts import (
    MAX_DATASET_CHARS,
    MAX_EXTRA_STATES,
    MAX_OBJECT_NAME_CHARS,
    MAX_STATE_CHARS,
    StreamConfig,
    ThresholdCalibration,
    TilingSpec,
)
from prompts.saa import MAX_DEFECT_PROMPTS

DEMO_WARNING = "DEMO mode: tiny random-init models; scores are NOT real inspection results"


class Tagged(BaseModel):
    demo: bool = Field(default=False, description="True when the service runs random-init demo models.")
    warning: str | None = Field(default=None, description="Set in demo mode: why the result is not real.")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="Stable machine-readable code (docs/service.md lists them per status).")
    message: str = Field(description="What went wrong and what to do.")


class ErrorBody(BaseModel):
    error: ErrorDetail


#: One example per status, used when a route names none of its own.
_ERROR_EXAMPLES: dict[int, tuple[str, str, dict[str, Any]]] = {
    400: ("not_an_image", "image: not a PNG, JPEG, BMP or TIFF image", {}),
    401: ("unauthorized", "missing or wrong API key: send it in the X-API-Key header", {}),
    404: ("unknown_product", "unknown product 'gear-x'; GET /products lists them", {"product": "gear-x"}),
    409: ("builtin_product", "'bottle' is a built-in product and cannot be deleted", {"product": "bottle"}),
    413: (
        "payload_too_large",
        "the request body is larger than the limit of 20971520 bytes (ZSI_MAX_IMAGE_BYTES)",
        {"max_bytes": 20971520},
    ),
    415: ("unsupported_media_type", "set Content-Type to image/png, image/jpeg, image/bmp or image/tiff", {}),
    422: (
        "invalid_parameters",
        "invalid request: query.output: Input should be 'json' or 'png'",
        {"problems": [{"where": "query.output", "problem": "Input should be 'json' or 'png'"}]},
    ),
    503: ("queue_full", "the winclip queue is full (64 waiting); retry in 2 s", {"retry_after_s": 2}),
    504: ("timeout", "no answer from the winclip model within 30 s", {"timeout_s": 30.0}),
}


def error_responses(
    *statuses: int, **described: str | tuple[str, str] | tuple[str, str, dict[str, Any]]
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: the ErrorBody schema and an example per status.

    ``described`` maps ``"s404"`` to a description, or to (description, code) /
    (description, code, details) when the route's usual code differs from the default.
    """
    out: dict[int | str, dict[str, Any]] = {}
    wanted = {*statuses, *(int(k[1:]) for k in described)}
    for status in sorted(wanted):
        code, message, details = _ERROR_EXAMPLES[status]
        info = described.get(f"s{status}")
        description = "Error"
        if isinstance(info, str):
            description = info
        elif info is not None:
            description, code = info[0], info[1]
            details = info[2] if len(info) > 2 else {}
            message = description
        out[status] = {
            "model": ErrorBody,
            "description": description,
            "content": {
                "application/json": {"example": {"error": {"code": code, "message": message, **details}}}
            },
        }
    return out


#: Every route behind the API key documents its 401.
UNAUTHORIZED = error_responses(s401="Missing or wrong X-API-Key (when ZSI_API_KEY is set)")


class Region(BaseModel):
    x0: int = Field(description="Left pixel column (inclusive).")
    y0: int = Field(description="Top pixel row (inclusive).")
    x1: int = Field(description="Right pixel column (inclusive).")
    y1: int = Field(description="Bottom pixel row (inclusive).")
    area: int = Field(description="Pixels of the region at or above the threshold.")
    max_score: float = Field(description="Highest map value in the region.")
    mean_score: float = Field(description="Mean map value over the region's pixels.")


class AnomalyMapOut(BaseModel):
    png_base64: str = Field(
        description="8-bit grayscale PNG at the input resolution, base64; pixel = round(255 * map value)."
    )
    width: int
    height: int
    min: float = Field(description="Smallest map value (float, before 8-bit rounding).")
    max: float = Field(description="Largest map value (float, before 8-bit rounding).")


class ImageInfo(BaseModel):
    width: int
    height: int
    sha256_16: str = Field(description="Content hash of the decoded pixels (16 hex chars).")


class CalibrationSummary(BaseModel):
    """What a calibrated threshold promises and what it was calibrated with (answers, records)."""

    model_config = ConfigDict(extra="allow")
    method: str
    model: str
    weights: str
    prompt_digest: str
    reference_key: str | None
    n: int = Field(description="Good scores the threshold was set from.")
    target_false_reject_rate: float
    confidence: float | None
    bound: str = Field(description="marginal or pac.")
    guaranteed_false_reject_rate: float
    calibrated_at: str


class InspectResponse(Tagged):
    score: float = Field(
        description="Image anomaly score in [0, 1] (the method's own scale).", examples=[0.73]
    )
    normalized_score: float = Field(
        description="The score mapped to [0, 1] with the product threshold at 0.5 (piecewise linear, "
        "monotone): normalized_score >= 1 - sensitivity exactly when the decision is anomalous.",
        examples=[0.61],
    )
    decision: Literal["anomalous", "normal"] = Field(description="'anomalous' when score >= threshold.")
    threshold: float = Field(
        description="The threshold this answer decided with: the product threshold moved by `sensitivity` "
        "(equal to it at sensitivity 0.5)."
    )
    product_threshold: float = Field(
        description="The product's threshold (calibrated, hand-set, or the generic 0.5 without a product)."
    )
    threshold_source: Literal["generic", "product", "calibrated", "stream_fallback"] = Field(
        description="generic (no product: 0.5), product (the recipe's, set by hand), calibrated "
        "(POST /products/{id}/calibrate; see `calibration`) or stream_fallback (a stream product warming "
        "up: its stream.fallback_threshold)."
    )
    sensitivity: float = Field(
        description="The request's sensitivity in [0, 1]: 0.5 decides at the product threshold, higher "
        "rejects more parts, lower fewer. A calibrated false-reject promise holds for <= 0.5 only."
    )
    calibration: CalibrationSummary | None = Field(
        default=None, description="Provenance of a calibrated product threshold (null otherwise)."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="E.g. the calibration no longer matches the method, model, weights, prompts or golden "
        "set that answered (recalibrate), or a sensitivity above 0.5 on a calibrated threshold.",
    )
    product: str | None = Field(description="Product id, or null for the generic 'object' prompts.")
    method: str = Field(examples=["winclip"])
    model: str = Field(description="Architecture.", examples=["ViT-B-16-plus-240"])
    weights: str = Field(description="Weights tag (or 'random-init').", examples=["laion400m_e31"])
    prompt_digest: str = Field(description="Hash of the exact prompt set used.")
    used_references: bool = Field(description="True when golden images (few-shot) took part.")
    reference_count: int = Field(description="Number of golden images used.")
    image: ImageInfo
    anomaly_map: AnomalyMapOut
    regions: list[Region] = Field(description="Connected regions of the map at or above the threshold.")
    regions_truncated: bool = Field(description="True when more regions existed than listed.")
    batch_size: int = Field(
        description="Images in the forward batch that computed this result (a cache hit: the stored result's)."
    )
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage: decode, references, queue_wait, inference (the whole "
        "batch), model stages of the batch (text, preprocess, encode, score, upsample), render, total. "
        "A tiled product adds model_split, model_tile_batch_<i> (one per batch of tiles), "
        "model_tiles.<stage> (summed over the tile batches) and model_stitch; details.tiling counts "
        "the tiles and batches."
    )
    details: dict[str, Any] = Field(default_factory=dict, description="Method-specific extras.")
    inspection_id: str = Field(
        default="",
        description="Id of this inspection's record (GET /inspections/{id}); also X-Inspection-Id.",
    )
    cached: bool = Field(
        default=False,
        description="True when the result came from the per-image result cache (no model pass; X-Cache: hit).",
    )
    warming_up: bool | None = Field(
        default=None,
        description="Stream products only: true while the bank holds fewer than min_bank images (the "
        "fallback method answered), false when MuSc answered against the bank; null otherwise.",
    )
    bank_size: int | None = Field(
        default=None, description="Stream products only: images in the product's bank after this answer."
    )
    stream: dict[str, Any] | None = Field(
        default=None,
        description="Stream products only: mode, bank_size, scored_against, min_bank, capacity, fallback, "
        "appended (added, duplicate, rejected_anomalous, rejected_margin, skipped_*), store_available, "
        "guard, warnings (docs/musc.md).",
    )


_STATE_RULE = (
    f"at most {MAX_EXTRA_STATES} phrases, each 1-{MAX_STATE_CHARS} characters containing the object "
    "placeholder '{}' exactly once (it is replaced by object_name; every phrase goes into each of "
    "the ensemble's 21 templates)"
)
State = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STATE_CHARS)]


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object_name: str = Field(
        min_length=1,
        max_length=MAX_OBJECT_NAME_CHARS,
        description=f"Noun phrase used in prompts, 1-{MAX_OBJECT_NAME_CHARS} characters, no braces.",
        examples=["metal nut"],
    )
    extra_normal_states: list[State] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_STATES,
        description=f"Extra normal states: {_STATE_RULE}.",
        examples=[["clean {}"]],
    )
    extra_anomalous_states: list[State] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_STATES,
        description=f"Extra anomalous states: {_STATE_RULE}.",
        examples=[["cracked {}"]],
    )
    threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Score at or above which a part is anomalous. Omitted on a calibrated product: the "
        "calibrated threshold and its calibration are kept; another value clears the calibration.",
    )
    default_method: str | None = Field(
        default=None,
        description="Method used when /inspect names none; null/absent = automatic: anomalydino when "
        "the service loads it and the product has golden images for it, else winclip.",
        examples=["winclip"],
    )
    tiling: TilingSpec | None = Field(
        default=None,
        description='High-resolution tiling, e.g. {"tile": 518, "overlap": 64} (input pixels; tile '
        ">= 32, overlap < tile / 2; at most ZSI_MAX_TILES tiles per image); null/absent = off.",
    )
    dataset: str | None = Field(
        default=None, max_length=MAX_DATASET_CHARS, description="Free-form origin label."
    )
    saa: dict[str, Any] | None = Field(
        default=None,
        description=f"SAA+ prompts (METHODS.md section 3; prompts/saa.py): at most {MAX_DEFECT_PROMPTS} "
        "defect_prompts, each a prompt of 1-400 characters and a filter word of 1-80.",
    )
    keep_images: bool = Field(
        default=False, description="Keep inspected images and maps with their records (docs/records.md)."
    )
    stream: StreamConfig | None = Field(
        default=None,
        description="Stream mode (needs default_method 'musc'): MuSc scores each part against the bank of the "
        "last accepted parts; the fallback answers until min_bank. Null = off. docs/musc.md.",
        examples=[{"bank": 32, "min_bank": 8, "fallback": "winclip"}],
    )


class ProductInfo(BaseModel):
    """A product recipe (an item of a list: the demo flags are on the list answer)."""

    id: str
    object_name: str
    dataset: str | None
    extra_normal_states: list[str]
    extra_anomalous_states: list[str]
    threshold: float
    default_method: str | None = Field(description="null = automatic (anomalydino with golden images).")
    tiling: TilingSpec | None = None
    saa: dict[str, Any] | None = None
    keep_images: bool = False
    stream: StreamConfig | None = None
    source: Literal["builtin", "custom", "override"] = Field(
        description="builtin (prompts/), custom (created through the API) or override (PUT on a built-in id)."
    )
    threshold_source: Literal["product", "calibrated"] = Field(
        default="product",
        description="calibrated (set by POST /products/{id}/calibrate; see `calibration`) or product "
        "(set by hand, or the built-in's).",
    )
    calibration: ThresholdCalibration | None = Field(
        default=None, description="Provenance of the calibrated threshold (null: set by hand)."
    )


class ProductOut(Tagged, ProductInfo):
    """One product recipe as a whole answer."""


class ProductList(Tagged):
    products: list[ProductInfo]


class Deleted(Tagged):
    id: str
    deleted: str = Field(description="What was removed: 'custom' product or 'override'.")


class StreamEntryOut(BaseModel):
    hash: str = Field(description="Pixel hash of the bank image (sha256_16 of its /inspect answer).")
    added_at: str = Field(description="When it entered the bank, ISO 8601 UTC.")
    bytes: int = Field(description="Stored bytes of its features.")


class StreamOut(Tagged):
    """A product's stream bank (``GET /products/{id}/stream``)."""

    model_config = ConfigDict(extra="allow")
    product: str
    enabled: bool = Field(description="The product has a 'stream' setting.")
    settings: StreamConfig | None
    mode: Literal["warming_up", "stream", "off"] = Field(
        description="warming_up: fewer than min_bank images (the fallback answers); stream: MuSc answers."
    )
    warming_up: bool
    size: int = Field(description="Images in the bank now.")
    min_bank: int | None
    capacity: int = Field(description="Most images it may hold: min(stream.bank, ZSI_STREAM_MAX_MB / entry).")
    method: str
    model_key: str = Field(
        description="The MuSc features the bank holds (another model starts another bank)."
    )
    bank_key: str | None = Field(description="Hash of the current bank state (records' reference_key).")
    epoch: int = Field(description="Resets so far (DELETE bumps it).")
    bytes: int = Field(description="Stored bytes of the bank.")
    bytes_per_image: int
    budget_bytes: int = Field(
        description="This product's byte budget: capacity x (bytes per image + header)."
    )
    max_bytes: int = Field(description="ZSI_STREAM_MAX_MB in bytes (per product).")
    total_bytes: int | None = Field(description="Bytes of all stream banks in the store (null: unknown).")
    total_budget_bytes: int = Field(description="ZSI_STREAM_TOTAL_MB in bytes.")
    oldest_added_at: str | None
    newest_added_at: str | None
    entries: list[StreamEntryOut] = Field(description="Oldest first.")
    image_hashes: list[str]
    store: str = Field(description="redis (shared by every replica) or files (ZSI_DATA_DIR/stream).")
    store_available: bool = Field(
        description="False: the store is down; this shows this replica's last copy."
    )
    local_copy: int = Field(description="Bank images this replica holds decoded.")
    guard: dict[str, Any] = Field(
        description="Changeover guard: window, seen, anomalous, anomalous_rate, limit, tripped."
    )
    appends_this_replica: dict[str, int] = Field(description="Append results counted by this process.")
    warnings: list[str]


class StreamDeleted(Tagged):
    product: str
    deleted_images: int = Field(description="Bank images removed (every model's bank of the product).")
    epoch: int = Field(description="The new reset count: answers prepared before it add nothing.")


class ReferenceSetOut(BaseModel):
    method: str
    model_key: str = Field(description="method/model/weights that encoded the features.")
    count: int
    image_hashes: list[str]
    stored: bool = Field(default=True, description="False when the stored features expired or are missing.")
    images_kept: int = Field(
        default=0,
        description="Golden images whose uploaded bytes are kept (calibration, append); 0 for a set "
        "uploaded before images were kept.",
    )


class ReferencesOut(Tagged):
    product: str
    sets: list[ReferenceSetOut]


class ReferenceSetCreated(BaseModel):
    """One method's set made (or found) by a golden upload."""

    method: str
    model_key: str = Field(description="What encoded the features (method/model/weights[/size][/tiling]).")
    count: int
    image_hashes: list[str]
    computed: bool = Field(description="False when identical features were already stored (no model work).")
    seconds: float
    added: int = Field(default=0, description="Images this upload added (append: the new ones only).")
    images_kept: int = Field(default=0, description="Golden images whose uploaded bytes are kept.")


class CalibrateIn(BaseModel):
    """``POST /products/{id}/calibrate``: the JSON body, or the multipart field ``config``."""

    model_config = ConfigDict(extra="forbid")
    target_false_reject_rate: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="Largest share of good parts the threshold may reject (alpha). Needs "
        "ceil(1 / alpha) - 1 good images: 99 for 0.01, 19 for 0.05, 9 for 0.1.",
        examples=[0.05],
    )
    confidence: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="PAC variant: with this probability over the draw of the good images, the "
        "threshold's own false-reject rate is <= alpha (needs more images: 230 for 0.01 at 0.9). "
        "Null: the marginal (conformal) bound.",
        examples=[0.9],
    )
    method: str | None = Field(default=None, description="Method to calibrate; default: the product's.")
    use_golden: bool = Field(
        default=True,
        description="Score the product's kept golden images (leave-one-out when the method uses them).",
    )
    include_reviewed: bool = Field(
        default=False,
        description="Add the product's inspection records an operator judged good (and, for the recall, "
        "those judged defect): their stored score when it came from the same method, model, weights, "
        "precision, prompts and golden set, else their kept image scored anew.",
    )


class CalibrationSources(BaseModel):
    golden_leave_one_out: int = Field(
        default=0, description="Golden images scored against the OTHER golden images."
    )
    golden: int = Field(
        default=0, description="Golden images scored without references (method without a set)."
    )
    extra: int = Field(default=0, description="Good images sent with the request (multipart field `good`).")
    reviewed_scores: int = Field(
        default=0, description="Reviewed-good records whose stored score was used as is."
    )
    reviewed_rescored: int = Field(
        default=0, description="Reviewed-good records whose kept image was scored anew."
    )
    reviewed_skipped: int = Field(
        default=0,
        description="Reviewed-good records left out: another setup and no kept image, or a golden image.",
    )


class ScoreSummary(BaseModel):
    n: int
    min: float | None
    median: float | None
    max: float | None


class CalibrationOut(Tagged):
    product: str
    method: str
    model: str
    weights: str
    threshold: float = Field(description="The new product threshold (full precision).")
    previous_threshold: float
    previous_threshold_source: Literal["product", "calibrated"]
    calibration: ThresholdCalibration = Field(description="Stored with the product (GET /products/{id}).")
    sources: CalibrationSources
    good_scores: ScoreSummary
    defect_scores: ScoreSummary = Field(description="Labelled defect images (field `defect`, reviewed).")
    recall: float | None = Field(description="Share of the labelled defect images at or above the threshold.")
    notes: list[str] = Field(default_factory=list, description="What was left out, and why.")
    seconds: float


class ReferencesCreated(Tagged):
    product: str
    method: str = Field(description="The first set's method (the product's default, else anomalydino).")
    model_key: str
    count: int
    image_hashes: list[str]
    computed: bool = Field(
        description="False when identical features were already stored for every method (no model work)."
    )
    seconds: float
    added: int = Field(default=0, description="Images this upload added (append: the new ones only).")
    images_kept: int = Field(default=0, description="Golden images whose uploaded bytes are kept.")
    sets: list[ReferenceSetCreated] = Field(
        default_factory=list, description="One set per method the images were encoded for."
    )


class ReferencesDeleted(Tagged):
    product: str
    deleted_sets: int


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: str
    state: Literal["loaded", "loading", "failed"]


class ModelsOut(Tagged):
    device: str | None
    warnings: list[str] = Field(
        default_factory=list, description="E.g. ZSI_DEVICE=auto fell back to the CPU."
    )
    demo_mode: bool
    cache: str = Field(description="Cache backend in use (e.g. redis+local, local).")
    cache_backend_up: bool
    methods: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(Tagged):
    status: Literal["ready"] = "ready"
    device: str | None = Field(default=None, description="Where the models run (cpu, cuda).")
    warnings: list[str] = Field(
        default_factory=list, description="E.g. ZSI_DEVICE=auto fell back to the CPU."
    )
    methods: dict[str, dict[str, Any]]
    records: dict[str, Any] | None = Field(
        default=None,
        description="Inspection records: state ok / degraded (database unreachable: records wait in "
        "the local journal, inspection goes on) / starting, pending, written, dropped (docs/records.md).",
    )


# ----------------------------------------------------------------- inspection records


class RecordError(BaseModel):
    code: str
    message: str | None


class RecordImage(BaseModel):
    sha256: str | None = Field(description="sha256 of the uploaded bytes (64 hex).")
    bytes: int | None = Field(description="Upload size in bytes.")
    width: int | None
    height: int | None
    kept: bool = Field(
        description="The image and map were kept (product keep_images); see /image, /overlay.png."
    )


class ReviewOut(BaseModel):
    verdict: Literal["good", "defect"]
    note: str | None
    reviewer: str | None
    reviewed_at: str | None = Field(description="ISO 8601, UTC.")


class InspectionOut(BaseModel):
    """One inspection record (an answer, or a refusal with ``status`` and ``error``)."""

    id: str = Field(description="UUIDv7; the answer's inspection_id / X-Inspection-Id.")
    created_at: str = Field(description="ISO 8601, UTC.")
    status: int = Field(description="HTTP status of the answer (200, or the refusal's).")
    error: RecordError | None = None
    output: str
    product: str | None
    recipe_digest: str | None = Field(description="Digest of the product recipe JSON (its version).")
    prompt_digest: str | None
    method: str | None
    model: str | None
    weights: str | None
    precision: str | None
    demo: bool = Field(description="Random-init weights answered: not a real result.")
    reference_key: str | None = Field(description="Content hash of the golden reference set used.")
    reference_count: int
    used_references: bool
    threshold: float | None
    threshold_source: str | None = Field(
        description="calibrated (POST /products/{id}/calibrate), product (the recipe's) or generic (no product)."
    )
    threshold_provenance: dict[str, Any] | None = None
    score: float | None
    normalized_score: float | None = None
    decision: Literal["anomalous", "normal"] | None
    regions: list[Region] | None
    regions_truncated: bool
    cached: bool = Field(description="Answered from the result cache (no model pass).")
    batch_size: int
    stream_mode: str | None = Field(
        default=None, description="Stream products: warming_up (the fallback answered) or stream (MuSc)."
    )
    bank_size: int | None = Field(default=None, description="Stream products: bank images after this answer.")
    timings_ms: dict[str, float] | None
    image: RecordImage
    line: str | None
    station: str | None
    part_id: str | None
    review: ReviewOut | None = Field(description="The latest operator verdict, if any.")
    review_history: list[ReviewOut] | None = Field(
        default=None, description="Every verdict, oldest first (GET /inspections/{id} only)."
    )


class InspectionList(Tagged):
    inspections: list[InspectionOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null at the end."
    )


#: Text without NUL characters (PostgreSQL cannot store them): a 422, not a database error.
NO_NUL = r"^[^\x00]*$"


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: Literal["good", "defect"] = Field(description="The operator's judgement of the part.")
    note: str | None = Field(
        default=None, max_length=2000, pattern=NO_NUL, examples=["scratch is on the label, not the glass"]
    )
    reviewer: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=NO_NUL,
        description="Who reviewed; defaults to the X-Operator header (one of them is required).",
        examples=["j.doe"],
    )
