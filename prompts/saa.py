"""SAA+ prompts as data: the ``saa`` section of a product file, and the resolved prompt set.

A product file may carry a ``saa`` object (METHODS.md section 3)::

    "saa": {
      "object_prompt": "carpet",
      "object_count": 1,
      "max_anomalies": 5,
      "max_area_ratio": 0.9,
      "defect_prompts": [{"prompt": "black hole", "filter": "carpet"}]
    }

- ``object_prompt``: caption that finds the object itself (default: the product's
  ``object_name``). It gives the object area for the area-ratio property prompt.
- ``object_count`` (N), ``max_anomalies`` (K), ``max_area_ratio`` (r): property prompts.
- ``min_object_overlap``: the share of a defect box that must lie inside a detected
  object box (the IoU-with-object filter the reference code leaves out; 0 disables it).
- ``defect_prompts``: product-specific language prompts, each with its filter word:
  a box whose phrase contains the filter word names the object, not a defect, and is
  dropped. A prompt may hold several phrases separated by ``.`` (one detector pass).
- ``use_general_prompts``: also use ``defect on {obj}``, ``damage on {obj}``,
  ``flaw on {obj}`` (filter word: the object name). Default true.
- ``box_threshold`` / ``text_threshold``: GroundingDINO thresholds (default 0.1).

Nothing here imports torch. :func:`resolve_saa_prompts` turns (object name, section)
into an immutable :class:`SaaPromptSet`; its :meth:`SaaPromptSet.digest` names the
exact prompts a request used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

GENERAL_DEFECT_TEMPLATES: tuple[str, ...] = ("defect on {}", "damage on {}", "flaw on {}")
DEFAULT_OBJECT_NAME = "object"
DEFAULT_BOX_THRESHOLD = 0.1
DEFAULT_TEXT_THRESHOLD = 0.1
DEFAULT_OBJECT_COUNT = 1
DEFAULT_MAX_ANOMALIES = 5
DEFAULT_MAX_AREA_RATIO = 0.9
DEFAULT_MIN_OBJECT_OVERLAP = 0.5
#: Each defect prompt costs one GroundingDINO pass per image (built-ins use at most 6).
MAX_DEFECT_PROMPTS = 16


class SaaDefectPrompt(BaseModel):
    """One language prompt and its filter word."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=400, description="Caption, e.g. 'black hole. thread.'")
    filter: str = Field(min_length=1, max_length=80, description="Word naming the object, e.g. 'carpet'.")

    @field_validator("prompt", "filter")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip(" ."):
            raise ValueError("must contain a word")
        return value


