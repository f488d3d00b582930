"""A straightforward AnomalyDINO, written from issue 11 and anomalib 2.7's definitions.

Independent of ``models.anomalydino``: torchvision transforms for preprocessing, timm's
own ``forward_intermediates`` for features (with the position-embedding antialiasing
off, as anomalib patches timm), a full distance matrix and sorts instead of chunked
top-k, a dense 33x33 Gaussian convolution, numpy SVD for the PCA and plain loops for
the morphology. Slow and simple on purpose: only for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize
from torchvision.transforms.v2.functional import to_dtype, to_image

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@contextmanager
def pos_embed_without_antialias() -> Iterator[None]:
    """What anomalib's TimmFeatureExtractor does to timm (globally): resample without antialias."""
    import timm.models.vision_transformer as vit

    original = vit.resample_abs_pos_embed
    vit.resample_abs_pos_embed = functools.partial(original, antialias=False)
    try:
        yield
    finally:
        vit.resample_abs_pos_embed = original


def pixels(images: Sequence[np.ndarray], size: int | tuple[int, int]) -> torch.Tensor:
    """anomalib 2.7, per image: ``read_image(as_tensor=True)`` (``to_dtype(to_image(pil),
    float32, scale=True)``), then the pre-processor: Resize(bicubic, antialias), Normalize.

    ``size`` goes to torchvision's ``Resize`` as anomalib passes ``image_size``: an int
    resizes the shorter side (aspect kept), a pair to exactly ``(h, w)``. The images
    must come out at one size (they are concatenated)."""
    tr = Compose(
        [Resize(size, antialias=True, interpolation=InterpolationMode.BICUBIC), Normalize(MEAN, STD)]
    )
    out = []
    for im in images:
        x = to_dtype(to_image(Image.fromarray(np.asarray(im)).convert("RGB")), torch.float32, scale=True)
        out.append(tr(x)[None])  # [1, 3, h, w]
    return torch.cat(out)


def crop(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[-2:]
    ch, cw = h % patch, w % patch
    top, left = ch // 2, cw // 2
    bottom, right = ch - top, cw - left
    return x[..., top : h - bottom, left : w - right], (left, right, top, bottom)


def features(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last block, final norm, patch tokens only: ``[B, N, D]`` float32."""
    with torch.no_grad(), pos_embed_without_antialias():
        (out,) = vit.forward_intermediates(  # type: ignore[operator]
            x, indices=[len(vit.blocks) - 1], norm=True, output_fmt="NLC", intermediates_only=True
        )
    return out.float()


def pca_first_component(x: np.ndarray) -> np.ndarray:
    """sklearn ``PCA(n_components=1).fit_transform`` semantics, by a full SVD."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    v = vt[0]
    v = v * np.sign(v[np.argmax(np.abs(v))])  # svd_flip(u_based_decision=False)
    return xc @ v


def morph(mask: np.ndarray, op: str) -> np.ndarray:
    """3x3 dilation (max) or erosion (min) over in-image neighbours (OpenCV default borders)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            win = mask[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            out[y, x] = win.max() if op == "dilate" else win.min()
    return out


def masks(feats: torch.Tensor, grid: tuple[int, int], threshold: float = 10.0) -> np.ndarray:
    gh, gw = grid
    out = []
    for f in feats.numpy():
        pc = pca_first_component(f)
        m = (pc > threshold).reshape(gh, gw)
        c = m[int(gh * 0.2) : int(gh * 0.8), int(gw * 0.2) : int(gw * 0.8)]
        if c.sum() <= c.size * 0.35:
            m = (-pc > threshold).reshape(gh, gw)
        m = morph(m.astype(np.uint8), "dilate")
        m = morph(morph(m, "dilate"), "erode")
        out.append(m.astype(bool).reshape(-1))
    return np.stack(out)


def blur(m: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Dense 2-D Gaussian (kernel 2*int(4*sigma+0.5)+1, reflect padding), like anomalib's GaussianBlur2d."""
    size = 2 * int(4 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    k2 = g[:, None] * g[None, :]
    k2 = k2 / k2.abs().sum()
    p = size // 2
    return F.conv2d(F.pad(m, (p, p, p, p), mode="reflect"), k2[None, None])


def encode(
    vit: torch.nn.Module,
    golden: Sequence[np.ndarray],
    size: int | tuple[int, int],
    patch: int = 14,
    masking: bool = False,
) -> torch.Tensor:
    """The bank: each golden image alone (an int ``size`` gives each its own shape), stacked."""
    rows = []
    for img in golden:
        x, _ = crop(pixels([img], size), patch)
        f = features(vit, x)
        if masking:
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            f = f[torch.from_numpy(masks(f, grid))]
        else:
            f = f.reshape(-1, f.shape[-1])
        rows.append(f)
    f = torch.cat(rows)
    return f / f.norm(dim=1, keepdim=True)


def predict(
    vit: torch.nn.Module,
    bank: torch.Tensor,
    images: Sequence[np.ndarray],
    size: int | tuple[int, int],
    patch: int = 14,
    k: int = 1,
    masking: bool = False,
) -> list[tuple[float, np.ndarray]]:
    """Per image: (raw score in cosine distance, map at the image's resolution in [0, 1])."""
    out = []
    for img in images:
        x, (left, right, top, bottom) = crop(pixels([img], size), patch)
        gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
        f = features(vit, x)[0]  # [N, D]
        keep = (
            torch.from_numpy(masks(f[None], (gh, gw))[0]) if masking else torch.ones(len(f), dtype=torch.bool)
        )
        q = f / f.norm(dim=1, keepdim=True)
        d = (1 - q @ bank.T).clamp(0, 2)  # [N, M]
        nearest = d.sort(dim=1).values[:, :k].mean(dim=1)
        dist = torch.where(keep, nearest, torch.zeros_like(nearest))
        n_top = max(int(len(dist) * 0.01), 1)
        score = float(dist.sort(descending=True).values[:n_top].mean())
        m = F.interpolate(dist.reshape(1, 1, gh, gw), size=tuple(x.shape[-2:]))  # nearest
        m = F.pad(blur(m), (left, right, top, bottom), mode="replicate")[0, 0]
        h, w = img.shape[:2]
        if (h, w) != tuple(m.shape):
            shrink = h < m.shape[0] or w < m.shape[1]
            m = F.interpolate(
                m[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
            )[0, 0]
        out.append((score, (m / 2).clamp(0, 1).numpy()))
    return out
