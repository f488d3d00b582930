"""MuSc (Li et al., ICLR 2024): zero-shot mutual scoring of unlabeled images.

``load_detector("musc", weights=PATH | None | RANDOM_INIT, device="cpu")`` (default backbone:
OpenAI CLIP ViT-L/14@336px run at 518, as the official ``configs/musc.yaml``);
``load_tiny_detector("musc")`` for tests. Batch (transductive) and stream (bank) modes,
bank helpers in :mod:`models.musc.bank`. See docs/musc.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.base import RANDOM_INIT, WeightsError
from models.clip_backbone import create_clip
from models.musc.bank import (
    BANK_ARRAYS,
    bank_append,
    bank_bytes_per_image,
    bank_concat,
    bank_evict,
    bank_split,
    bank_summary,
    check_bank,
)
from models.musc.detector import MuscConfig, MuscDetector, StreamPrediction
from models.musc.torch_model import (
    R_LIST,
    RSCIN_K,
    RSCIN_K_VISA,
    TOPMIN_MAX,
    TOPMIN_MIN,
    ClipTokenEncoder,
    Dinov2TokenEncoder,
)
from models.registry import MethodSpec, register_method
from models.weights import fetch_hint, manifest

DEFAULT_BACKBONE = "ViT-L-14-336"
TINY_BACKBONE = "tiny-musc-clip-test"
DINOV2_BACKBONE = "dinov2_vitb14"
TINY_DINOV2_BACKBONE = "tiny-musc-dinov2-test"


@dataclass(frozen=True)
class MuscArch:
    """One MuSc backbone configuration.

    Attributes:
        kind: ``clip`` (open_clip) or ``dinov2`` (timm).
        model: open_clip / timm architecture actually built.
        image_size: official processing size.
        feature_layers: 1-indexed blocks (official ``feature_layers`` + 1).
        weights_name: manifest entry of the weights file (``None`` for test configs).
        pretrained_tag: open_clip tag for ``weights=None``.
    """

    kind: str
    model: str
    image_size: int
    feature_layers: tuple[int, ...]
    weights_name: str | None = None
    pretrained_tag: str | None = None
    quickgelu_model: str | None = None
    native_size: int | None = None

    def model_for(self, image_size: int) -> str:
        """The architecture built at ``image_size``.

        (official code) MuSc's open_clip builds OpenAI weights through ``load_openai_model``
        (QuickGELU) only when the requested size is the config's own (336 for
        ``ViT-L-14-336``); at any other size (518) it builds ``CLIP(**config)``, whose
        activation is ``nn.GELU``, and loads the OpenAI weights into it.
        """
        if self.quickgelu_model and image_size == self.native_size:
            return self.quickgelu_model
        return self.model


ARCHS: dict[str, MuscArch] = {
    # (official code) at 518 MuSc builds open_clip's plain "ViT-L-14-336" config (nn.GELU,
    # NOT QuickGELU) and loads the OpenAI weights into it; we build exactly that
    # (QuickGELU only at the native 336, see MuscArch.model_for).
    DEFAULT_BACKBONE: MuscArch(
        kind="clip",
        model="ViT-L-14-336",
        image_size=518,
        feature_layers=(6, 12, 18, 24),
        weights_name="openclip-vit-l-14-336-openai",
        pretrained_tag="openai",
        quickgelu_model="ViT-L-14-336-quickgelu",
        native_size=336,
    ),
    # the cheaper published setting (official scripts: dinov2_vitb14, feature_layers 2 5 8 11, 518)
    DINOV2_BACKBONE: MuscArch(
        kind="dinov2",
        model="vit_base_patch14_dinov2",
        image_size=518,
        feature_layers=(3, 6, 9, 12),
        weights_name="timm-vit-base-patch14-dinov2",
    ),
    TINY_BACKBONE: MuscArch(kind="clip", model=TINY_BACKBONE, image_size=112, feature_layers=(1, 2, 3, 4)),
    TINY_DINOV2_BACKBONE: MuscArch(
        kind="dinov2", model="tiny-dinov2-test", image_size=112, feature_layers=(1, 2)
    ),
}


def _arch(backbone: str) -> MuscArch:
    try:
        return ARCHS[backbone]
    except KeyError:
        raise ValueError(f"unknown MuSc backbone {backbone!r}; known: {', '.join(ARCHS)}") from None


def required_weights(backbone: str = DEFAULT_BACKBONE, **_: Any) -> tuple[str, ...]:
    """Manifest names the configuration needs."""
    name = _arch(backbone).weights_name
    return (name,) if name else ()


def weights_from_dir(weights_dir: Path, backbone: str = DEFAULT_BACKBONE, **_: Any) -> Path:
    """The backbone's weights file inside a weights directory laid out as the manifest says."""
    arch = _arch(backbone)
    if arch.weights_name is None:
        raise WeightsError(f"MuSc backbone {backbone!r} is a test configuration without official weights")
    return Path(weights_dir) / manifest()[arch.weights_name].file


