"""AnomalyCLIP training losses (reference ``loss.py`` semantics, written from the formulas).

``loss = CE(image logits, label) + 4 * sum_layers(focal(P, gt) + dice(P_abn, gt) + dice(P_norm, 1 - gt))``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
PIXEL_LOSS_WEIGHT = 4.0  # official train.py: lam = 4 (pixel losses only; the image CE is not scaled)


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA, smooth: float = FOCAL_SMOOTH
) -> torch.Tensor:
    """Focal loss on class PROBABILITIES (not logits), as the reference.

    ``pt = sum_c onehot_c * p_c + smooth`` with the one-hot clamped to
    ``[smooth / (C - 1), 1 - smooth]``; ``loss = mean(-(1 - pt)^gamma * log(pt))``.

    Args:
        probs: ``[B, C, H, W]`` probabilities (softmax over C).
        target: ``[B, H, W]`` class indices (0/1 masks), any dtype.
    """
    c = probs.shape[1]
    onehot = F.one_hot(target.long(), c).permute(0, 3, 1, 2).to(probs.dtype)  # [B, C, H, W]
    onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth  # [B, H, W]
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Binary soft dice ``1 - mean_b (2 sum(p t) + s) / (sum p + sum t + s)`` over ``[B, ...]``."""
    p = pred.flatten(1)
    t = target.flatten(1).to(p.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


def pixel_loss(probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """One layer's pixel loss: ``focal(P, gt) + dice(P_abn, gt) + dice(P_norm, 1 - gt)``.

    ``probs [B, 2, H, W]`` (normal, abnormal), ``gt [B, H, W]`` in {0, 1}.
    """
    return focal_loss(probs, gt) + dice_loss(probs[:, 1], gt) + dice_loss(probs[:, 0], 1 - gt)
