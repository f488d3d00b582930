"""AnomalyDINO (Damm et al., WACV 2025), reproducing anomalib 2.7 ``AnomalyDINOModel``.

``load_detector("anomalydino", weights=None | PATH | RANDOM_INIT, device="cpu")``; then
``refs = det.encode_references(golden_images)`` and ``det.predict(img, references=refs)``
(references are required). See docs/anomalydino.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.anomalydino.detector import DEFAULT_IMAGE_SIZE, AnomalyDinoDetector
from models.anomalydino.torch_model import AnomalyDinoModel, AnomalyDinoOutput
from models.base import WeightsError
from models.dinov2 import DEFAULT_ARCH, TINY_ARCH, arch_spec, create_dinov2
from models.registry import MethodSpec, register_method

DEFAULT_BACKBONE = DEFAULT_ARCH  # vit_small_patch14_dinov2 (also vit_base_/vit_large_patch14_dinov2)
TINY_BACKBONE = TINY_ARCH


def build_anomalydino(
    *,
    weights: Any = None,
    device: str = "cpu",
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
    num_neighbours: int = 1,
    masking: bool = False,
    coreset_subsampling: bool = False,
    sampling_ratio: float = 0.1,
    precision: str = "fp32",
    pass_batch: int | None = None,
    **_: Any,
) -> AnomalyDinoDetector:
    """Build an AnomalyDINO detector.

    Args:
        weights: ``None`` = the official timm checkpoint from the Hugging Face hub (needs
            a network; a clear ``WeightsError`` otherwise); a path to the timm-format
            ``.safetensors`` (``anomaly-inspect weights fetch timm-vit-small-patch14-dinov2``)
            or a ``torch.save`` state dict; or ``RANDOM_INIT`` (tests / labelled demo).
        backbone: ``vit_small_patch14_dinov2`` (default), ``vit_base_patch14_dinov2``,
            ``vit_large_patch14_dinov2`` or ``tiny-dinov2-test``.
        image_size: model input size as anomalib: ``(252, 252)`` by default (exact
            ``(height, width)``); an int resizes the SHORTER side to it, aspect kept (the
            paper's 448 and 672).
        other options: see :class:`AnomalyDinoDetector`. Other keywords (``cache``...) are ignored.
    """
    bb = create_dinov2(backbone, weights, device=device)
    return AnomalyDinoDetector(
        backbone=bb,
        device=device,
        image_size=image_size,
        num_neighbours=num_neighbours,
        masking=masking,
        coreset_subsampling=coreset_subsampling,
        sampling_ratio=sampling_ratio,
        precision=precision,
        pass_batch=pass_batch,
    )


def _required_weights(*, backbone: str = DEFAULT_BACKBONE, **_: Any) -> tuple[str, ...]:
    name = arch_spec(backbone).weights_name
    return (name,) if name else ()


def _weights_from_dir(weights_dir: Path, *, backbone: str = DEFAULT_BACKBONE, **_: Any) -> Path:
    from models.weights import weights_path

    name = arch_spec(backbone).weights_name
    if name is None:
        raise WeightsError(f"{backbone} is a test configuration without weights files; use RANDOM_INIT")
    return weights_path(name, weights_dir)


register_method(
    MethodSpec(
        name="anomalydino",
        build=build_anomalydino,
        required_weights=_required_weights,
        weights_from_dir=_weights_from_dir,
        description="AnomalyDINO few-shot from golden images (DINOv2 ViT-S/14, timm lvd142m)",
        tiny_kwargs={"backbone": TINY_BACKBONE, "image_size": 56},
    )
)

__all__ = [
    "DEFAULT_BACKBONE",
    "AnomalyDinoDetector",
    "AnomalyDinoModel",
    "AnomalyDinoOutput",
    "build_anomalydino",
]
