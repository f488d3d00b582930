"""A straightforward MuSc written from the official code's definitions, for parity tests.

Written from ``xrli-U/MuSc`` (``models/musc.py``, ``models/modules/_LNAMD.py``,
``_MSM.py``, ``_RsCIN.py`` and its bundled open_clip ``VisionTransformer.forward``),
in the official code's own formulation: LNAMD through ``nn.Unfold`` + a fresh
``nn.LayerNorm([C, h, w])`` + ``adaptive_avg_pool1d``; MSM with the "slow" per-pair
loop and the two ``topk`` calls; RsCIN's ``MMO`` with its masking loop and diagonal
degree matrix. Shares no code with ``models/musc``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ref_pixels(images: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images already at the processing size: ToTensor + Normalize."""
    out = []
    for img in images:
        t = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255.0
        for c in range(3):
            t[c] = (t[c] - mean[c]) / std[c]
        out.append(t)
    return torch.stack(out)


def official_pixels(images: list[np.ndarray], kind: str, size: int) -> torch.Tensor:
    """The official datasets' transforms on PIL images (torchvision on PIL: uint8 resize, PIL rounding).

    ``clip``: the bundled open_clip ``image_transform(S, is_train=False)``: ``Resize((S, S),
    BICUBIC)``, ``CenterCrop((S, S))``, RGB, ``ToTensor``, ``Normalize`` (OpenAI).
    ``dinov2``: ``datasets/mvtec.py`` without a CLIP transform: ``Resize((S, S))`` (bilinear),
    ``CenterCrop(S)``, ``ToTensor``, ``Normalize`` (ImageNet), on ``convert("RGB")``.
    """
    if kind == "clip":
        transform = T.Compose(
            [
                T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop((size, size)),
                lambda im: im.convert("RGB"),
                T.ToTensor(),
                T.Normalize(OPENAI_MEAN, OPENAI_STD),
            ]
        )
    else:
        transform = T.Compose(
            [
                T.Resize((size, size)),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    return torch.stack([transform(Image.fromarray(img).convert("RGB")) for img in images])


def ref_resized_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The bundled ``resize_pos_embed``: bicubic, align_corners=False, no antialias."""
    old = int(math.sqrt(pos.shape[0] - 1))
    if old == grid:
        return pos
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)[0]
    return torch.cat([pos[:1], img], dim=0)


@torch.no_grad()
def ref_encode(
    visual: Any, pixels: torch.Tensor, out_layers: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Official ``encode_image(image, out_layers)``: tokens WITH class token, and the
    normalised image feature."""
    x = visual.conv1(pixels)
    grid = x.shape[-1]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    x = x + ref_resized_pos_embed(visual.positional_embedding.detach().clone(), grid)
    x = visual.ln_pre(x)
    tokens = []
    for idx, block in enumerate(visual.transformer.resblocks, start=1):
        x = block(x)
        if idx in out_layers:
            tokens.append(x)
    pooled = visual.ln_post(x[:, 0])
    pooled = pooled @ visual.proj
    pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return tokens, pooled


def ref_dinov2_pos_encoding(model: Any, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` (interpolate_offset 0.1, no antialias)."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    n = model.pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return model.pos_embed
    pos_embed = model.pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // model.patch_embed.patch_size[0]
    h0 = h // model.patch_embed.patch_size[0]
    m = int(math.sqrt(n))
    sx = float(w0 + 0.1) / m
    sy = float(h0 + 0.1) / m
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


@torch.no_grad()
def ref_encode_dinov2(
    model: Any, pixels: torch.Tensor, out_layers: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Official dinov2 branch of ``musc.py``: ``get_intermediate_layers(n=[l-1 ...])`` (norm=True),
    a zero "fake class token" prepended, and ``model(x)`` (final-norm class token)."""
    _, _, w, h = pixels.shape  # (the hub names dim 2 "w")
    x = model.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # hub PatchEmbed
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + ref_dinov2_pos_encoding(model, x, w, h)
    outputs = []
    blocks_to_take = [layer - 1 for layer in out_layers]
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        if i in blocks_to_take:
            outputs.append(x)
    outputs = [model.norm(out) for out in outputs]
    patch = [out[:, 1:] for out in outputs]
    fake_cls = [torch.zeros_like(p)[:, 0:1, :] for p in patch]
    tokens = [torch.cat([fake_cls[i], patch[i]], dim=1) for i in range(len(patch))]
    image_features = model.norm(x)[:, 0]
    return tokens, image_features


def ref_lnamd(tokens: list[torch.Tensor], r: int) -> torch.Tensor:
    """Official ``LNAMD._embed`` then ``features /= features.norm``: ``(B, L, layer, C)``."""
    b = tokens[0].shape[0]
    layers = []
    for feature in tokens:
        feature = feature[:, 1:, :]
        side = int(math.sqrt(feature.shape[1]))
        feature = feature.reshape(feature.shape[0], side, side, feature.shape[2]).permute(0, 3, 1, 2)
        feature = torch.nn.LayerNorm([feature.shape[1], feature.shape[2], feature.shape[3]])(feature)
        layers.append(feature)
    if r != 1:
        padding = int((r - 1) / 2)
        unfolded = []
        for f in layers:
            u = torch.nn.Unfold(kernel_size=r, stride=1, padding=padding, dilation=1)(f)
            u = u.reshape(*f.shape[:2], r, r, -1).permute(0, 4, 1, 2, 3)
            unfolded.append(u)
        layers = unfolded
    else:
        layers = [f.reshape(f.shape[0], f.shape[1], -1, 1, 1).permute(0, 2, 1, 3, 4) for f in layers]
    layers = [x.reshape(-1, *x.shape[-3:]) for x in layers]
    c = layers[0].shape[1]
    pooled = []
    for f in layers:
        f = f.reshape(len(f), 1, -1)
        pooled.append(F.adaptive_avg_pool1d(f, c).squeeze(1))
    feats = torch.stack(pooled, dim=1)
    feats = feats.reshape(b, -1, *feats.shape[-2:])
    return feats / feats.norm(dim=-1, keepdim=True)


def ref_msm(z: torch.Tensor, topmin_min: float = 0.0, topmin_max: float = 0.3) -> torch.Tensor:
    """Official ``MSM`` with ``compute_scores_slow``: ``(N, L)`` float64."""
    rows = []
    for i in range(z.shape[0]):
        cols = []
        for j in range(z.shape[0]):
            if j != i:
                cols.append(torch.min(torch.cdist(z[i], z[j]), 1)[0].unsqueeze(1))
        p2i = torch.cat(cols, dim=1)
        k_max, k_min = topmin_max, topmin_min
        if k_max < 1:
            k_max = int(p2i.shape[1] * k_max)
        if k_min < 1:
            k_min = int(p2i.shape[1] * k_min)
        if k_max < k_min:
            k_max, k_min = k_min, k_max
        vals, _ = torch.topk(p2i.float(), int(k_max), largest=False, sorted=True)
        vals, _ = torch.topk(vals.float(), int(k_max - k_min), largest=True, sorted=True)
        rows.append(torch.mean(vals, dim=1).unsqueeze(0).double())
    return torch.cat(rows, dim=0)


def ref_rscin(scores_old: np.ndarray, cls_tokens: np.ndarray, k_list: list[int]) -> np.ndarray:
    """Official ``RsCIN`` / ``MMO``."""
    scores = (scores_old - scores_old.min()) / (scores_old.max() - scores_old.min())
    w = torch.tensor(cls_tokens @ cls_tokens.T).float()
    score = torch.tensor(scores).float()
    s_list = []
    for k in k_list:
        _, topk_matrix = torch.topk(w, w.shape[0] - k, largest=False, sorted=True)
        w_mask = w.clone()
        for i in range(w.shape[0]):
            w_mask[i, topk_matrix[i]] = 0
        n = w.shape[-1]
        d = torch.zeros_like(w)
        for i in range(n):
            d[i, i] = 1 / (w_mask[i, :].sum())
        p = d @ w_mask
        s_list.append(p @ score.unsqueeze(-1))
    return torch.concat(s_list, -1).mean(-1).numpy()


@torch.no_grad()
def ref_musc(
    model: Any,
    images: list[np.ndarray],
    *,
    kind: str,
    out_layers: list[int],
    r_list: list[int],
    image_size: int,
    k_list: list[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps (N, S, S) float64, scores before RsCIN (N,), RsCIN scores (N,))`` as ``musc.py``.

    ``model``: ``clip.visual`` (``kind="clip"``) or the DINOv2 ViT (``kind="dinov2"``).
    ``images``: at ``image_size`` (ToTensor + Normalize), or any sizes (:func:`official_pixels`).
    """
    if all(img.shape[:2] == (image_size, image_size) for img in images):
        mean, std = (OPENAI_MEAN, OPENAI_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        pixels = ref_pixels(images, mean, std)
    else:
        pixels = official_pixels(images, kind, image_size)
    if kind == "clip":
        tokens, cls = ref_encode(model, pixels, out_layers)
    else:
        tokens, cls = ref_encode_dinov2(model, pixels, out_layers)
    maps_r = []
    for r in r_list:
        feats = ref_lnamd(tokens, r)
        maps_l = []
        for layer in range(len(out_layers)):
            maps_l.append(ref_msm(feats[:, :, layer, :]).unsqueeze(0))
        maps_r.append(torch.cat(maps_l, dim=0).mean(0).unsqueeze(0))
    maps = torch.cat(maps_r, dim=0).mean(0)
    b, n = maps.shape
    side = int(np.sqrt(n))
    maps = F.interpolate(maps.view(b, 1, side, side), size=image_size, mode="bilinear", align_corners=True)
    maps_np = maps.numpy()[:, 0]
    ac_score = maps_np.reshape(b, -1).max(-1)
    return maps_np, ac_score, ref_rscin(ac_score, cls.numpy(), k_list)
