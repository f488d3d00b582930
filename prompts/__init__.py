"""Prompts as data: the WinCLIP prompt ensemble and per-product recipes.

The JSON files beside this module are the source of truth; this module only
reads and validates them. Nothing here imports torch.

- ``winclip.json``: state words and templates of the compositional prompt ensemble.
- ``products/<dataset>/<id>.json``: one product recipe per file (object name,
  optional extra state words, decision threshold, default method, optional
  high-resolution ``tiling``, and optional per-method sections such as ``saa``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROMPTS_DIR = Path(__file__).resolve().parent
PRODUCTS_DIR = PROMPTS_DIR / "products"

PRODUCT_ID_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
METHODS = ("winclip", "anomalyclip", "saa_plus", "anomalydino", "musc")

#: Bounds of the prompt fields. Every state goes into every one of the ensemble's 21
#: templates, and each prompt is encoded by the text tower on a product's first use:
#: 32 extra states each way is ~7x the built-in ensemble (~1,600 prompts), while
#: thousands of states took minutes. CLIP reads 77 tokens at most anyway.
MAX_EXTRA_STATES = 32
MAX_STATE_CHARS = 120
MAX_OBJECT_NAME_CHARS = 80
MAX_DATASET_CHARS = 80
#: Bounds of a product's tiling (input pixels). Below 32 px no method sees a useful patch;
#: the upper bound only keeps a typo (a tile of 10^9) from reading as "no tiling".
MIN_TILE = 32
MAX_TILE = 16384

#: Largest stream bank (images). A MuSc bank image is ~10.7 MiB of fp16 features for CLIP
#: ViT-L/14 at 518 (~8 MiB for DINOv2 ViT-B/14), and each answer is scored against every bank
#: image (the scoring cost grows linearly with the bank): 64 is ~685 MiB and ~3 TFLOP per answer.
MAX_STREAM_BANK = 64


class PromptFileError(ValueError):
    """A prompt or product file is missing, not JSON, or does not match its schema."""


def _check_state(value: str, max_chars: int | None = None) -> str:
    if value.count("{}") != 1:
        raise ValueError(f"state {value!r} must contain the object placeholder '{{}}' exactly once")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"state {value[:40]!r}... is longer than {max_chars} characters")
    return value


class StreamConfig(BaseModel):
    """Stream mode of a product (``stream``): MuSc against a rolling bank of its recent accepted parts.

    The service keeps the features of the last ``bank`` images it judged normal; until the
    bank holds ``min_bank`` images the ``fallback`` method answers (``warming_up``), and its
    normal answers fill the bank. See docs/musc.md ("In the service").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bank: int = Field(
        default=32,
        ge=2,
        le=MAX_STREAM_BANK,
        description=f"Most images in the bank (the newest accepted parts), 2-{MAX_STREAM_BANK}; also capped "
        "by the byte budget ZSI_STREAM_MAX_MB.",
    )
    min_bank: int = Field(
        default=8,
        ge=2,
        description="Bank images needed before MuSc answers (2..bank); until then the fallback answers "
        "with warming_up: true. Below 8 MuSc averages fewer than 2 nearest images.",
    )
    fallback: str = Field(
        default="winclip", description="Zero-shot method answering while the bank warms up (not musc)."
    )
    fallback_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Threshold of the fallback's answers (its scores are on another scale than MuSc's); "
        "null = the product threshold.",
    )
    accept_margin: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="A normal part enters the bank only when score < threshold x (1 - accept_margin): "
        "0 = every normal part; e.g. 0.2 keeps borderline parts out of the bank.",
    )
    guard_window: int = Field(
        default=50,
        ge=0,
        le=1000,
        description="Changeover guard: the last N decisions of the product are kept; 0 = off.",
    )
    guard_rate: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Warn (answers and GET /products/{id}/stream) when at least this share of the last "
        "guard_window decisions (at least half the window seen) were anomalous.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StreamConfig:
        if self.min_bank > self.bank:
            raise ValueError(f"min_bank ({self.min_bank}) must not exceed bank ({self.bank})")
        if self.fallback not in METHODS or self.fallback == "musc":
            others = ", ".join(m for m in METHODS if m != "musc")
            raise ValueError(f"stream fallback must be one of {others} (a zero-shot method other than musc)")
        return self


