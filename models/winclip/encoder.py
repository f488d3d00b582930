"""WinCLIP image encoding: full-image pass plus window embeddings by token dropping.

A window embedding is computed by keeping the CLS token and the window's patch
tokens (each with its own positional embedding) of the sequence taken after
patch embedding + positional embedding and before ``ln_pre``, then running the
rest of the tower. All windows of one scale, for all images of a batch, go
through ONE forward pass (``B * n_windows`` sequences of ``1 + k*k`` tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.winclip.maths import make_masks, patch_window_index

TowerFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class VisualTower(nn.Module):
    """The part of an open_clip ViT after the positional embedding.

    ``forward(x [N, L, D]) -> (pooled [N, E], tokens [N, L-1, D])``: ``ln_pre``,
    transformer, ``ln_post``; ``pooled`` is the CLS token projected to the joint
    space, ``tokens`` the other tokens after ``ln_post`` (not projected).
    Shares its parameters with the open_clip model it wraps.
    """

    ln_pre: Any
    transformer: Any
    ln_post: Any
    proj: Any

    def __init__(self, visual: Any) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise ValueError("WinCLIP needs a ViT with CLS pooling after ln_post (no attention pooling)")
        if getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError(f"WinCLIP needs CLS-token pooling, got pool_type={visual.pool_type!r}")
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError("expected a batch-first open_clip transformer (open_clip >= 2.26)")
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.ln_pre(x)  # [N, L, D]
        x = self.transformer(x)  # [N, L, D]
        x = self.ln_post(x)
        pooled = x[:, 0]  # [N, D]
        if self.proj is not None:
            pooled = pooled @ self.proj  # [N, E]
        return pooled, x[:, 1:]


class PackedTower(nn.Module):
    """The same computation as :class:`VisualTower` for several groups of sequences in ONE pass.

    Token-wise layers (LayerNorms, QKV / output projections, MLP) run on the tokens
    of all groups stacked into one ``[T, D]`` matrix — a few large GEMMs instead of
    one set per group — and attention runs within each sequence. Used by WinCLIP to
    put the full image and all windows of all scales of a batch through a single
    pass. Shares its parameters with the wrapped model.
    """

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.base = VisualTower(visual)
        for blk in self.base.transformer.resblocks:
            attn = blk.attn
            plain = (
                isinstance(attn, nn.MultiheadAttention)
                and attn._qkv_same_embed_dim
                and attn.in_proj_bias is not None
                and not hasattr(blk, "ln_attn")
                and isinstance(getattr(blk.attn, "out_proj", None), nn.Linear)
                and isinstance(blk.mlp, nn.Sequential)
            )
            if not plain:
                raise ValueError("PackedTower supports plain open_clip ResidualAttentionBlocks only")
        self.heads = self.base.transformer.resblocks[0].attn.num_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ((pooled, tokens),) = self.forward_groups([x])
        return pooled, tokens

    def forward_groups(self, groups: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``groups[i]: [N_i, L_i, D]`` -> per group ``(pooled [N_i, E], tokens [N_i, L_i-1, D])``."""
        shapes = [(g.shape[0], g.shape[1]) for g in groups]
        d = groups[0].shape[-1]
        hd = d // self.heads
        x = torch.cat([g.reshape(-1, d) for g in groups])  # [T, D]
        x = self.base.ln_pre(x)
        for blk in self.base.transformer.resblocks:
            attn = blk.attn
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [T, 3D]
            outs, start = [], 0
            for n, length in shapes:
                part = qkv[start : start + n * length].view(n, length, 3, self.heads, hd)
                q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [n, H, L, hd]
                o = F.scaled_dot_product_attention(q, k, v)  # [n, H, L, hd]
                outs.append(o.transpose(1, 2).reshape(n * length, d))
                start += n * length
            x = x + blk.ls_1(attn.out_proj(torch.cat(outs)))  # [T, D]
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = self.base.ln_post(x)
        results, start = [], 0
        for n, length in shapes:
            seq = x[start : start + n * length].view(n, length, d)
            pooled = seq[:, 0]
            if self.base.proj is not None:
                pooled = pooled @ self.base.proj  # [n, E]
            results.append((pooled, seq[:, 1:]))
            start += n * length
        return results


