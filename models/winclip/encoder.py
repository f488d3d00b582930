"""WinCLIP image encoding: full-image pass plus window embeddings by token dropping.

A window embedding is computed by keeping the CLS token and the window's patch
tokens (each with its own positional embedding) of the sequence taken after
patch embedding + positional embedding and before ``ln_pre``, then running the
rest of the tower. All windows of one scale, for all images of a batch, go
through ONE forward pass (``B * n_windows`` sequences of ``1 + k*k`` tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.cpu import cpu_capabilities
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


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear kernels (x86 CPU builds do)."""
    return cpu_capabilities().onednn_linear


def default_prepack(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether :class:`PackedTower` prepacks weights for oneDNN by default (see ``models/cpu.py``).

    fp32: on AVX-512 CPUs only (oneDNN's prepacked GEMM beat ``F.linear`` there —
    about 170 vs 130 GFLOP/s on a Zen 4 — and lost by 15 % on an AVX2 EPYC). bf16:
    wherever oneDNN's bf16 kernels run (its prepacked bf16 weights do not exist
    elsewhere). Never for fp16 or off the CPU.
    """
    if torch.device(device).type != "cpu" or dtype == torch.float16:
        return False
    caps = cpu_capabilities()
    return caps.onednn_bf16 if dtype == torch.bfloat16 else caps.prefer_onednn_fp32


class _Linear:
    """``y = x @ W.T + b`` for 2-D ``x``, with the weight optionally prepacked for oneDNN.

    Prepacked or not, results agree to float rounding; which one is faster depends on
    the CPU (:func:`default_prepack`).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, prepack: bool, rows_hint: int
    ) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """``x [T, in] -> [T, out]``; ``gelu=True`` applies exact GELU (fused into the GEMM with oneDNN)."""
        if self.packed is not None:
            if gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "none")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if gelu else y


_LNParams = tuple[torch.Tensor | None, torch.Tensor | None, float]


@dataclass(frozen=True)
class _Block:
    ln_1: _LNParams
    ln_2: _LNParams
    qkv: _Linear
    out: _Linear
    fc: _Linear
    proj: _Linear


