"""WinCLIP scoring maths as pure functions on tensors (METHODS.md section 1).

Everything here is deterministic and free of model state; unit tests check each
function against the METHODS.md test vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07  # WinCLIP's fixed temperature (not CLIP's learned logit scale)


def make_masks(grid_size: tuple[int, int], kernel_size: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every sliding window, row-major.

    Returns ``int64 [n_windows, kernel_size**2]``; row ``w`` lists the patch indices
    (row-major in the grid) of window ``w``; windows are ordered row-major too.

    >>> make_masks((3, 3), 2).tolist()
    [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    """
    h, w = grid_size
    if kernel_size < 1 or stride < 1:
        raise ValueError("kernel_size and stride must be >= 1")
    if h < kernel_size or w < kernel_size:
        raise ValueError(f"grid {grid_size} is smaller than the window size {kernel_size}")
    grid = torch.arange(h * w).reshape(h, w)
    rows = range(0, h - kernel_size + 1, stride)
    cols = range(0, w - kernel_size + 1, stride)
    windows = [grid[r : r + kernel_size, c : c + kernel_size].reshape(-1) for r in rows for c in cols]
    return torch.stack(windows)


def patch_window_index(masks: torch.Tensor, n_patches: int) -> torch.Tensor:
    """For each patch, the windows that contain it, padded with ``n_windows``.

    Returns ``int64 [n_patches, max_windows_per_patch]``. The pad value indexes an
    extra column that callers fill with 0 (a reciprocal that adds nothing).
    Precomputed once per grid and scale; makes aggregation a single gather.
    """
    n_windows = masks.shape[0]
    members: list[list[int]] = [[] for _ in range(n_patches)]
    for w, patches in enumerate(masks.tolist()):
        for p in patches:
            members[p].append(w)
    width = max(len(m) for m in members)
    out = torch.full((n_patches, width), n_windows, dtype=torch.long)
    for p, m in enumerate(members):
        out[p, : len(m)] = torch.tensor(m, dtype=torch.long)
    return out


def harmonic_aggregation(
    window_scores: torch.Tensor, grid_size: tuple[int, int], index: torch.Tensor
) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows containing it.

    ``M(p) = |U_p| / sum_{w in U_p} 1 / s_w``; a zero window score makes the
    patch score 0 (not NaN).

    Args:
        window_scores: ``[B, n_windows]``, values >= 0.
        grid_size: ``(h, w)`` patch grid.
        index: :func:`patch_window_index` of the masks, ``[h*w, max_windows]``.

    Returns:
        ``[B, h, w]`` in the dtype of ``window_scores`` (use float32/float64).
    """
    b = window_scores.shape[0]
    reciprocal = 1.0 / window_scores  # [B, W]; inf where a score is 0
    pad = torch.zeros(b, 1, dtype=reciprocal.dtype, device=reciprocal.device)
    reciprocal = torch.cat([reciprocal, pad], dim=1)  # [B, W+1]
    idx = index.to(window_scores.device)
    gathered = reciprocal[:, idx]  # [B, P, max_windows]
    counts = (idx < window_scores.shape[1]).sum(dim=1).to(window_scores.dtype)  # [P]
    agg = counts / gathered.sum(dim=-1)  # [B, P]; count/inf = 0
    return agg.nan_to_num(nan=0.0, posinf=0.0).reshape(b, *grid_size)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``x [..., N, D]`` with every row of ``y [M, D]`` -> ``[..., N, M]``."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-2, -1)


def class_scores(
    embeddings: torch.Tensor, text_prototypes: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Anomaly probability of each embedding.

    ``s(f) = softmax([cos(f, T_n), cos(f, T_a)] / temperature)[1]``.

    Args:
        embeddings: ``[..., D]``.
        text_prototypes: ``[2, D]`` (normal, anomalous), unnormalised.

    Returns:
        ``[...]`` in [0, 1].
    """
    logits = cosine_similarity(embeddings, text_prototypes) / temperature  # [..., 2]
    return logits.softmax(dim=-1)[..., 1]


def visual_association(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """WinCLIP+ visual association: ``min_r (1 - cos(x, r)) / 2``.

    Args:
        embeddings: ``[B, N, D]``.
        memory: ``[R, D]`` reference embeddings (all references flattened).

    Returns:
        ``[B, N]`` in [0, 1].
    """
    sim = cosine_similarity(embeddings, memory)  # [B, N, R]
    return (1.0 - sim.amax(dim=-1)) / 2.0


def fuse_zero_shot(image_scores: torch.Tensor, scale_maps: list[torch.Tensor]) -> torch.Tensor:
    """Harmonic fusion of the image score and per-scale maps.

    ``M0(p) = (S + 1) / (1 / s_img + sum_k 1 / M_k(p))``.

    Args:
        image_scores: ``[B]``.
        scale_maps: ``S`` maps ``[B, h, w]``.
    """
    b, h, w = scale_maps[0].shape
    stacked = torch.stack([image_scores.view(b, 1, 1).expand(b, h, w), *scale_maps])  # [S+1, B, h, w]
    fused = (len(scale_maps) + 1) / (1.0 / stacked).sum(dim=0)
    return fused.nan_to_num(nan=0.0, posinf=0.0)


def upsample_map(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of ``[h, w]`` to ``size = (H, W)``."""
    return F.interpolate(grid_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
