"""MuSc maths (Li et al., ICLR 2024, "MuSc: zero-shot industrial anomaly classification
and segmentation with mutual scoring of the unlabeled images"): pure functions.

Pipeline (official code ``xrli-U/MuSc``, ``models/musc.py`` and ``models/modules``):

1. **Tokens**: the patch tokens of several ViT blocks (raw residual stream after the
   block, class token dropped) and an image-level embedding (for RsCIN).
2. **LNAMD** (local neighbourhood aggregation with multiple degrees), per block and per
   degree ``r``: LayerNorm of each image's ``[C, h, w]`` token map (no affine), the mean
   over each ``r x r`` neighbourhood with zero padding (the official unfold +
   ``adaptive_avg_pool1d`` is exactly ``avg_pool2d(count_include_pad=True)``), then L2
   normalisation over channels.
3. **MSM** (mutual scoring): for each patch of an image, its Euclidean distance to the
   nearest patch of each OTHER image; the patch score is the mean of the per-image
   distances that lie in the lowest interval ``[topmin_min, topmin_max)`` of the other
   images (official 0 .. 0.3, i.e. the lowest 30 %).
4. Patch scores are averaged over blocks, then over degrees, upsampled bilinearly
   (``align_corners=True``) to the processing size; the image score is the map's maximum.
   The official code does not smooth the map.
5. **RsCIN** (re-scoring with constrained image-level neighbourhood), a batch-level step:
   the image scores are min-max normalised over the batch and each is replaced by the
   mean over ``k`` in ``k_list`` of the average score of its ``k`` most similar images
   (dot product of image embeddings, the image itself included).

Everything here works on float tensors and returns the official units: distances between
unit vectors (in [0, 2]). The detector maps them to the [0, 1] result contract.
Where the official code is undefined (it crashes or divides by zero) we say what we do
instead; each such place is marked ``(deviation)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: official ``configs/musc.yaml`` / ``scripts/musc.sh`` settings
R_LIST: tuple[int, ...] = (1, 3, 5)
TOPMIN_MIN = 0.0
TOPMIN_MAX = 0.3
#: official RsCIN ``k_list``: ``[1, 2, 3]`` for MVTec-AD and BTAD (and any other dataset),
#: ``[1, 8, 9]`` for VisA
RSCIN_K: tuple[int, ...] = (1, 2, 3)
RSCIN_K_VISA: tuple[int, ...] = (1, 8, 9)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default, as the official LNAMD builds it
#: references (bank images or other batch images) compared in one ``cdist`` call
DEFAULT_CHUNK = 8


@dataclass(frozen=True)
class BackboneTokens:
    """What a MuSc backbone gives for a batch.

    Attributes:
        patch_tokens: per feature block ``[B, L, C]`` float (class token dropped), in
            row-major grid order; ``L = gh * gw``.
        image_embedding: ``[B, E]`` image-level embedding used by RsCIN (CLIP: projected,
            L2-normalised class token; DINOv2: final-norm class token, not normalised).
        grid: ``(gh, gw)``.
    """

    patch_tokens: tuple[torch.Tensor, ...]
    image_embedding: torch.Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class MuscScores:
    """Official-unit MuSc output for the scored (query) images.

    Attributes:
        patch_scores: ``[Q, L]`` float64 patch scores (mean over blocks and degrees).
        maps: ``[Q, S, S]`` float64 maps at the processing size ``S`` (bilinear,
            ``align_corners=True``), values = distances between unit vectors, in [0, 2].
        image_scores: ``[Q]`` float64, the maximum of each map (before RsCIN).
        rscin_scores: ``[Q]`` float32 RsCIN scores, or ``None`` where RsCIN was not applied.
        n_others: how many other images each query was scored against.
    """

    patch_scores: torch.Tensor
    maps: torch.Tensor
    image_scores: torch.Tensor
    rscin_scores: torch.Tensor | None
    n_others: int


# ----------------------------------------------------------------------------- backbone
def interpolate_pos_embedding_bicubic(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embedding ``[1 + g*g, W]`` resized to ``grid`` -> ``[1 + gh*gw, W]``.

    As MuSc's bundled open_clip ``resize_pos_embed`` when a model is built at another
    image size: bicubic, ``align_corners=False``, NO antialias (its ``antialias``
    argument is never passed on), class position kept. (Current open_clip passes
    ``antialias=True``, which changes the bicubic kernel, so we do not use it.)
    """
    n, width = pos.shape
    side = round((n - 1) ** 0.5)
    if side * side != n - 1:
        raise ValueError(f"positional embedding of {n} tokens is not 1 + a square grid")
    if (side, side) == tuple(grid):
        return pos
    g = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)  # [1, W, side, side]
    g = F.interpolate(g.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    g = g.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)  # [gh*gw, W]
    return torch.cat([pos[:1], g], dim=0)