class LowPrecisionTower(nn.Module):
    """A copy of a visual tower in bf16/fp16; takes and returns float32."""

    def __init__(self, tower: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner: Any = copy.deepcopy(tower).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.inner(x.to(self.dtype))
        return pooled.float(), tokens.float()

    def forward_groups(self, groups: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not hasattr(self.inner, "forward_groups"):
            return [self.forward(g) for g in groups]
        return [
            (p.float(), t.float()) for p, t in self.inner.forward_groups([g.to(self.dtype) for g in groups])
        ]


@dataclass(frozen=True)
class EncodedImages:
    """Embeddings of a batch of images.

    Attributes:
        image: ``[B, E]`` projected CLS embeddings of the whole images.
        patches: ``[B, P, D]`` patch tokens after ``ln_post`` (not projected).
        windows: per scale ``k``, ``[B, n_windows_k, E]`` projected window embeddings.
    """

    image: torch.Tensor
    patches: torch.Tensor
    windows: dict[int, torch.Tensor]


class WinClipEncoder:
    """Full-image and window embeddings for an open_clip ViT.

    Args:
        visual: the open_clip ``VisionTransformer`` (patch embedding, CLS, positions).
        tower: callable ``x [N, L, D] -> (pooled [N, E], tokens [N, L-1, D])``; by
            default a :class:`VisualTower` on ``visual`` (an ONNX session or a
            low-precision copy can be passed instead). A tower with a
            ``forward_groups`` method gets the full image and all windows in one call.
        scales: window sizes in patches.
    """

    def __init__(self, *, visual: Any, scales: Sequence[int] = (2, 3), tower: TowerFn | None = None) -> None:
        self.visual = visual
        self.tower: TowerFn = tower if tower is not None else VisualTower(visual)
        gs = visual.grid_size
        self.grid_size: tuple[int, int] = (int(gs[0]), int(gs[1]))
        self.n_patches = self.grid_size[0] * self.grid_size[1]
        self.scales = tuple(int(k) for k in scales)
        self.masks = {k: make_masks(self.grid_size, k) for k in self.scales}  # k -> [W, k*k]
        cls = torch.zeros(1, dtype=torch.long)
        # token positions kept per window: CLS (0) then the window's patches (+1 for CLS)
        self.sequence_index = {
            k: torch.cat([cls.expand(m.shape[0], 1), m + 1], dim=1) for k, m in self.masks.items()
        }
        self.aggregation_index = {k: patch_window_index(m, self.n_patches) for k, m in self.masks.items()}

    def with_tower(self, tower: TowerFn) -> WinClipEncoder:
        return WinClipEncoder(visual=self.visual, scales=self.scales, tower=tower)

    @torch.no_grad()
    def embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, 1+P, D]`` tokens (patch embed + CLS + positions)."""
        v = self.visual
        x = v.conv1(pixels)  # [B, D, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, P, D]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+P, D]
        return x + v.positional_embedding.to(x.dtype)

    @torch.no_grad()
    def window_sequences(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """All windows of scale ``k`` as separate sequences: ``[B * n_windows, 1 + k*k, D]`` (image-major)."""
        idx = self.sequence_index[k].to(tokens.device)  # [W, 1+k*k]
        seqs = tokens[:, idx]  # [B, W, 1+k*k, D]
        return seqs.reshape(-1, idx.shape[1], tokens.shape[-1])

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> EncodedImages:
        """Full images and all windows of all scales of the batch.

        With a packed tower this is ONE forward pass; otherwise one pass for the full
        images and one per scale (each holding all windows of all images).
        """
        tokens = self.embed_tokens(pixels)  # [B, 1+P, D]
        b = tokens.shape[0]
        groups = [tokens] + [self.window_sequences(tokens, k) for k in self.scales]
        forward_groups = getattr(self.tower, "forward_groups", None)
        outs = forward_groups(groups) if forward_groups is not None else [self.tower(g) for g in groups]
        image, patches = outs[0]  # [B, E], [B, P, D]
        windows = {
            k: pooled.reshape(b, -1, pooled.shape[-1])
            for k, (pooled, _) in zip(self.scales, outs[1:], strict=True)
        }
        return EncodedImages(image=image, patches=patches, windows=windows)
