"""Shared fixtures and independent reference computations for the AnomalyCLIP tests.

The references here are written from METHODS.md's pseudo-code with explicit loops
and elementary operations, not with the code under test.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.anomalyclip.detector import ARCHS, TINY_BACKBONE, load_backbone
from models.base import RANDOM_INIT
from models.clip_backbone import ClipBackbone


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny ops on a shared 2-core machine are far steadier so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def tiny_backbone() -> ClipBackbone:
    """The tiny random-init CLIP (seed 0), built once per test session. Do not modify it."""
    return load_backbone(RANDOM_INIT, backbone=TINY_BACKBONE, seed=0)


TINY_ARCH = ARCHS[TINY_BACKBONE]


def released_state(
    ctx_dim: int,
    *,
    context_length: int = 77,
    n_ctx: int = 12,
    n_deep: int = 8,
    deep_len: int = 4,
    seed: int = 0,
    float_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """A prompt-learner state dict with the released checkpoint's key names and shapes, random values.

    Written out key by key from the reference layout (``prompt_ensemble.py``), with the
    context/prefix/suffix tensors in fp16 as in the GPU-trained released files.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, dtype: torch.dtype = float_dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    state: dict[str, torch.Tensor] = {
        "ctx_pos": rnd(1, 1, n_ctx, ctx_dim),
        "ctx_neg": rnd(1, 1, n_ctx, ctx_dim),
        "token_prefix_pos": rnd(1, 1, 1, ctx_dim),
        "token_suffix_pos": rnd(1, 1, context_length - 1 - n_ctx, ctx_dim),
        "token_prefix_neg": rnd(1, 1, 1, ctx_dim),
        "token_suffix_neg": rnd(1, 1, context_length - 1 - n_ctx, ctx_dim),
    }
    for i in range(n_deep):
        state[f"compound_prompts_text.{i}"] = rnd(deep_len, ctx_dim, dtype=torch.float32)
        state[f"compound_prompt_projections.{i}.weight"] = rnd(896, ctx_dim, dtype=torch.float32)
        state[f"compound_prompt_projections.{i}.bias"] = rnd(896, dtype=torch.float32)
    # "X"*12 + "object." -> SOT, 12 x X, object, ., EOT (id 49407) at index 15; "damaged" adds one
    for tag, eot in (("pos", 1 + n_ctx + 2), ("neg", 1 + n_ctx + 3)):
        ids = torch.zeros(1, 1, context_length, dtype=torch.int32)
        ids[0, 0, 0] = 49406
        ids[0, 0, 1:eot] = torch.randint(300, 40000, (eot - 1,), generator=g, dtype=torch.int32)
        ids[0, 0, eot] = 49407
        state[f"tokenized_prompts_{tag}"] = ids
    return state


def save_released(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"prompt_learner": state}, str(path))
    return path


