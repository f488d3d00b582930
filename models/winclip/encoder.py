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

import torch
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

    def __init__(self, visual: nn.Module) -> None:
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


class LowPrecisionTower(nn.Module):
    """A copy of a :class:`VisualTower` in bf16/fp16; takes and returns float32."""

    def __init__(self, tower: VisualTower, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = copy.deepcopy(tower).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.inner(x.to(self.dtype))
        return pooled.float(), tokens.float()


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
            low-precision copy can be passed instead).
        scales: window sizes in patches.
    """

    def __init__(
        self, *, visual: nn.Module, scales: Sequence[int] = (2, 3), tower: TowerFn | None = None
    ) -> None:
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
        """One full-image pass and one pass per scale (all windows, all images)."""
        tokens = self.embed_tokens(pixels)  # [B, 1+P, D]
        b = tokens.shape[0]
        image, patches = self.tower(tokens)  # [B, E], [B, P, D]
        windows = {}
        for k in self.scales:
            pooled, _ = self.tower(self.window_sequences(tokens, k))  # [B*W, E]
            windows[k] = pooled.reshape(b, -1, pooled.shape[-1])  # [B, W, E]
        return EncodedImages(image=image, patches=patches, windows=windows)