class ThresholdCalibration(BaseModel):
    """Where a product's calibrated threshold comes from (``POST /products/{id}/calibrate``).

    The recipe's ``threshold`` equals ``threshold`` while this calibration holds. The
    promise (``promise``) is valid only while the method, model, weights, precision,
    prompts (``prompt_digest``), golden set (``reference_key``) and tiling are the ones
    recorded here; the service warns in every answer where they no longer match.
    Unknown fields are kept (a newer service may record more).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    threshold: float = Field(ge=0.0, le=1.0, description="The calibrated threshold (full precision).")
    method: str = Field(description="Method whose scores were calibrated.")
    model: str = Field(description="Architecture.")
    weights: str = Field(description="Weights tag.")
    precision: str | None = Field(default=None, description="Visual tower precision (ZSI_PRECISION).")
    backend: str | None = Field(default=None, description="Visual tower backend (ZSI_BACKEND).")
    prompt_digest: str = Field(description="Hash of the exact prompt set the scores used.")
    reference_key: str | None = Field(
        default=None, description="Content hash of the golden set the method used (null: none)."
    )
    reference_count: int = Field(default=0, ge=0, description="Golden images in that set.")
    tiling: str | None = Field(
        default=None,
        description="The product's tiling the scores came from (e.g. tile518-overlap64; null: untiled).",
    )
    n: int = Field(ge=1, description="Good scores the threshold was set from.")
    target_false_reject_rate: float = Field(gt=0.0, lt=1.0, description="Requested alpha.")
    confidence: float | None = Field(default=None, description="PAC confidence, null: marginal bound.")
    bound: str = Field(description="marginal (conformal, on average) or pac (with `confidence`).")
    rank: int = Field(description="k: the threshold sits just above the k-th smallest good score.")
    order_statistic: float = Field(description="That score, s_(k).")
    guaranteed_false_reject_rate: float = Field(description="(n + 1 - k) / (n + 1) <= target.")
    calibration_false_reject_rate: float = Field(description="Share of the n good scores >= threshold.")
    n_required: int = Field(description="Fewest good images this target (and confidence) needs.")
    promise: str = Field(description="What is promised, in words.")
    sources: dict[str, int] = Field(
        default_factory=dict, description="Good scores per source (golden_leave_one_out, golden, extra, ...)."
    )
    recall: float | None = Field(default=None, description="Share of labelled defect images caught.")
    n_defect: int = Field(default=0, ge=0, description="Labelled defect images the recall is from.")
    random_weights: bool = Field(default=False, description="True: calibrated on random-init (demo) scores.")
    calibrated_at: str = Field(description="ISO 8601, UTC.")


class TilingSpec(BaseModel):
    """High-resolution tiling of a product's images (``tiling``), in pixels of the input image.

    Each image is cut into ``tile x tile`` tiles sharing at least ``overlap`` pixels; every
    tile is inspected as an image of its own, the maps are blended back at the input
    resolution and the image score is the highest tile score (``models.tiling``). The
    product's golden images are tiled the same way. ``overlap`` stays below half a tile, so
    a pixel is covered by at most two tiles per axis.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile: int = Field(
        ge=MIN_TILE,
        le=MAX_TILE,
        description=f"Tile side in input pixels ({MIN_TILE}-{MAX_TILE}); for AnomalyDINO about its "
        "image_size (448), for WinCLIP 240-518. A tile at least as large as the image = no tiling.",
        examples=[518],
    )
    overlap: int = Field(
        default=0,
        ge=0,
        description="Pixels shared by neighbouring tiles (0 <= overlap < tile / 2); the maps cross-fade "
        "linearly over it.",
        examples=[64],
    )

    @model_validator(mode="after")
    def _overlap_below_half(self) -> TilingSpec:
        if 2 * self.overlap >= self.tile:
            raise ValueError(f"tiling overlap ({self.overlap}) must be less than half the tile ({self.tile})")
        return self