def _clip_encoder(
    backbone: str, arch: MuscArch, weights: Any, device: str, seed: int, image_size: int
) -> tuple[ClipTokenEncoder, str, bool]:
    model = arch.model_for(image_size)
    if weights is not None and str(weights) == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bb = create_clip(model, RANDOM_INIT, pretrained_tag=None, device=device)
    elif weights is None:
        bb = create_clip(model, None, pretrained_tag=arch.pretrained_tag, device=device)
    else:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = weights_from_dir(path, backbone)
        if not path.is_file():
            hint = fetch_hint([arch.weights_name], path.parent) if arch.weights_name else "pass a checkpoint"
            raise WeightsError(f"MuSc backbone weights not found: {path}. Fetch them with: {hint}")
        bb = create_clip(model, path, pretrained_tag=None, device=device)
    visual: Any = bb.model.visual
    return (
        ClipTokenEncoder(visual=visual, feature_layers=arch.feature_layers),
        bb.weights_tag,
        bb.random_weights,
    )


def _dinov2_encoder(
    backbone: str, arch: MuscArch, weights: Any, device: str
) -> tuple[Dinov2TokenEncoder, str, bool]:
    from models.dinov2 import create_dinov2

    w = weights
    if w is not None and str(w) != RANDOM_INIT and Path(w).expanduser().is_dir():
        w = weights_from_dir(Path(w).expanduser(), backbone)
    bb = create_dinov2(arch.model, w, device=device)  # a clear WeightsError if missing
    return (
        Dinov2TokenEncoder(model=bb.model, feature_layers=arch.feature_layers),
        bb.weights_tag,
        bb.random_weights,
    )


def build_musc(
    *,
    weights: Any = None,
    device: str = "cpu",
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    r_list: tuple[int, ...] = R_LIST,
    topmin_min: float = TOPMIN_MIN,
    topmin_max: float = TOPMIN_MAX,
    rscin_k: tuple[int, ...] = RSCIN_K,
    precision: str = "fp32",
    bank_dtype: str = "float32",
    seed: int = 0,
    **_: Any,
) -> MuscDetector:
    """Build a MuSc detector.

    Args:
        weights: backbone checkpoint path (or a weights directory); ``None`` = the official
            source through the library (needs a network); ``RANDOM_INIT`` = random weights
            (tests/demo only; CLIP seeded by ``seed``, DINOv2 by models.dinov2's fixed seed).
        backbone: ``ViT-L-14-336`` (official default), ``dinov2_vitb14`` (the cheaper published
            setting, timm DINOv2 ViT-B/14), or ``tiny-musc-clip-test`` / ``tiny-musc-dinov2-test``
            (tests).
        image_size: processing size (default: the backbone's official one, 518).
        r_list, topmin_min, topmin_max, rscin_k: scoring settings (official defaults;
            ``rscin_k=(1, 8, 9)`` is the official VisA setting, ``()`` switches RsCIN off).
        precision: ``fp32``, ``bf16`` (backbone only; falls back to fp32 with one warning
            where the CPU has no native bf16) or ``fp16`` (CUDA).
        bank_dtype: ``float32`` (default: stream mode equals batch mode exactly) or ``float16``
            (half the bytes, maps within ~2e-3; what the service stores).
        **_: other options are accepted and ignored.
    """
    arch = _arch(backbone)
    size = int(image_size or arch.image_size)
    encoder: nn.Module
    if arch.kind == "clip":
        encoder, tag, random_weights = _clip_encoder(backbone, arch, weights, device, seed, size)
    elif arch.kind == "dinov2":
        encoder, tag, random_weights = _dinov2_encoder(backbone, arch, weights, device)
    else:  # pragma: no cover - no other kind registered
        raise ValueError(f"unsupported backbone kind {arch.kind!r}")
    mean, std, interp = encoder_preprocessing(arch)
    config = MuscConfig(
        image_size=size,
        r_list=tuple(int(r) for r in r_list),
        topmin_min=float(topmin_min),
        topmin_max=float(topmin_max),
        rscin_k=tuple(int(k) for k in rscin_k),
    )
    return MuscDetector(
        encoder=encoder,
        model_name=backbone,
        weights_tag=tag,
        random_weights=random_weights,
        config=config,
        mean=mean,
        std=std,
        interpolation=interp,
        device=device,
        precision=precision,
        bank_dtype=bank_dtype,
    )


def encoder_preprocessing(
    arch: MuscArch,
) -> tuple[tuple[float, float, float], tuple[float, float, float], str]:
    """``(mean, std, interpolation)`` of the official preprocessing for ``arch``."""
    from models.clip_backbone import OPENAI_MEAN, OPENAI_STD

    if arch.kind == "clip":  # open_clip image_transform: Resize((S, S), BICUBIC)
        return OPENAI_MEAN, OPENAI_STD, "bicubic"
    # official datasets without a CLIP transform: Resize((S, S)) (bilinear) + ImageNet stats
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"


register_method(
    MethodSpec(
        name="musc",
        build=build_musc,
        required_weights=required_weights,
        weights_from_dir=weights_from_dir,
        description="MuSc zero-shot mutual scoring (CLIP ViT-L/14@336px at 518; batch and stream/bank modes)",
        tiny_kwargs={"backbone": TINY_BACKBONE},
    )
)

__all__ = [
    "ARCHS",
    "BANK_ARRAYS",
    "DEFAULT_BACKBONE",
    "DINOV2_BACKBONE",
    "RSCIN_K",
    "RSCIN_K_VISA",
    "TINY_BACKBONE",
    "TINY_DINOV2_BACKBONE",
    "MuscArch",
    "MuscConfig",
    "MuscDetector",
    "StreamPrediction",
    "bank_append",
    "bank_bytes_per_image",
    "bank_concat",
    "bank_evict",
    "bank_split",
    "bank_summary",
    "build_musc",
    "check_bank",
    "required_weights",
    "weights_from_dir",
]