# ----------------------------------------------------------------------------- references
def ref_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_mlp(x: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    h = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def ref_heads_attention(block: torch.nn.Module, h: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-head loop: ``softmax(a b^T * scale) v`` with (a, b) = (q, k) or (v, v); one sequence ``[N, D]``."""
    attn = block.attn
    d = h.shape[-1]
    heads = attn.num_heads
    hd = d // heads
    qkv = h @ attn.in_proj_weight.T + attn.in_proj_bias
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    outs = []
    for i in range(heads):
        sl = slice(i * hd, (i + 1) * hd)
        a, b = (q[:, sl], k[:, sl]) if mode == "qk" else (v[:, sl], v[:, sl])
        weights = torch.softmax(a @ b.T * hd**-0.5, dim=-1)
        outs.append(weights @ v[:, sl])
    o = torch.cat(outs, dim=-1)
    return o @ attn.out_proj.weight.T + attn.out_proj.bias


def ref_visual(
    visual: torch.nn.Module, pixels: torch.Tensor, feature_layers: tuple[int, ...], dpam_start: int = 6
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """METHODS.md pseudo-code, one image at a time.

    Returns (global ``[B, E]``, patch embeddings per feature layer ``[B, L, E]``, plain
    tokens after each of blocks ``1..dpam_start-1`` for image 0).
    """
    globals_, patches, plain = [], [[] for _ in feature_layers], []
    for bi in range(pixels.shape[0]):
        p = visual.conv1.kernel_size[0]
        img = pixels[bi]
        gh, gw = img.shape[1] // p, img.shape[2] // p
        w = visual.conv1.weight  # [W, 3, p, p]
        tokens = []
        for r in range(gh):
            for c in range(gw):
                patch = img[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
                tokens.append((w * patch).sum(dim=(1, 2, 3)))
        x = torch.stack([visual.class_embedding, *tokens])  # [1 + L, W]
        pos = visual.positional_embedding
        side = math.isqrt(pos.shape[0] - 1)
        grid = pos[1:].reshape(side, side, -1).permute(2, 0, 1)[None]
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)[0]
        x = x + torch.cat([pos[:1], grid.permute(1, 2, 0).reshape(gh * gw, -1)])
        x = ref_layer_norm(x, visual.ln_pre)
        blocks = visual.transformer.resblocks
        taken = {}
        for i in range(dpam_start - 1):
            blk = blocks[i]
            x = x + ref_heads_attention(blk, ref_layer_norm(x, blk.ln_1), "qk")
            x = x + ref_mlp(ref_layer_norm(x, blk.ln_2), blk)
            if bi == 0:
                plain.append(x)
            taken[i + 1] = x
        x_ori = x_vv = x
        for i in range(dpam_start - 1, len(blocks)):
            blk = blocks[i]
            h = ref_layer_norm(x_ori, blk.ln_1)  # the V-V path reads the ORIGINAL path
            x_vv = x_vv + ref_heads_attention(blk, h, "vv")
            x_ori = x_ori + ref_heads_attention(blk, h, "qk")
            x_ori = x_ori + ref_mlp(ref_layer_norm(x_ori, blk.ln_2), blk)
            taken[i + 1] = x_vv
        globals_.append(x_ori[0] @ visual.proj)
        for j, layer in enumerate(feature_layers):
            patches[j].append(ref_layer_norm(taken[layer][1:], visual.ln_post) @ visual.proj)
    return torch.stack(globals_), [torch.stack(p) for p in patches], plain


def ref_text(
    clip: torch.nn.Module, prompts: torch.Tensor, tokens: torch.Tensor, deep: list[torch.Tensor]
) -> torch.Tensor:
    """Full-length (77) text tower, one prompt at a time, deep prompts (fp16-rounded) into layers 2..9."""
    out = []
    for i in range(prompts.shape[0]):
        x = prompts[i] + clip.positional_embedding  # [L, D]
        n = x.shape[0]
        causal = torch.full((n, n), float("-inf")).triu(1)
        for li, blk in enumerate(clip.transformer.resblocks):
            if 1 <= li <= len(deep):
                ctx = deep[li - 1].to(torch.float16).float()
                x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0] :]])
            h = ref_layer_norm(x, blk.ln_1)
            d = h.shape[-1]
            attn = blk.attn
            heads = attn.num_heads
            hd = d // heads
            qkv = h @ attn.in_proj_weight.T + attn.in_proj_bias
            q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
            o = torch.cat(
                [
                    torch.softmax(q[:, s] @ k[:, s].T * hd**-0.5 + causal, -1) @ v[:, s]
                    for s in (slice(j * hd, (j + 1) * hd) for j in range(heads))
                ],
                -1,
            )
            x = x + o @ attn.out_proj.weight.T + attn.out_proj.bias
            x = x + ref_mlp(ref_layer_norm(x, blk.ln_2), blk)
        x = ref_layer_norm(x, clip.ln_final)
        out.append(x[int(tokens[i].long().argmax())] @ clip.text_projection)
    return torch.stack(out)


def ref_gaussian_blur(img: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Direct 2-D Gaussian convolution with numpy's ``symmetric`` padding (= scipy ``reflect``)."""
    r = int(truncate * sigma + 0.5)
    xs = np.arange(-r, r + 1, dtype=np.float64)
    k1 = np.exp(-0.5 * (xs / sigma) ** 2)
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()
    padded = np.pad(img.astype(np.float64), r, mode="symmetric")
    out = np.zeros(img.shape, dtype=np.float64)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += k2[dy, dx] * padded[dy : dy + img.shape[0], dx : dx + img.shape[1]]
    return out


def random_image(seed: int, h: int, w: int) -> np.ndarray:
    """``HWC uint8 RGB`` noise, values in [0, 255]."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
