"""WideResNet-50-2 feature extractor for the SAA+ saliency prompt (torchvision architecture).

Input as the reference (``SAA/model.py`` + ``ModelINet.preprocess``): ``cv2.resize`` of
the uint8 image to ``size x size`` (OpenCV's bilinear, ``INTER_LINEAR``: no antialias,
fixed-point, rounded to uint8), then ``(x - 255 * mean) / (255 * std)`` with ImageNet
mean/std (its ``ResizeLongestSide`` step is a no-op on the square image and it pads
nothing). Features: layer1, layer2, layer3 outputs, the deeper two resized (nearest,
as ``F.interpolate``'s default in the reference) to layer1's grid, concatenated on
channels and L2-normalised per location. RGB channel order (the reference feeds BGR
here; we feed RGB, the order the network was trained on; the resize is per channel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, ResNet, wide_resnet50_2

from models.base import WeightsError
from models.saa.groundingdino import IMAGENET_MEAN, IMAGENET_STD, read_checkpoint

WRN_WEIGHTS = "wide-resnet50-2"


def build_wrn(tiny: bool = False) -> ResNet:
    """Random-init torchvision WideResNet-50-2, or a tiny ResNet of the same block type (tests)."""
    if tiny:
        # same Bottleneck blocks and channel layout (256/512/1024 after layer1..3), one block each
        return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8).eval()
    return wide_resnet50_2(weights=None).eval()  # never downloads: weights=None


def create_wrn(weights: str | Path | None, *, tiny: bool = False, device: str = "cpu") -> ResNet:
    """WRN50-2 from a local torchvision checkpoint (``wide_resnet50_2-95faca4d.pth``) or random."""
    model = build_wrn(tiny)
    if weights is not None:
        state = read_checkpoint(weights, WRN_WEIGHTS)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights} does not fit WideResNet-50-2: {str(exc)[:400]}") from exc
    return model.to(device).eval()


def saliency_input(image: np.ndarray, size: int) -> np.ndarray:
    """``HWC uint8`` -> ``[size, size, 3]`` uint8 by ``cv2.resize`` (``INTER_LINEAR``), as the reference."""
    if (int(image.shape[0]), int(image.shape[1])) == (size, size):
        return image  # cv2.resize copies an image already at the size
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "SAA+ needs OpenCV for the saliency input resize: pip install opencv-python-headless "
            f"(the 'saa' extra; see docs/saa.md): {exc}"
        ) from exc
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def wrn_features(model: ResNet, image: np.ndarray, size: int) -> torch.Tensor:
    """``HWC uint8 RGB`` -> ``[C, size/4, size/4]`` float32 unit-norm features (C = 1792).

    The image is resized to ``size x size`` with the reference's ``cv2.resize`` (uint8,
    ``INTER_LINEAR``), then normalised by ImageNet mean/std scaled to [0, 255].
    """
    device = next(model.parameters()).device
    resized = saliency_input(image, size)  # [s, s, 3] uint8
    x = torch.tensor(resized, dtype=torch.float32).permute(2, 0, 1)[None]  # [1, 3, s, s] in [0, 255]
    # the reference's pixel_mean/pixel_std: Python products 0.485 * 255 ..., then float32
    mean = torch.tensor([m * 255 for m in IMAGENET_MEAN], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor([s * 255 for s in IMAGENET_STD], dtype=torch.float32).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(device)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    f1 = model.layer1(x)  # [1, 256, s/4, s/4]
    f2 = model.layer2(f1)  # [1, 512, s/8, s/8]
    f3 = model.layer3(f2)  # [1, 1024, s/16, s/16]
    grid = f1.shape[-2:]
    feats = torch.cat([f1, F.interpolate(f2, size=grid), F.interpolate(f3, size=grid)], dim=1)
    return F.normalize(feats, dim=1)[0]  # [C, h, w]


__all__ = ["WRN_WEIGHTS", "build_wrn", "create_wrn", "saliency_input", "wrn_features"]
