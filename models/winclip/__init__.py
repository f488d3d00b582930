"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023), reproducing anomalib 2.7 ``WinClipModel``.

``load_detector("winclip", weights=None | PATH | RANDOM_INIT, device="cpu")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.base import ArrayCache
from models.clip_backbone import create_clip
from models.registry import MethodSpec, register_method
from models.winclip.detector import WEIGHTS_NAME, WinClipDetector
from models.winclip.encoder import VisualTower, WinClipEncoder

DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_TAG = "laion400m_e31"
TINY_BACKBONE = "tiny-vit-test"


def build_winclip(
    *,
    weights: Any = None,
    device: str = "cpu",
    backbone: str = DEFAULT_BACKBONE,
    pretrained_tag: str | None = DEFAULT_TAG,
    cache: ArrayCache | None = None,
    precision: str = "fp32",
    scales: tuple[int, ...] = (2, 3),
    tower_backend: str = "torch",
    onnx_path: str | Path | None = None,
    **_: Any,
) -> WinClipDetector:
    """Build a WinCLIP detector.

    Args:
        weights: ``None`` = official ``pretrained_tag`` via open_clip; a checkpoint path;
            or ``RANDOM_INIT``.
        tower_backend: ``torch`` or ``onnx`` (visual tower exported to ONNX and run by
            onnxruntime; needs the ``onnx`` extra).
        onnx_path: where the exported tower lives (exported there if missing).
    """
    bb = create_clip(
        backbone,
        weights,
        pretrained_tag=pretrained_tag if backbone == DEFAULT_BACKBONE else None,
        device=device,
    )
    tower = None
    if tower_backend == "onnx":
        from models.onnx_export import onnx_tower_for

        tower = onnx_tower_for(VisualTower(bb.model.visual), bb, device=device, onnx_path=onnx_path)
    elif tower_backend != "torch":
        raise ValueError(f"tower_backend must be 'torch' or 'onnx', got {tower_backend!r}")
    return WinClipDetector(
        backbone=bb,
        device=device,
        cache=cache,
        precision=precision,
        scales=scales,
        tower=tower,
        tower_label=tower_backend,
    )


def _required_weights(**_: Any) -> tuple[str, ...]:
    return (WEIGHTS_NAME,)


def _weights_from_dir(weights_dir: Path, **_: Any) -> Path:
    from models.weights import weights_path

    return weights_path(WEIGHTS_NAME, weights_dir)


register_method(
    MethodSpec(
        name="winclip",
        build=build_winclip,
        required_weights=_required_weights,
        weights_from_dir=_weights_from_dir,
        description="WinCLIP zero-shot / WinCLIP+ few-shot (ViT-B-16-plus-240, laion400m_e31)",
        tiny_kwargs={"backbone": TINY_BACKBONE},
    )
)

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_TAG",
    "VisualTower",
    "WinClipDetector",
    "WinClipEncoder",
    "build_winclip",
]