def clip_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on batch-first ``[B, N, D]`` tokens.

    The same computation as ``block(x)`` (pre-norm attention through the block's own
    ``nn.MultiheadAttention`` weights, then the MLP), written out so that every matmul
    sees a contiguous batch-first tensor: ``nn.MultiheadAttention(batch_first=True)``
    transposes its input to ``[N, B, D]``, and ``F.linear`` on that transposed view is
    4x slower in fp32 and ~70x slower under CPU bf16 autocast (measured; the matmul
    expands the weight per token) as soon as ``B > 1``.
    """
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        return block(x)  # pragma: no cover - other block types keep their own forward
    b, n, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3D]
    q, k, v = (
        t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1)
    )  # [B, H, N, d/H]
    o = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d/H]
    o = o.transpose(1, 2).reshape(b, n, d)  # [B, N, D]
    x = x + block.ls_1(attn.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class ClipTokenEncoder(nn.Module):
    """MuSc tokens from an open_clip ``VisionTransformer`` (weights shared, not copied).

    Matches the official ``encode_image(image, out_layers)`` of MuSc's bundled open_clip:
    patch embedding, class token, positional embedding resized to the grid
    (:func:`interpolate_pos_embedding_bicubic`), ``ln_pre``, the blocks; the tokens taken
    are the raw outputs of the chosen blocks (no ``ln_post``, no projection). The image
    embedding is ``ln_post(class token) @ proj``, L2-normalised (as ``musc.py``).

    Args:
        visual: ``clip.visual`` (batch-first open_clip ViT).
        feature_layers: 1-indexed blocks (official ``feature_layers`` + 1).
    """

    def __init__(self, *, visual: Any, feature_layers: Sequence[int]) -> None:
        super().__init__()
        self.visual = visual
        n_blocks = len(visual.transformer.resblocks)
        layers = tuple(int(i) for i in feature_layers)
        if not layers or min(layers) < 1 or max(layers) > n_blocks:
            raise ValueError(f"feature layers {layers} outside 1..{n_blocks}")
        self.feature_layers = layers
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple) else patch)
        self.token_dim = int(visual.conv1.out_channels)
        self.embedding_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.token_dim

    def forward(self, pixels: torch.Tensor) -> BackboneTokens:
        """``pixels [B, 3, S, S]`` (normalised) -> :class:`BackboneTokens`."""
        v: Any = self.visual
        x = v.conv1(pixels)  # [B, W, gh, gw]
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + gh*gw, W]
        x = x + interpolate_pos_embedding_bicubic(v.positional_embedding, grid).to(x.dtype)
        x = v.ln_pre(x)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = clip_block(block, x)  # [B, 1 + L, W]
            if i in self.feature_layers:
                taken[i] = x[:, 1:]  # [B, L, W]
        pooled = v.ln_post(x[:, 0])  # [B, W]
        if v.proj is not None:
            pooled = pooled @ v.proj  # [B, E]
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        return BackboneTokens(
            patch_tokens=tuple(taken[layer] for layer in self.feature_layers),
            image_embedding=pooled,
            grid=grid,
        )


DINOV2_INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2 ``interpolate_offset`` default


def interpolate_pos_embedding_dinov2(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2 position embedding ``[1, 1 + M*M, D]`` for a square ``grid`` -> ``[1, 1 + g*g, D]``.

    As the official torch-hub DINOv2 (``interpolate_pos_encoding``) that MuSc loads: unchanged
    when the grid is the trained one (37 x 37 at 518), otherwise bicubic with
    ``scale_factor = (g + 0.1) / M`` (not a target size), no antialias, in float32.
    (timm's ``dynamic_img_size`` resamples to a target size instead, which differs.)
    """
    if grid[0] != grid[1]:
        raise ValueError(f"MuSc processes square images; got a {grid[0]}x{grid[1]} grid")
    _, n1, dim = pos.shape
    m = round((n1 - 1) ** 0.5)
    if m * m != n1 - 1:
        raise ValueError(f"position embedding of {n1} tokens is not 1 + a square grid")
    g = grid[0]
    if g == m:
        return pos
    patch = pos[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    scale = float(g + DINOV2_INTERPOLATE_OFFSET) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (g, g):
        raise RuntimeError(f"position embedding resized to {tuple(patch.shape[-2:])}, expected {(g, g)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, g * g, dim).to(pos.dtype)  # [1, g*g, D]
    return torch.cat([pos[:, :1], patch], dim=1)


class Dinov2TokenEncoder(nn.Module):
    """MuSc tokens from a timm DINOv2 ``VisionTransformer`` (:mod:`models.dinov2` builds it).

    Matches what the official code takes from the torch-hub DINOv2:
    ``get_intermediate_layers(x, n=blocks, return_class_token=False)`` (default
    ``norm=True``: the FINAL LayerNorm applied to each chosen block's output, class token
    dropped), and ``model(x)`` as the image embedding (the final-norm class token, not
    L2-normalised). Position embedding: :func:`interpolate_pos_embedding_dinov2`.

    Args:
        model: timm DINOv2 ViT (class token, no register tokens).
        feature_layers: 1-indexed blocks (official ``feature_layers`` + 1, e.g. 3, 6, 9, 12).
    """

    def __init__(self, *, model: Any, feature_layers: Sequence[int]) -> None:
        super().__init__()
        if getattr(model, "reg_token", None) is not None or model.cls_token is None or model.no_embed_class:
            raise ValueError("expected a DINOv2 ViT with a class token, no register tokens")
        self.model = model
        n_blocks = len(model.blocks)
        layers = tuple(int(i) for i in feature_layers)
        if not layers or min(layers) < 1 or max(layers) > n_blocks:
            raise ValueError(f"feature layers {layers} outside 1..{n_blocks}")
        self.feature_layers = layers
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.token_dim = int(model.embed_dim)
        self.embedding_dim = int(model.embed_dim)

    def forward(self, pixels: torch.Tensor) -> BackboneTokens:
        """``pixels [B, 3, S, S]`` (ImageNet-normalised) -> :class:`BackboneTokens`."""
        m: Any = self.model
        x = m.patch_embed(pixels)  # [B, gh, gw, D] (NHWC: built with dynamic_img_size)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # [B, L, D]
        x = torch.cat([m.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)  # [B, 1 + L, D]
        x = x + interpolate_pos_embedding_dinov2(m.pos_embed, (gh, gw)).to(x.dtype)
        x = m.norm_pre(x)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(m.blocks, start=1):
            x = block(x)  # [B, 1 + L, D]
            if i in self.feature_layers:
                taken[i] = m.norm(x)[:, 1:]  # [B, L, D]
        return BackboneTokens(
            patch_tokens=tuple(taken[layer] for layer in self.feature_layers),
            image_embedding=m.norm(x)[:, 0],  # [B, D]
            grid=(int(gh), int(gw)),
        )


# ----------------------------------------------------------------------------- LNAMD
def layer_norm_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """First half of LNAMD: ``[B, L, C]`` tokens -> ``[B, L, C]`` LayerNormed per image.

    The official code applies a fresh ``nn.LayerNorm([C, h, w])`` (weight 1, bias 0,
    eps 1e-5) to each image's token map: one mean and variance over ALL ``C*h*w`` values
    of the image. Computed in float32.
    """
    b, n, c = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    x = tokens.float().reshape(b, n * c)
    return F.layer_norm(x, (n * c,), eps=LAYER_NORM_EPS).reshape(b, n, c)


def aggregate_neighbourhood(normed: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Second half of LNAMD: ``[B, L, C]`` LayerNormed tokens -> ``[B, L, C]`` unit vectors.

    Each token becomes the mean of its ``r x r`` neighbourhood (zero padding counted, as
    the official unfold with ``padding=(r-1)/2`` followed by the mean over each channel's
    ``r*r`` values), then is divided by its L2 norm. ``r`` must be odd and positive
    (an even ``r`` changes the grid size in the official code too).
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degree r must be a positive odd integer, got {r}")
    b, n, c = normed.shape
    x = normed.float()
    if r > 1:
        m = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # [B, C, gh, gw]
        m = F.avg_pool2d(m, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
        x = m.reshape(b, c, n).transpose(1, 2)  # [B, L, C]
    return x / x.norm(dim=-1, keepdim=True)


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """LNAMD of one block: ``[B, L, C]`` raw tokens -> ``[B, L, C]`` float32 unit vectors."""
    return aggregate_neighbourhood(layer_norm_tokens(tokens, grid), grid, r)


# ----------------------------------------------------------------------------- MSM
def interval_bounds(
    n_others: int, topmin_min: float = TOPMIN_MIN, topmin_max: float = TOPMIN_MAX
) -> tuple[int, int]:
    """``(k_min, k_max)``: which sorted per-image distances the patch score averages.

    As the official ``compute_scores_fast``: a bound below 1 is a fraction of the number
    of other images (``int(n * fraction)``), otherwise a count; swapped if reversed.
    (deviation) The official interval is empty, and the score NaN, when
    ``k_max == k_min`` (e.g. fewer than 4 other images at 0 .. 0.3); we then widen it to
    one image: ``k_max = k_min + 1`` (with fewer than 4 others: the nearest image only).
    """
    if n_others < 1:
        raise ValueError("mutual scoring needs at least one other image")
    k_max = int(n_others * topmin_max) if topmin_max < 1 else int(topmin_max)
    k_min = int(n_others * topmin_min) if topmin_min < 1 else int(topmin_min)
    if k_max < k_min:
        k_max, k_min = k_min, k_max
    k_max = min(k_max, n_others)
    k_min = min(k_min, n_others - 1)
    if k_max <= k_min:
        k_max = k_min + 1
    return k_min, k_max


def interval_mean(distances: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """``[..., M]`` per-image nearest distances -> ``[...]`` float32 mean of sorted ``[k_min, k_max)``."""
    vals = torch.sort(distances.float(), dim=-1).values[..., k_min:k_max]
    return vals.mean(dim=-1)


def nearest_distances(
    queries: torch.Tensor, references: torch.Tensor, *, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Distance of every query patch to the nearest patch of each reference image.

    Args:
        queries: ``[Q, L, C]`` float32 unit vectors.
        references: ``[M, L2, C]`` (any float dtype; compared in float32).
        chunk: reference images per ``cdist`` call (bounds memory to ``L * chunk * L2``).

    Returns:
        ``[Q, L, M]`` float32 (``torch.cdist``, as the official MSM).
    """
    q, n, c = queries.shape
    m = references.shape[0]
    out = torch.empty(q, n, m, dtype=torch.float32, device=queries.device)
    for s in range(0, m, max(1, chunk)):
        refs = references[s : s + chunk].float()  # [m', L2, C]
        k = refs.shape[0]
        flat = refs.reshape(-1, c)  # [m'*L2, C]
        for i in range(q):
            d = torch.cdist(queries[i].float(), flat)  # [L, m'*L2]
            out[i, :, s : s + k] = d.view(n, k, refs.shape[1]).amin(dim=-1)
    return out


def mutual_distances(queries: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Nearest-patch distances among the queries themselves, each pair computed once.

    Args:
        queries: ``[Q, L, C]`` float32 unit vectors.

    Returns:
        ``[Q, L, Q]``: entry ``[i, p, j]`` is the distance of patch ``p`` of image ``i``
        to the nearest patch of image ``j``; the diagonal ``j == i`` is ``+inf``.
        ``cdist(Z_i, Z_j)`` gives both directions (row and column minima).
    """
    q, n, c = queries.shape
    out = torch.full((q, n, q), float("inf"), dtype=torch.float32, device=queries.device)
    for i in range(q - 1):
        for s in range(i + 1, q, max(1, chunk)):
            refs = queries[s : s + chunk].float()  # [m', L, C]
            k = refs.shape[0]
            d = torch.cdist(queries[i].float(), refs.reshape(-1, c)).view(n, k, n)  # [L_i, m', L_j]
            out[i, :, s : s + k] = d.amin(dim=-1)  # patches of i -> nearest in each j
            out[s : s + k, :, i] = d.amin(dim=0)  # patches of each j -> nearest in i  [m', L_j]
    return out


def msm(
    queries: torch.Tensor,
    bank: torch.Tensor | None = None,
    *,
    topmin_min: float = TOPMIN_MIN,
    topmin_max: float = TOPMIN_MAX,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Mutual scoring of the queries within the set ``queries + bank``.

    Each query image is scored against every OTHER image of the set: the other queries
    and all bank images. With ``bank=None`` this is the official batch MSM; with one
    query it is stream mode (the query against the bank).

    Args:
        queries: ``[Q, L, C]`` float32 unit vectors (LNAMD output of one block and degree).
        bank: ``[M, L, C]`` unit vectors of bank images (any float dtype), or ``None``.

    Returns:
        ``[Q, L]`` float32 patch scores.
    """
    q = queries.shape[0]
    m = 0 if bank is None else bank.shape[0]
    n_others = q - 1 + m
    k_min, k_max = interval_bounds(n_others, topmin_min, topmin_max)
    parts = []
    if q > 1:
        mutual = mutual_distances(queries, chunk=chunk)  # [Q, L, Q], diagonal inf
        keep = ~torch.eye(q, dtype=torch.bool, device=queries.device)
        parts.append(mutual.permute(0, 2, 1)[keep].view(q, q - 1, -1).permute(0, 2, 1))  # [Q, L, Q-1]
    if bank is not None and m > 0:
        parts.append(nearest_distances(queries, bank, chunk=chunk))  # [Q, L, M]
    dist = torch.cat(parts, dim=-1)  # [Q, L, n_others]
    return interval_mean(dist, k_min, k_max)


# ----------------------------------------------------------------------------- RsCIN
def rscin(scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int] = RSCIN_K) -> torch.Tensor:
    """RsCIN re-scoring of a batch's image scores (official ``_RsCIN.py``).

    Scores are min-max normalised over the batch; ``W = E E^T`` (dot products of the image
    embeddings); for each ``k`` every row of ``W`` keeps its ``k`` largest entries (the
    rest set to 0) and is normalised to sum 1; the new score is the weighted mean of the
    normalised scores; the results for all ``k`` are averaged. ``0`` in ``k_list`` (or an
    empty list) switches RsCIN off (the scores are returned unchanged, as float32).

    (deviation) ``k`` larger than the batch makes the official ``topk`` raise; we use
    ``min(k, N)`` (``k = N`` keeps every image, as the official code does for ``k == N``).
    (deviation) When all scores are equal the official normalisation divides by zero
    (NaN); we return zeros.

    Args:
        scores: ``[N]`` image scores (float64 in the official code).
        embeddings: ``[N, E]`` image embeddings.

    Returns:
        ``[N]`` float32.
    """
    n = scores.shape[0]
    if not k_list or 0 in k_list:
        return scores.float()
    s = scores.double()
    span = s.max() - s.min()
    if float(span) == 0.0:
        return torch.zeros(n, dtype=torch.float32, device=scores.device)
    norm = ((s - s.min()) / span).float()  # [N]
    w = embeddings.float() @ embeddings.float().T  # [N, N]
    out = []
    for k in k_list:
        kk = min(int(k), n)
        top = torch.topk(w, kk, dim=1, largest=True).indices  # [N, k]
        mask = torch.zeros_like(w).scatter_(1, top, 1.0)
        wk = w * mask
        p = wk / wk.sum(dim=1, keepdim=True)  # row-stochastic (as D^-1 W)
        out.append(p @ norm)  # [N]
    return torch.stack(out, dim=-1).mean(dim=-1)


# ----------------------------------------------------------------------------- all together
def upsample_patch_scores(patch_scores: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """``[Q, L]`` -> ``[Q, size, size]``: bilinear, ``align_corners=True`` (official), same dtype."""
    q = patch_scores.shape[0]
    m = patch_scores.reshape(q, 1, grid[0], grid[1])
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def musc_patch_scores(
    query_normed: Sequence[torch.Tensor],
    grid: tuple[int, int],
    *,
    bank_normed: Sequence[torch.Tensor] | None = None,
    r_list: Sequence[int] = R_LIST,
    topmin_min: float = TOPMIN_MIN,
    topmin_max: float = TOPMIN_MAX,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """LNAMD + MSM over all blocks and degrees: ``[Q, L]`` float64 patch scores.

    Args:
        query_normed: per block ``[Q, L, C]`` LayerNormed tokens (:func:`layer_norm_tokens`).
        bank_normed: per block ``[M, L, C]`` LayerNormed tokens of the bank (e.g. float16),
            or ``None`` (batch mode).
        r_list: LNAMD degrees (official 1, 3, 5).

    The official order of means: over blocks for each degree, then over degrees (float64).
    """
    if not r_list:
        raise ValueError("r_list must name at least one aggregation degree")
    if bank_normed is not None and len(bank_normed) != len(query_normed):
        raise ValueError(f"bank has {len(bank_normed)} feature blocks, queries {len(query_normed)}")
    per_r = []
    for r in r_list:
        per_layer = []
        for li, qn in enumerate(query_normed):
            zq = aggregate_neighbourhood(qn, grid, r)  # [Q, L, C]
            zb = None
            if bank_normed is not None:
                zb = aggregate_neighbourhood(bank_normed[li], grid, r)  # [M, L, C]
            s = msm(zq, zb, topmin_min=topmin_min, topmin_max=topmin_max, chunk=chunk)
            per_layer.append(s.double())
        per_r.append(torch.stack(per_layer).mean(dim=0))
    return torch.stack(per_r).mean(dim=0)


def score_maps(
    patch_scores: torch.Tensor, grid: tuple[int, int], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Q, L]`` float64 -> (maps ``[Q, size, size]`` float64, image scores ``[Q]`` = map maxima)."""
    maps = upsample_patch_scores(patch_scores.double(), grid, size)
    return maps, maps.reshape(maps.shape[0], -1).amax(dim=-1)
