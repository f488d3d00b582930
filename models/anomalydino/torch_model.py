"""AnomalyDINO maths (Damm et al., WACV 2025), reproducing anomalib 2.7 ``AnomalyDINOModel``.

Pipeline for ``[B, 3, H, W]`` ImageNet-normalised pixels (``H, W`` = ``image_size``):

1. centre crop to a multiple of the patch size (``h % 14`` rows split top/bottom,
   the extra one at the bottom; same for columns);
2. DINOv2 last-block patch tokens after the final norm (:func:`models.dinov2.patch_tokens`);
3. optional PCA background masking per image (:func:`background_masks`);
4. L2-normalised features; memory bank = the normalised (foreground) features of all
   golden images, optionally reduced by greedy k-center coreset (:func:`kcenter_greedy`);
5. patch distance = cosine distance ``clamp(1 - sim, 0, 2)`` to the nearest bank patch
   (mean over the ``k`` nearest for ``k > 1``); masked patches get 0;
6. image score = mean of the top 1 % patch distances (at least one);
7. map = patch distances upsampled with ``F.interpolate``'s default (nearest) to the
   cropped size, Gaussian blur sigma 4 (kernel ``2*int(4*sigma+0.5)+1`` = 33, reflect
   border, as anomalib's PatchCore ``AnomalyMapGenerator``), replicate-padded back to ``H x W``.

Everything here is in raw cosine-distance units, values in [0, 2]; the detector
divides by 2 for the [0, 1] scale of the service (exactly affine).

Where we depart from anomalib (on purpose, results unchanged up to float rounding):
the Gaussian blur runs as two matrix products (the 2-D kernel is an outer product), the
nearest-neighbour search runs in query chunks, the PCA is exact (anomalib: sklearn's
randomized solver, whose top component agrees to float precision) and the coreset
draws from a seeded generator instead of the global RNG, so that a bank is reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.dinov2 import patch_tokens

BLUR_SIGMA = 4.0  # anomalib PatchCore AnomalyMapGenerator(sigma=4)
TOP_FRACTION = 0.01  # image score: mean of the top 1 % patch distances
MASK_THRESHOLD = 10.0  # PCA first-component threshold for foreground
MASK_KERNEL = 3  # morphological kernel (dilate, then close)
MASK_BORDER = 0.2  # border fraction excluded from the sign check
MASK_MIN_CENTRE_FRACTION = 0.35  # flip the PCA sign when the centre is <= 35 % foreground
CORESET_EPS = 0.9  # sparse random projection distortion (anomalib KCenterGreedy)
CORESET_SEED = 0
NN_CHUNK_ELEMENTS = 1 << 24  # similarity entries per query chunk (64 MiB in float32)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropBox:
    """Centre crop of an ``H x W`` input to a multiple of the patch size.

    ``top/bottom/left/right`` are the pixels removed (the odd one goes to bottom/right);
    ``grid`` is the patch grid ``(gh, gw)`` of the cropped input.
    """

    height: int
    width: int
    top: int
    bottom: int
    left: int
    right: int
    patch: int

    @classmethod
    def for_size(cls, height: int, width: int, patch: int) -> CropBox:
        ch, cw = height % patch, width % patch
        return cls(height, width, ch // 2, ch - ch // 2, cw // 2, cw - cw // 2, patch)

    @property
    def cropped(self) -> tuple[int, int]:
        return self.height - self.top - self.bottom, self.width - self.left - self.right

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.cropped
        return h // self.patch, w // self.patch

    @property
    def is_identity(self) -> bool:
        return self.top == self.bottom == self.left == self.right == 0

    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[..., H, W] -> [..., h, w]`` (a view)."""
        return pixels[..., self.top : self.height - self.bottom, self.left : self.width - self.right]

    def pad(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w] -> [B, C, H, W]``, replicating the border values."""
        if self.is_identity:
            return maps
        return F.pad(maps, (self.left, self.right, self.top, self.bottom), mode="replicate")


# ----------------------------------------------------------------------------- scoring
def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_elements: int = NN_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Cosine distance of each query to its nearest bank patch(es).

    Args:
        queries: ``[Q, D]`` L2-normalised float32.
        bank: ``[M, D]`` L2-normalised float32.
        k: neighbours; the distance is the mean over the ``k`` nearest (``k`` >= 1).

    Returns:
        ``[Q]`` float32 in [0, 2]: ``clamp(1 - sim, 0, 2)`` of the nearest (mean of k).
        Since ``1 - s`` is monotone, the ``k`` smallest distances are ``1 -`` the ``k``
        largest similarities, taken in the same (ascending-distance) order.
    """
    if bank.numel() == 0:
        raise ValueError("the memory bank is empty")
    k = max(1, int(k))
    if k > bank.shape[0]:
        raise ValueError(f"num_neighbours={k} exceeds the memory bank size {bank.shape[0]}")
    rows = max(1, chunk_elements // bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows):
        sim = queries[start : start + rows] @ bank.T  # [q, M]
        top = sim.topk(k, dim=1, largest=True).values  # [q, k], descending similarity
        dist = (1.0 - top).clamp_(0.0, 2.0)  # ascending distance
        out.append(dist.mean(dim=1) if k > 1 else dist[:, 0])
    return torch.cat(out) if out else queries.new_zeros(0)


def mean_top_fraction(distances: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """``[B, N] -> [B]``: mean of the ``max(int(N * fraction), 1)`` largest values per row."""
    n_top = max(int(distances.shape[-1] * fraction), 1)
    return distances.topk(n_top, dim=-1, largest=True).values.mean(dim=-1)


def gaussian_kernel1d(sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``2*int(4*sigma+0.5)+1`` taps (kornia / anomalib definition), float32."""
    size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _reflect_index(n: int, r: int) -> torch.Tensor:
    """Source index of each position of a length-``n`` axis padded by ``r`` with torch ``reflect``."""
    i = torch.arange(-r, n + r)
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)  # [n + 2r]


@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """``[n, n]`` float64 matrix of a 1-D Gaussian blur with ``reflect`` borders: ``y = K @ x``.

    Row ``i`` holds the kernel taps of output ``i`` folded onto their reflected sources.
    A constant (cached, read-only by convention), not request state.
    """
    k = gaussian_kernel1d(sigma).double()
    r = k.numel() // 2
    if n <= r:
        raise ValueError(f"the blur needs more than {r} pixels per side, got {n}")
    src = _reflect_index(n, r)  # [n + 2r]
    mat = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        mat[i].index_add_(0, src[i : i + 2 * r + 1], k)
    return mat


def gaussian_blur(maps: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of ``[B, 1, H, W]`` with torch ``reflect`` borders (anomalib ``GaussianBlur2d``).

    anomalib pads (reflect) and convolves with the 2-D kernel ``outer(k, k)`` (renormalised
    to sum 1, a no-op up to rounding). The kernel is separable and padding + 1-D
    convolution along an axis is the matrix :func:`blur_matrix`, so the blur is
    ``K_h @ X @ K_w^T``: the same weighted sums in another order (agrees to float
    rounding), and on CPU far faster than a 33x33 single-channel convolution.
    Needs ``H, W > 2*int(4*sigma+0.5)`` (16 for sigma 4).
    """
    h, w = int(maps.shape[-2]), int(maps.shape[-1])
    # float64 products: the result is then within the reference's own float32 rounding
    kh = blur_matrix(h, sigma).to(maps.device)
    kw = kh if w == h else blur_matrix(w, sigma).to(maps.device)
    return (kh @ maps.double() @ kw.T).to(maps.dtype)  # [B, 1, H, W]


def anomaly_map(patch_distances: torch.Tensor, box: CropBox, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """``[B, gh*gw]`` patch distances -> ``[B, H, W]`` map over the full (uncropped) input.

    Nearest upsampling to the cropped size (``F.interpolate`` default mode), blur,
    replicate padding over the cropped border (anomalib ``AnomalyDINOModel.forward``).
    """
    b = patch_distances.shape[0]
    grid = patch_distances.view(b, 1, *box.grid)  # [B, 1, gh, gw]
    up = F.interpolate(grid, size=box.cropped)  # [B, 1, h, w]
    return box.pad(gaussian_blur(up, sigma))[:, 0]  # [B, H, W]


# ----------------------------------------------------------------------------- masking
def _principal_component_scores(features: torch.Tensor) -> torch.Tensor:
    """``[N, D] -> [N]``: scores on the first principal component (sklearn ``PCA(1).fit_transform``).

    Centred in float32 (as sklearn on float32 input); the component is the top
    eigenvector of the covariance, computed in float64, signed so that its largest-
    magnitude entry is positive (sklearn's ``svd_flip(u_based_decision=False)``).
    """
    x = features.float()
    centred = x - x.mean(dim=0, keepdim=True)  # [N, D]
    c64 = centred.double()
    _, vecs = torch.linalg.eigh(c64.T @ c64)  # ascending eigenvalues
    v = vecs[:, -1]  # [D]
    v = v * torch.sign(v[v.abs().argmax()])
    return (c64 @ v).float()  # [N]


def _dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary dilation of ``[H, W]`` float {0,1}; outside the image does not count (OpenCV default)."""
    return F.max_pool2d(mask[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]


def _erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary erosion; outside the image does not count (OpenCV default border for erosion)."""
    return -F.max_pool2d(-mask[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]


def background_masks(
    features: torch.Tensor,
    grid: tuple[int, int],
    threshold: float = MASK_THRESHOLD,
    kernel: int = MASK_KERNEL,
    border: float = MASK_BORDER,
) -> torch.Tensor:
    """Foreground masks from PCA of each image's patch features (anomalib ``compute_background_masks``).

    Per image: first-PC score > ``threshold`` is foreground; if the centre region
    (``border`` excluded on each side) is at most 35 % foreground the sign is flipped;
    then a ``kernel x kernel`` dilation and a closing (dilation, erosion).

    Args:
        features: ``[B, N, D]`` patch tokens (before L2 normalisation), ``N = gh*gw``.
        grid: ``(gh, gw)``.

    Returns:
        ``[B, N]`` bool, True = foreground (kept).
    """
    gh, gw = grid
    y0, y1 = int(gh * border), int(gh * (1 - border))
    x0, x1 = int(gw * border), int(gw * (1 - border))
    out = []
    for feats in features:
        pc = _principal_component_scores(feats)  # [N]
        mask = (pc > threshold).view(gh, gw)
        centre = mask[y0:y1, x0:x1]
        if centre.sum() <= centre.numel() * MASK_MIN_CENTRE_FRACTION:
            mask = (-pc > threshold).view(gh, gw)
        m = _dilate(mask.float(), kernel)
        m = _erode(_dilate(m, kernel), kernel)  # closing
        out.append(m.bool().flatten())
    return torch.stack(out)


# ----------------------------------------------------------------------------- coreset
def johnson_lindenstrauss_dim(n_samples: int, eps: float = CORESET_EPS) -> int:
    """Components a sparse random projection keeps: ``int(4 ln n / (eps^2/2 - eps^3/3))``."""
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


def sparse_random_projection(
    n_features: int, n_components: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Very sparse random projection matrix ``[n_components, n_features]`` (Li et al. 2006).

    Entries are ``+-sqrt(1/density)/sqrt(n_components)`` with probability ``density``
    (``1/sqrt(n_features)``) each, 0 otherwise: the distribution anomalib's
    ``SparseRandomProjection`` draws from (binomial count, then uniform positions).
    """
    density = 1.0 / math.sqrt(n_features)
    nonzero = torch.rand(n_components, n_features, generator=generator) < density
    signs = torch.randint(0, 2, (n_components, n_features), generator=generator).float() * 2 - 1
    scale = math.sqrt(1.0 / density) / math.sqrt(n_components)
    return (nonzero.float() * signs * scale).to(device)


def kcenter_greedy(
    embedding: torch.Tensor, sampling_ratio: float, *, seed: int = CORESET_SEED, project: bool = True
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``embedding`` (anomalib ``KCenterGreedy``).

    ``int(M * sampling_ratio)`` points: a random first point (included), then repeatedly
    the point farthest (Euclidean, in the randomly projected space) from all chosen ones.

    Args:
        embedding: ``[M, D]`` float32.
        sampling_ratio: fraction kept, in (0, 1].
        seed: seeds the projection and the first point (a bank is reproducible).
        project: use the sparse random projection (anomalib does); False = raw features.

    Returns:
        ``[K]`` int64 indices, in selection order.
    """
    m = embedding.shape[0]
    size = int(m * sampling_ratio)
    if size <= 0:
        raise ValueError(
            f"coreset size must be positive: sampling_ratio {sampling_ratio} of {m} patches gives {size}"
        )
    gen = torch.Generator().manual_seed(seed)
    feats = embedding.float()
    if project:
        proj = sparse_random_projection(
            feats.shape[1], johnson_lindenstrauss_dim(m), gen, device=feats.device
        )  # [C, D]
        feats = feats @ proj.T  # [M, C]
    idx = int(torch.randint(m, (1,), generator=gen).item())
    selected = [idx]
    min_dist = torch.linalg.norm(feats - feats[idx], dim=1)  # [M]
    for _ in range(size - 1):
        min_dist[idx] = 0.0
        idx = int(min_dist.argmax().item())
        selected.append(idx)
        min_dist = torch.minimum(min_dist, torch.linalg.norm(feats - feats[idx], dim=1))
    return torch.tensor(selected, dtype=torch.long)


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class PatchFeatures:
    """Features of a batch of same-size inputs.

    Attributes:
        features: ``[B, N, D]`` float32, L2-normalised along D.
        masks: ``[B, N]`` bool foreground masks (all True without masking).
        box: the centre crop (input size, grid).
    """

    features: torch.Tensor
    masks: torch.Tensor
    box: CropBox


@dataclass(frozen=True)
class AnomalyDinoOutput:
    """Raw AnomalyDINO output for a batch, in cosine-distance units ([0, 2]).

    Attributes:
        pred_score: ``[B]`` mean of the top 1 % patch distances.
        anomaly_map: ``[B, H, W]`` blurred map over the model input (``image_size``).
        patch_distances: ``[B, gh, gw]`` nearest-neighbour distances (0 where masked).
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_distances: torch.Tensor


class AnomalyDinoModel(nn.Module):
    """AnomalyDINO on a timm DINOv2 ViT: features, memory bank, scores and maps.

    Holds no bank and no request state: the bank is an argument (immutable reference
    sets live outside), so one model serves several products and threads.

    Args:
        vit: timm DINOv2 ``VisionTransformer`` built with ``dynamic_img_size=True``.
        patch_size: its patch size (14).
        num_neighbours: ``k`` of the nearest-neighbour distance (anomalib default 1).
        masking: PCA background masking of golden and inspected images.
        dtype: backbone compute dtype (float32 or bfloat16); distances are float32.
        sigma: Gaussian blur sigma of the map.
    """

    def __init__(
        self,
        *,
        vit: nn.Module,
        patch_size: int,
        num_neighbours: int = 1,
        masking: bool = False,
        dtype: torch.dtype = torch.float32,
        sigma: float = BLUR_SIGMA,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.patch_size = int(patch_size)
        self.num_neighbours = max(1, int(num_neighbours))
        self.masking = bool(masking)
        self.dtype = dtype
        self.sigma = float(sigma)

    @torch.no_grad()
    def extract(self, pixels: torch.Tensor) -> PatchFeatures:
        """``[B, 3, H, W]`` normalised float32 pixels -> :class:`PatchFeatures`."""
        box = CropBox.for_size(int(pixels.shape[-2]), int(pixels.shape[-1]), self.patch_size)
        raw = patch_tokens(self.vit, box.crop(pixels).to(self.dtype)).float()  # [B, N, D]
        if self.masking:
            masks = background_masks(raw, box.grid)
        else:
            masks = torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device)
        return PatchFeatures(features=F.normalize(raw, p=2, dim=-1), masks=masks, box=box)

    @staticmethod
    def bank_from(parts: Sequence[PatchFeatures]) -> torch.Tensor:
        """Memory bank ``[M, D]``: the foreground features of every image, stacked."""
        rows = [p.features[p.masks] for p in parts]  # each [m_i, D]
        return torch.cat(rows) if rows else torch.zeros(0)

    @torch.no_grad()
    def score(self, feats: PatchFeatures, bank: torch.Tensor) -> AnomalyDinoOutput:
        """Scores and maps of ``feats`` against ``bank`` (``[M, D]`` L2-normalised float32)."""
        b, n, _ = feats.features.shape
        query = feats.features[feats.masks]  # [Q, D] foreground patches, image-major
        dist = nearest_distances(query, bank.to(query.device, torch.float32), self.num_neighbours)
        full = torch.zeros(b, n, dtype=torch.float32, device=query.device)
        full[feats.masks] = dist  # masked (background) patches stay 0
        return AnomalyDinoOutput(
            pred_score=mean_top_fraction(full),
            anomaly_map=anomaly_map(full, feats.box, self.sigma),
            patch_distances=full.view(b, *feats.box.grid),
        )

    def forward(self, pixels: torch.Tensor, bank: torch.Tensor) -> AnomalyDinoOutput:
        return self.score(self.extract(pixels), bank)


__all__ = [
    "BLUR_SIGMA",
    "TOP_FRACTION",
    "AnomalyDinoModel",
    "AnomalyDinoOutput",
    "CropBox",
    "PatchFeatures",
    "anomaly_map",
    "background_masks",
    "gaussian_blur",
    "gaussian_kernel1d",
    "johnson_lindenstrauss_dim",
    "kcenter_greedy",
    "mean_top_fraction",
    "nearest_distances",
    "sparse_random_projection",
]
