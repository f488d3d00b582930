"""SAA+ (Segment Any Anomaly +, Cao et al. 2023): GroundingDINO + SAM + hybrid prompts.

``load_detector_from_dir("saa_plus", weights_dir, sam_variant="vit_h")`` for the
official checkpoints; ``load_tiny_detector("saa_plus")`` for tests and the demo.
See ``docs/saa.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.base import RANDOM_INIT, WeightsError
from models.registry import MethodSpec, register_method
from models.saa.detector import SaaPlusDetector, SaaSettings
from models.saa.groundingdino import (
    BERT_WEIGHTS,
    GROUNDINGDINO_WEIGHTS,
    TINY_BERT,
    TINY_OVERRIDES,
    check_bert_dir,
    create_groundingdino,
    save_random_bert,
)
from models.saa.saliency import WRN_WEIGHTS, create_wrn
from models.saa.sam import SAM_CONFIGS, SAM_WEIGHTS, create_sam

DEFAULT_SAM_VARIANT = "vit_h"
TINY_SETTINGS = SaaSettings(
    dino_size=96, dino_max_size=160, saliency_size=64, multi_instance_saliency_size=64
)


@dataclass(frozen=True)
class SaaWeights:
    """Local files of the four SAA+ models.

    ``bert_dir`` is a DIRECTORY (config.json, vocab.txt, tokenizer files, weights).
    ``weights_dir`` only serves error messages (the fetch command).
    """

    groundingdino: Path
    bert_dir: Path
    sam: Path
    wrn: Path
    weights_dir: Path | None = None


def _required_weights(*, sam_variant: str = DEFAULT_SAM_VARIANT, **_: Any) -> tuple[str, ...]:
    if sam_variant not in SAM_WEIGHTS:
        raise ValueError(f"sam_variant must be one of {', '.join(SAM_WEIGHTS)}, got {sam_variant!r}")
    return (GROUNDINGDINO_WEIGHTS, BERT_WEIGHTS, SAM_WEIGHTS[sam_variant], WRN_WEIGHTS)


def _weights_from_dir(
    weights_dir: Path, *, sam_variant: str = DEFAULT_SAM_VARIANT, bert_dir: str | Path | None = None, **_: Any
) -> SaaWeights:
    from models.weights import weights_path

    names = _required_weights(sam_variant=sam_variant)
    return SaaWeights(
        groundingdino=weights_path(names[0], weights_dir),
        bert_dir=Path(bert_dir) if bert_dir is not None else weights_path(names[1], weights_dir),
        sam=weights_path(names[2], weights_dir),
        wrn=weights_path(names[3], weights_dir),
        weights_dir=Path(weights_dir),
    )


def build_saa_plus(
    *,
    weights: Any = None,
    device: str = "cpu",
    sam_variant: str = DEFAULT_SAM_VARIANT,
    bert_dir: str | Path | None = None,
    config: str = "official",
    settings: SaaSettings | None = None,
    **_: Any,
) -> SaaPlusDetector:
    """Build the SAA+ detector.

    Args:
        weights: a :class:`SaaWeights` (see ``load_detector_from_dir``), or
            ``RANDOM_INIT`` (random weights: tests and the labelled demo only). ``None``
            is refused: the official files are never downloaded at run time.
        sam_variant: ``vit_h`` (default), ``vit_l`` or ``vit_b``.
        bert_dir: local BERT directory; overrides the one in ``weights``. With
            ``RANDOM_INIT`` and no ``bert_dir``, a random BERT with a made-up vocabulary is
            written to a temporary directory, loaded, and the directory removed.
        config: ``official`` (Swin-T OGC, the SAM variant, WRN50-2) or ``tiny``
            (same builders, tiny sizes; RANDOM_INIT only).
        settings: input resolutions (default: the reference's; tiny: small).
        **_: other options (``cache``, ``precision``...) are ignored: SAA+ runs in float32
            and caches nothing across requests.
    """
    if config not in ("official", "tiny"):
        raise ValueError(f"config must be 'official' or 'tiny', got {config!r}")
    tiny = config == "tiny"
    if weights is None:
        raise WeightsError(
            "SAA+ loads its four models from local files only; use "
            "models.load_detector_from_dir('saa_plus', WEIGHTS_DIR) after "
            f"anomaly-inspect weights fetch {' '.join(_required_weights(sam_variant=sam_variant))} --dir WEIGHTS_DIR"
        )
    if weights == RANDOM_INIT:
        variant = "tiny" if tiny else sam_variant
        if variant not in SAM_CONFIGS:
            raise ValueError(f"sam_variant must be one of {', '.join(SAM_WEIGHTS)}, got {sam_variant!r}")
        dino = create_groundingdino(
            None,
            bert_dir=bert_dir,
            overrides=TINY_OVERRIDES if tiny else None,
            random_bert=TINY_BERT if tiny else None,
            device=device,
        )
        sam = create_sam(variant, None, device=device)
        wrn = create_wrn(None, tiny=tiny, device=device)
        name = "saa_plus-tiny" if tiny else f"groundingdino-swint-ogc+sam-{sam_variant}+wrn50-2"
        return SaaPlusDetector(
            dino=dino,
            sam=sam,
            wrn=wrn,
            model_name=name,
            weights_tag=RANDOM_INIT,
            random_weights=True,
            device=device,
            settings=settings or (TINY_SETTINGS if tiny else SaaSettings()),
        )
    if tiny:
        raise ValueError("the tiny configuration exists with weights=RANDOM_INIT only")
    if not isinstance(weights, SaaWeights):
        raise TypeError(f"weights must be a SaaWeights, RANDOM_INIT or None, got {type(weights).__name__}")
    if sam_variant not in SAM_WEIGHTS:
        raise ValueError(f"sam_variant must be one of {', '.join(SAM_WEIGHTS)}, got {sam_variant!r}")
    bert = check_bert_dir(bert_dir if bert_dir is not None else weights.bert_dir, weights.weights_dir)
    for path, name in (
        (weights.groundingdino, GROUNDINGDINO_WEIGHTS),
        (weights.sam, SAM_WEIGHTS[sam_variant]),
        (weights.wrn, WRN_WEIGHTS),
    ):
        if not Path(path).exists():
            from models.weights import fetch_hint

            where = weights.weights_dir if weights.weights_dir is not None else Path(path).parent
            raise WeightsError(
                f"weights file not found: {path}. Fetch it where a network exists with: {fetch_hint([name], where)}"
            )
    dino = create_groundingdino(weights.groundingdino, bert_dir=bert, device=device)
    sam = create_sam(sam_variant, weights.sam, device=device)
    wrn = create_wrn(weights.wrn, device=device)
    tag = "+".join(Path(p).name for p in (weights.groundingdino, weights.sam, weights.wrn))
    return SaaPlusDetector(
        dino=dino,
        sam=sam,
        wrn=wrn,
        model_name=f"groundingdino-swint-ogc+sam-{sam_variant}+wrn50-2",
        weights_tag=tag,
        random_weights=False,
        device=device,
        settings=settings or SaaSettings(),
    )


register_method(
    MethodSpec(
        name="saa_plus",
        build=build_saa_plus,
        required_weights=_required_weights,
        weights_from_dir=_weights_from_dir,
        description="SAA+ zero-shot segmentation (GroundingDINO Swin-T OGC + SAM + WRN50-2 saliency)",
        tiny_kwargs={"config": "tiny"},
    )
)

__all__ = [
    "DEFAULT_SAM_VARIANT",
    "TINY_SETTINGS",
    "SaaPlusDetector",
    "SaaSettings",
    "SaaWeights",
    "build_saa_plus",
    "save_random_bert",
]