class SaaSection(BaseModel):
    """Schema of the ``saa`` section of a product file (all keys optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    object_prompt: str | None = Field(default=None, min_length=1, max_length=80)
    object_count: int = Field(default=DEFAULT_OBJECT_COUNT, ge=1, le=1000)
    max_anomalies: int = Field(default=DEFAULT_MAX_ANOMALIES, ge=1, le=1000)
    max_area_ratio: float = Field(default=DEFAULT_MAX_AREA_RATIO, gt=0.0, le=1.0)
    min_object_overlap: float = Field(default=DEFAULT_MIN_OBJECT_OVERLAP, ge=0.0, le=1.0)
    use_general_prompts: bool = True
    defect_prompts: tuple[SaaDefectPrompt, ...] = Field(
        default=(),
        max_length=MAX_DEFECT_PROMPTS,
        description=f"At most {MAX_DEFECT_PROMPTS}: each is one GroundingDINO pass per image.",
    )
    box_threshold: float = Field(default=DEFAULT_BOX_THRESHOLD, ge=0.0, lt=1.0)
    text_threshold: float = Field(default=DEFAULT_TEXT_THRESHOLD, ge=0.0, lt=1.0)
    note: str | None = Field(
        default=None, max_length=400, description="Free text: where the values come from."
    )


def parse_saa_section(d: Mapping[str, Any] | None) -> SaaSection:
    """Validate a ``saa`` section; raises ``ValueError`` naming the bad key."""
    if d is None:
        return SaaSection()
    if not isinstance(d, Mapping):
        raise ValueError("the saa section must be a JSON object")
    try:
        section = SaaSection.model_validate(dict(d))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(problems) from None
    if not section.use_general_prompts and not section.defect_prompts:
        raise ValueError("defect_prompts must not be empty when use_general_prompts is false")
    return section


def validate_saa_section(d: dict[str, Any]) -> None:
    """Raise ``ValueError`` with a clear message if ``d`` is not a valid ``saa`` section."""
    parse_saa_section(d)


def normalize_caption(text: str) -> str:
    """GroundingDINO caption form: lower case, ``_`` as a space, stripped, ending in ``.``.

    The reference passes names such as ``metal_nut`` verbatim; BERT splits the
    underscore into its own token, so such captions and filter words never match
    the object. We write them with spaces.
    """
    caption = " ".join(text.replace("_", " ").lower().split())
    if not caption.endswith("."):
        caption += "."
    return caption


def normalize_filter_word(text: str) -> str:
    """Filter word form: lower case, ``_`` as a space, single spaces, no trailing ``.``."""
    return " ".join(text.replace("_", " ").lower().split()).strip(" .")


@dataclass(frozen=True)
class SaaPromptSet:
    """The exact SAA+ prompts of one request (immutable).

    Attributes:
        object_name: name used in the general prompts.
        object_caption: caption that detects the object (normalised).
        defect_prompts: ``(caption, filter word)`` pairs, general ones first.
        object_count: N; the largest object box may cover at most 1/N of the image.
        max_anomalies: K, masks kept by the confidence prompt.
        max_area_ratio: r, a defect box must be smaller than r * object area.
        min_object_overlap: share of a defect box that must lie inside an object box.
        box_threshold / text_threshold: GroundingDINO thresholds.
    """

    object_name: str
    object_caption: str
    defect_prompts: tuple[tuple[str, str], ...]
    object_count: int = DEFAULT_OBJECT_COUNT
    max_anomalies: int = DEFAULT_MAX_ANOMALIES
    max_area_ratio: float = DEFAULT_MAX_AREA_RATIO
    min_object_overlap: float = DEFAULT_MIN_OBJECT_OVERLAP
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["defect_prompts"] = [list(p) for p in self.defect_prompts]
        return d

    def digest(self) -> str:
        """Content hash of every field (16 hex chars)."""
        payload = json.dumps({"method": "saa_plus", **self.to_json()}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def general_prompts(object_name: str) -> tuple[tuple[str, str], ...]:
    """``defect on {obj}``, ``damage on {obj}``, ``flaw on {obj}``, each filtered by the object name."""
    name = normalize_filter_word(object_name) or DEFAULT_OBJECT_NAME
    return tuple((normalize_caption(t.format(name)), name) for t in GENERAL_DEFECT_TEMPLATES)


def resolve_saa_prompts(
    object_name: str | None, section: Mapping[str, Any] | SaaSection | None
) -> SaaPromptSet:
    """The prompt set for an object name and an optional ``saa`` section.

    With neither, the general prompts on ``object`` and the default property prompts.
    """
    sec = section if isinstance(section, SaaSection) else parse_saa_section(section)
    name = normalize_filter_word(object_name or "") or DEFAULT_OBJECT_NAME
    prompts: list[tuple[str, str]] = list(general_prompts(name)) if sec.use_general_prompts else []
    prompts += [(normalize_caption(p.prompt), normalize_filter_word(p.filter)) for p in sec.defect_prompts]
    return SaaPromptSet(
        object_name=name,
        object_caption=normalize_caption(sec.object_prompt or name),
        defect_prompts=tuple(prompts),
        object_count=sec.object_count,
        max_anomalies=sec.max_anomalies,
        max_area_ratio=sec.max_area_ratio,
        min_object_overlap=sec.min_object_overlap,
        box_threshold=sec.box_threshold,
        text_threshold=sec.text_threshold,
    )


__all__ = [
    "GENERAL_DEFECT_TEMPLATES",
    "SaaDefectPrompt",
    "SaaPromptSet",
    "SaaSection",
    "general_prompts",
    "normalize_caption",
    "normalize_filter_word",
    "parse_saa_section",
    "resolve_saa_prompts",
    "validate_saa_section",
]
