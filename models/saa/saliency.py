"""WideResNet-50-2 feature extractor for the SAA+ saliency prompt (torchvision architecture).

Features: layer1, layer2, layer3 outputs, the deeper two resized (nearest, as
``F.interpolate``'s default in the reference) to layer1's grid, concatenated on
channels and L2-normalised per location. ImageNet normalisation of an RGB image
(the reference feeds BGR here; we feed RGB, the order the network was trained on).
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


@torch.no_grad()
def wrn_features(model: ResNet, image: np.ndarray, size: int) -> torch.Tensor:
    """``HWC uint8 RGB`` -> ``[C, size/4, size/4]`` float32 unit-norm features (C = 1792).

    The image is resized to ``size x size`` (bilinear, no antialias: the reference's
    ``cv2.resize``).
    """
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # [1, 3, s, s]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    f1 = model.layer1(x)  # [1, 256, s/4, s/4]
    f2 = model.layer2(f1)  # [1, 512, s/8, s/8]
    f3 = model.layer3(f2)  # [1, 1024, s/16, s/16]
    grid = f1.shape[-2:]
    feats = torch.cat([f1, F.interpolate(f2, size=grid), F.interpolate(f3, size=grid)], dim=1)
    return F.normalize(feats, dim=1)[0]  # [C, h, w]


__all__ = ["WRN_WEIGHTS", "build_wrn", "create_wrn", "wrn_features"]