class ProductRecipe(BaseModel):
    """A product: what the camera sees and how to judge it.

    ``extra_*_states`` are added to the WinCLIP state lists (each must contain ``{}``
    once, which is replaced by ``object_name``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        pattern=PRODUCT_ID_PATTERN, description="Product id, lowercase letters, digits, '_' or '-'."
    )
    object_name: str = Field(
        min_length=1,
        max_length=MAX_OBJECT_NAME_CHARS,
        description="Noun phrase used in prompts, e.g. 'metal nut' (no braces).",
    )
    dataset: str | None = Field(
        default=None,
        max_length=MAX_DATASET_CHARS,
        description="Origin of a built-in recipe (mvtec_ad, visa) or null.",
    )
    extra_normal_states: tuple[str, ...] = Field(
        default=(),
        max_length=MAX_EXTRA_STATES,
        description=f"Extra normal state phrases, e.g. 'clean {{}}': at most {MAX_EXTRA_STATES}, "
        f"each 1-{MAX_STATE_CHARS} characters with the object placeholder '{{}}' exactly once.",
    )
    extra_anomalous_states: tuple[str, ...] = Field(
        default=(),
        max_length=MAX_EXTRA_STATES,
        description=f"Extra anomalous state phrases, e.g. 'cracked {{}}': at most {MAX_EXTRA_STATES}, "
        f"each 1-{MAX_STATE_CHARS} characters with the object placeholder '{{}}' exactly once.",
    )
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Score at or above which a part is anomalous."
    )
    default_method: str | None = Field(
        default=None,
        description="Method used when a request names none; null = automatic: anomalydino when the "
        "service loads it and the product has golden images for it, else winclip (docs/service.md).",
    )
    tiling: TilingSpec | None = Field(
        default=None,
        description='High-resolution tiling of every image, e.g. {"tile": 518, "overlap": 64}; '
        "null = off (the method sees the whole image at its input size).",
    )
    saa: dict[str, Any] | None = Field(
        default=None, description="SAA+ prompts for this product (see METHODS.md section 3)."
    )
    keep_images: bool = Field(
        default=False,
        description="Keep each inspected image and its anomaly map on disk with the inspection record "
        "(under the records retention limits, docs/records.md).",
    )
    stream: StreamConfig | None = Field(
        default=None,
        description="Stream mode (MuSc against the product's recent accepted parts; needs "
        "default_method 'musc'); null = off. See docs/musc.md.",
    )
    calibration: ThresholdCalibration | None = Field(
        default=None,
        description="Provenance of a calibrated threshold (set by POST /products/{id}/calibrate); "
        "null when the threshold was set by hand.",
    )

    @field_validator("extra_normal_states", "extra_anomalous_states")
    @classmethod
    def _states_have_placeholder(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for v in values:
            _check_state(v, MAX_STATE_CHARS)
        return values

    @field_validator("default_method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        if value is not None and value not in METHODS:
            raise ValueError(f"default_method must be one of {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _stream_needs_musc(self) -> ProductRecipe:
        if self.stream is not None and self.default_method != "musc":
            raise ValueError(
                "a stream product is answered by musc: set default_method to 'musc' "
                f"(got {self.default_method!r}), or drop 'stream'"
            )
        if self.stream is not None and self.tiling is not None:
            # a stream bank holds whole-image features; tiles of one image would score each other
            raise ValueError("'stream' and 'tiling' cannot be combined: drop one of them")
        return self

    @field_validator("object_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("object_name must not contain braces")
        return value.strip()


@dataclass(frozen=True)
class PromptEnsemble:
    """WinCLIP state words and templates (immutable)."""

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]
    default_object_name: str = "object"

    def with_extra_states(self, normal: Iterable[str] = (), anomalous: Iterable[str] = ()) -> PromptEnsemble:
        return PromptEnsemble(
            normal_states=self.normal_states + tuple(normal),
            anomalous_states=self.anomalous_states + tuple(anomalous),
            templates=self.templates,
            default_object_name=self.default_object_name,
        )

    def build(self, object_name: str | None) -> tuple[list[str], list[str]]:
        """Every state in every template: ``(normal_prompts, anomalous_prompts)``."""
        name = object_name or self.default_object_name
        normal = [t.format(s.format(name)) for s in self.normal_states for t in self.templates]
        anomalous = [t.format(s.format(name)) for s in self.anomalous_states for t in self.templates]
        return normal, anomalous

    def digest(self, object_name: str | None) -> str:
        """Content hash of the exact prompt lists for ``object_name`` (16 hex chars)."""
        normal, anomalous = self.build(object_name)
        payload = json.dumps({"normal": normal, "anomalous": anomalous}, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PromptFileError(f"prompt file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}: not valid JSON ({exc})") from exc


def parse_ensemble(doc: Mapping[str, Any], source: str = "<data>") -> PromptEnsemble:
    try:
        normal = tuple(_check_state(s) for s in doc["normal_states"])
        anomalous = tuple(_check_state(s) for s in doc["anomalous_states"])
        templates = tuple(doc["templates"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PromptFileError(f"{source}: invalid prompt ensemble: {exc}") from exc
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise PromptFileError(f"{source}: template {t!r} must contain '{{}}' exactly once")
    if not normal or not anomalous or not templates:
        raise PromptFileError(f"{source}: states and templates must not be empty")
    return PromptEnsemble(normal, anomalous, templates, str(doc.get("default_object_name", "object")))


@lru_cache(maxsize=1)
def winclip_ensemble() -> PromptEnsemble:
    """The reference WinCLIP prompt ensemble from ``prompts/winclip.json``."""
    path = PROMPTS_DIR / "winclip.json"
    return parse_ensemble(_read_json(path), str(path))


def parse_product(doc: Any, source: str = "<data>") -> ProductRecipe:
    """Validate a product document; raises :class:`PromptFileError` naming the bad field."""
    if not isinstance(doc, Mapping):
        raise PromptFileError(f"{source}: a product file must hold a JSON object")
    try:
        recipe = ProductRecipe.model_validate(dict(doc))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise PromptFileError(f"{source}: invalid product recipe: {problems}") from exc
    if recipe.saa is not None:
        _validate_saa_section(recipe, source)
    return recipe


def _validate_saa_section(recipe: ProductRecipe, source: str) -> None:
    """Hook for the SAA+ section schema (defined beside the SAA+ method)."""
    try:
        from prompts.saa import validate_saa_section  # local import: optional schema module
    except ImportError:
        return
    try:
        validate_saa_section(recipe.saa or {})
    except ValueError as exc:
        raise PromptFileError(f"{source}: invalid saa section: {exc}") from exc


def load_product_file(path: str | Path) -> ProductRecipe:
    path = Path(path)
    recipe = parse_product(_read_json(path), str(path))
    if recipe.id != path.stem:
        raise PromptFileError(f"{path}: id {recipe.id!r} does not match the file name {path.stem!r}")
    return recipe


@lru_cache(maxsize=1)
def builtin_products() -> dict[str, ProductRecipe]:
    """All built-in product recipes, by id (scans ``prompts/products/*/*.json``)."""
    found: dict[str, ProductRecipe] = {}
    for path in sorted(PRODUCTS_DIR.glob("*/*.json")):
        recipe = load_product_file(path)
        if recipe.id in found:
            raise PromptFileError(f"{path}: duplicate product id {recipe.id!r}")
        found[recipe.id] = recipe
    return found


def get_builtin_product(product_id: str) -> ProductRecipe:
    try:
        return builtin_products()[product_id]
    except KeyError:
        raise KeyError(f"unknown product {product_id!r}") from None


def ensemble_for(recipe: ProductRecipe | None) -> PromptEnsemble:
    """The WinCLIP ensemble extended with a recipe's extra states."""
    base = winclip_ensemble()
    if recipe is None:
        return base
    return base.with_extra_states(recipe.extra_normal_states, recipe.extra_anomalous_states)


def is_valid_product_id(product_id: str) -> bool:
    return re.fullmatch(PRODUCT_ID_PATTERN, product_id) is not None


__all__ = [
    "MAX_DATASET_CHARS",
    "MAX_EXTRA_STATES",
    "MAX_OBJECT_NAME_CHARS",
    "MAX_STATE_CHARS",
    "MAX_STREAM_BANK",
    "MAX_TILE",
    "METHODS",
    "MIN_TILE",
    "PRODUCTS_DIR",
    "PROMPTS_DIR",
    "ProductRecipe",
    "PromptEnsemble",
    "PromptFileError",
    "StreamConfig",
    "ThresholdCalibration",
    "TilingSpec",
    "builtin_products",
    "ensemble_for",
    "get_builtin_product",
    "is_valid_product_id",
    "load_product_file",
    "parse_ensemble",
    "parse_product",
    "winclip_ensemble",
]
