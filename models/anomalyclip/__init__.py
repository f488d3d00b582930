"""AnomalyCLIP (Zhou et al., ICLR 2024): DPAM V-V attention and object-agnostic prompts.

``load_detector_from_dir("anomalyclip", WEIGHTS_DIR)`` with the OpenAI ViT-L/14@336px
archive and a released prompt checkpoint; ``load_tiny_detector("anomalyclip")`` for
tests. Training: ``anomaly-inspect train-anomalyclip`` / ``python -m models.anomalyclip.train``.
See docs/anomalyclip.md.
"""

from __future__ import annotations

from models.anomalyclip.detector import (
    ARCHS,
    CLIP_WEIGHTS_NAME,
    DEFAULT_BACKBONE,
    PROMPT_WEIGHTS_NAMES,
    TINY_BACKBONE,
    AnomalyClipDetector,
    AnomalyClipWeights,
    build_anomalyclip,
    required_weights,
    weights_from_dir,
)
from models.anomalyclip.torch_model import AnomalyClipArch, DpamVisualEncoder, PromptLearner
from models.registry import MethodSpec, register_method

register_method(
    MethodSpec(
        name="anomalyclip",
        build=build_anomalyclip,
        required_weights=required_weights,
        weights_from_dir=weights_from_dir,
        description="AnomalyCLIP zero-shot (OpenAI ViT-L/14@336px at 518, DPAM, object-agnostic prompts)",
        tiny_kwargs={"backbone": TINY_BACKBONE},
    )
)

__all__ = [
    "ARCHS",
    "CLIP_WEIGHTS_NAME",
    "DEFAULT_BACKBONE",
    "PROMPT_WEIGHTS_NAMES",
    "TINY_BACKBONE",
    "AnomalyClipArch",
    "AnomalyClipDetector",
    "AnomalyClipWeights",
    "DpamVisualEncoder",
    "PromptLearner",
    "build_anomalyclip",
    "required_weights",
    "weights_from_dir",
]