class PackedTower(nn.Module):
    """The computation of :class:`VisualTower` for several groups of sequences in ONE pass.

    Token-wise layers (LayerNorms, QKV / output projections, MLP) run on the tokens
    of all groups stacked into one ``[T, D]`` matrix — a few large GEMMs instead of
    one set per group — and attention runs within each sequence. WinCLIP puts the
    full images and all windows of all scales of a batch through a single pass.

    Args:
        visual: the open_clip ViT whose weights are used.
        dtype: compute dtype (``float32``, or ``bfloat16``/``float16`` for a
            low-precision copy of the weights); inputs and outputs are float32.
            This class does what it is told: whether bf16 is worth it on this CPU is
            the detector's choice (:func:`models.cpu.resolve_precision`).
        prepack: prepack weights for oneDNN (CPU only); ``None`` = what suits this CPU
            (:func:`default_prepack`). ``True`` for bf16 where oneDNN has no bf16
            kernels raises ``ValueError``.

    Attributes:
        kernels: ``onednn-prepacked`` or ``torch`` (the GEMM path in use).
    """

    def __init__(
        self,
        visual: Any,
        *,
        dtype: torch.dtype = torch.float32,
        prepack: bool | None = None,
        fuse_gelu: bool | None = None,
        explicit_attention: bool | None = None,
    ) -> None:
        super().__init__()
        base = VisualTower(visual)
        device = base.ln_pre.weight.device
        if prepack is None:
            prepack = default_prepack(dtype, device)
        elif prepack:
            caps = cpu_capabilities()
            if device.type != "cpu" or not caps.onednn_linear:
                raise ValueError("prepack=True needs a CPU tower and a torch build with oneDNN")
            if dtype == torch.bfloat16 and not caps.onednn_bf16:
                raise ValueError(
                    f"prepack=True with bfloat16 needs oneDNN bf16 kernels (AVX-512 BW/VL/DQ or "
                    f"AVX-NE-CONVERT); {caps.summary()}"
                )
        self.dtype = dtype
        self.prepack = bool(prepack)
        self.kernels = "onednn-prepacked" if self.prepack else "torch"
        low = dtype != torch.float32
        # measured on the Zen 4 CPU: for bf16, fusing GELU into the GEMM and a plain
        # matmul-softmax-matmul attention beat separate GELU and the SDPA kernel on
        # these short sequences; for fp32 SDPA is as fast and the unfused path exact.
        self.fuse_gelu = bool(self.prepack and low) if fuse_gelu is None else fuse_gelu
        self.explicit_attention = (
            (device.type == "cpu" and low) if explicit_attention is None else explicit_attention
        )
        rows = 4096  # typical number of stacked tokens; any row count works

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        def linear(layer_weight: torch.Tensor, layer_bias: torch.Tensor | None) -> _Linear:
            return _Linear(
                layer_weight.detach().to(dtype), cast(layer_bias), prepack=self.prepack, rows_hint=rows
            )

        def norm(ln: nn.LayerNorm) -> _LNParams:
            return cast(ln.weight), cast(ln.bias), float(ln.eps)

        self.ln_pre, self.ln_post = norm(base.ln_pre), norm(base.ln_post)
        self.proj = cast(base.proj)
        self.blocks: list[_Block] = []
        for blk in base.transformer.resblocks:
            attn, mlp = blk.attn, blk.mlp
            plain = (
                isinstance(attn, nn.MultiheadAttention)
                and attn._qkv_same_embed_dim
                and not hasattr(blk, "ln_attn")
                and isinstance(blk.ls_1, nn.Identity)
                and isinstance(blk.ls_2, nn.Identity)
                and isinstance(mlp, nn.Sequential)
                and isinstance(mlp.gelu, nn.GELU)
                and mlp.gelu.approximate == "none"
            )
            if not plain:
                raise ValueError(
                    "PackedTower supports plain open_clip ResidualAttentionBlocks (GELU MLP) only"
                )
            self.blocks.append(
                _Block(
                    ln_1=norm(blk.ln_1),
                    ln_2=norm(blk.ln_2),
                    qkv=linear(attn.in_proj_weight, attn.in_proj_bias),
                    out=linear(attn.out_proj.weight, attn.out_proj.bias),
                    fc=linear(mlp.c_fc.weight, mlp.c_fc.bias),
                    proj=linear(mlp.c_proj.weight, mlp.c_proj.bias),
                )
            )
        self.heads = int(base.transformer.resblocks[0].attn.num_heads)

    @staticmethod
    def _ln(x: torch.Tensor, params: _LNParams) -> torch.Tensor:
        w, b, eps = params
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ((pooled, tokens),) = self.forward_groups([x])
        return pooled, tokens

    @torch.no_grad()
    def forward_groups(self, groups: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``groups[i]: [N_i, L_i, D]`` -> per group ``(pooled [N_i, E], tokens [N_i, L_i-1, D])`` (float32)."""
        shapes = [(g.shape[0], g.shape[1]) for g in groups]
        d = groups[0].shape[-1]
        hd = d // self.heads
        x = torch.cat([g.reshape(-1, d) for g in groups]).to(self.dtype)  # [T, D]
        x = self._ln(x, self.ln_pre)
        for blk in self.blocks:
            qkv = blk.qkv(self._ln(x, blk.ln_1))  # [T, 3D]
            outs, start = [], 0
            for n, length in shapes:
                part = qkv[start : start + n * length].view(n, length, 3, self.heads, hd)
                q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [n, H, L, hd]
                if self.explicit_attention:
                    att = (q @ k.transpose(-1, -2)).mul_(hd**-0.5).softmax(dim=-1)  # [n, H, L, L]
                    o = att @ v  # [n, H, L, hd]
                else:
                    o = F.scaled_dot_product_attention(q, k, v)  # [n, H, L, hd]
                outs.append(o.transpose(1, 2).reshape(n * length, d))
                start += n * length
            x = x + blk.out(torch.cat(outs))  # [T, D]
            x = x + blk.proj(blk.fc(self._ln(x, blk.ln_2), gelu=True))  # [T, D]
        x = self._ln(x, self.ln_post).float()
        results, start = [], 0
        for n, length in shapes:
            seq = x[start : start + n * length].view(n, length, d)
            pooled = seq[:, 0]
            if self.proj is not None:
                pooled = pooled @ self.proj.float()  # [n, E]
            results.append((pooled, seq[:, 1:]))
            start += n * length
        return results


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
            default a :class:`VisualTower` on ``visual`` (a :class:`PackedTower`, an
            ONNX session or a low-precision copy can be passed instead). A tower with a
            ``forward_groups`` method gets the full image and all windows in one call.
        scales: window sizes in patches.
        max_tokens_per_pass: cut batches into sub-batches of whole images with at
            most this many tokens per tower call (``None``: the whole batch at once).
    """

    def __init__(
        self,
        *,
        visual: Any,
        scales: Sequence[int] = (2, 3),
        tower: TowerFn | None = None,
        max_tokens_per_pass: int | None = None,
    ) -> None:
        self.visual = visual
        self.max_tokens_per_pass = max_tokens_per_pass
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
        return WinClipEncoder(
            visual=self.visual, scales=self.scales, tower=tower, max_tokens_per_pass=self.max_tokens_per_pass
        )

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image puts through the tower: full image plus every window."""
        return 1 + self.n_patches + sum(m.shape[0] * (1 + m.shape[1]) for m in self.masks.values())

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
        images and one per scale (each holding all windows of all images). With
        ``max_tokens_per_pass`` set (CPU), the batch is cut into sub-batches of
        whole images whose activations stay cache-sized; results are the same.
        """
        b = pixels.shape[0]
        per_pass = b
        if self.max_tokens_per_pass:
            per_pass = max(1, self.max_tokens_per_pass // self.tokens_per_image)
        if per_pass >= b:
            return self._encode(pixels)
        parts = [self._encode(pixels[i : i + per_pass]) for i in range(0, b, per_pass)]
        return EncodedImages(
            image=torch.cat([p.image for p in parts]),
            patches=torch.cat([p.patches for p in parts]),
            windows={k: torch.cat([p.windows[k] for p in parts]) for k in self.scales},
        )

    def _encode(self, pixels: torch.Tensor) -> EncodedImages:
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
