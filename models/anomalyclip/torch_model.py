"""AnomalyCLIP maths (METHODS.md section 2): DPAM visual encoder, deep-prompt text encoder, scoring.

Everything works on an UNMODIFIED open_clip ``CLIP`` model: DPAM is a function of
each block's weights (``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ln_2``,
``mlp``), the positional embedding is interpolated into a new tensor, and the
deep text prompts are spliced in between the text blocks. Nothing is patched or
written into the model, so the plain CLIP path, other input sizes and other
detectors sharing the model keep working.

Where the reference code (zqhang/AnomalyCLIP, ``AnomalyCLIP_lib/AnomalyCLIP.py``,
``prompt_ensemble.py``, ``test.py``) and the paper differ we follow the code,
which produced the published numbers; each such place says ``(reference code)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.07  # fixed temperature of the reference (not CLIP's learned logit scale)
BLUR_SIGMA = 4.0  # reference test.py --sigma 4 (scipy.ndimage.gaussian_filter)
BLUR_TRUNCATE = 4.0  # scipy's default truncate: kernel radius = int(4 * sigma + 0.5)
PROJECTION_WIDTH = 896  # reference: nn.Linear(ctx_dim, 896) for the (unused) compound projections


@dataclass(frozen=True)
class AnomalyClipArch:
    """Shape of one AnomalyCLIP configuration.

    Attributes:
        clip_model: open_clip architecture name (QuickGELU variant for OpenAI weights).
        image_size: processing resolution (reference: 518, i.e. a 37x37 grid at patch 14).
        feature_layers: 1-indexed blocks whose V-V tokens give patch maps (default of the
            detector and of training: the top block, as the official ``--features_list 24``).
        multi_feature_layers: the multi-layer variant (ViT-L: 6, 12, 18, 24, the official
            setting before 2025-04-13), an option.
        dpam_start: first block (1-indexed) on the dual path; blocks before it are plain.
        n_ctx: learnable context tokens per prompt (reference ``--n_ctx 12``).
        deep_prompt_depth: reference ``--depth 9`` = 8 deep prompts for text layers 2..9.
        deep_prompt_len: tokens per deep prompt (reference ``--t_n_ctx 4``).
    """

    clip_model: str
    image_size: int
    feature_layers: tuple[int, ...]
    multi_feature_layers: tuple[int, ...] = ()
    dpam_start: int = 6
    n_ctx: int = 12
    deep_prompt_depth: int = 9
    deep_prompt_len: int = 4

    @property
    def n_deep_prompts(self) -> int:
        return self.deep_prompt_depth - 1


# ----------------------------------------------------------------------------- visual side
def interpolate_pos_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embedding ``[1 + g*g, W]`` resized to ``grid = (gh, gw)`` -> ``[1 + gh*gw, W]``.

    Bilinear, ``align_corners=False``, no antialias, class token kept (reference code,
    ``VisionTransformer.forward``). Returns a NEW tensor: the model is never mutated
    (the reference overwrites ``positional_embedding.data``, which breaks a second size).
    """
    n, width = pos.shape
    side = round((n - 1) ** 0.5)
    if side * side != n - 1:
        raise ValueError(f"positional embedding of {n} tokens is not 1 + a square grid")
    if (side, side) == tuple(grid):
        return pos
    g = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)  # [1, W, side, side]
    g = F.interpolate(g, size=grid, mode="bilinear", align_corners=False)  # [1, W, gh, gw]
    g = g.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)  # [gh*gw, W]
    return torch.cat([pos[:1], g], dim=0)


def dpam_block(block: Any, x_ori: torch.Tensor, x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dual-path block with V-V attention, as a function of an open_clip block's weights.

    ``h = ln_1(x_ori)``; ``q, k, v`` from the block's ``in_proj``; per head
    ``x_vv += out_proj(softmax(v v^T * s) v)`` (no FFN, no LN on the V-V path) and
    ``x_ori += out_proj(softmax(q k^T * s) v)``, ``x_ori += mlp(ln_2(x_ori))``,
    ``s = head_dim ** -0.5``. Both attentions run in one batched call.

    Args:
        block: open_clip ``ResidualAttentionBlock`` (batch-first ``nn.MultiheadAttention``).
        x_ori, x_vv: ``[B, N, D]``.

    Returns:
        ``(x_ori, x_vv)``, each ``[B, N, D]``.
    """
    attn = block.attn
    b, n, d = x_ori.shape
    heads = attn.num_heads
    h = block.ln_1(x_ori)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3D]
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
    # original path (q, k, v) and V-V path (v, v, v) in one attention call
    both = F.scaled_dot_product_attention(
        torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v])
    )  # [2B,H,N,hd]
    both = both.transpose(1, 2).reshape(2 * b, n, d)  # [2B, N, D]
    both = F.linear(both, attn.out_proj.weight, attn.out_proj.bias)
    ori_res, vv_res = both[:b], both[b:]
    x_vv = x_vv + block.ls_1(vv_res)
    x_ori = x_ori + block.ls_1(ori_res)
    x_ori = x_ori + block.ls_2(block.mlp(block.ln_2(x_ori)))
    return x_ori, x_vv


@dataclass(frozen=True)
class VisualFeatures:
    """What the DPAM visual encoder gives for a batch.

    Attributes:
        global_embedding: ``[B, E]`` projected class token of the ORIGINAL path.
        patch_embeddings: per feature layer ``[B, gh*gw, E]``: ``ln_post`` + ``proj`` of the
            V-V path tokens, class token dropped.
        grid_size: ``(gh, gw)``.
    """

    global_embedding: torch.Tensor
    patch_embeddings: tuple[torch.Tensor, ...]
    grid_size: tuple[int, int]


class DpamVisualEncoder(nn.Module):
    """AnomalyCLIP image encoder over an open_clip ``VisionTransformer`` (weights shared, not copied).

    Args:
        visual: ``clip.visual`` (batch-first open_clip ViT).
        feature_layers: 1-indexed blocks whose tokens give the patch maps.
        dpam_start: first dual-path block (reference: 6 of 24, i.e. ``DPAM_layer=20``
            replaces the last 19 blocks).
    """

    def __init__(self, *, visual: Any, feature_layers: Sequence[int], dpam_start: int = 6) -> None:
        super().__init__()
        self.visual = visual
        n_blocks = len(visual.transformer.resblocks)
        layers = tuple(int(i) for i in feature_layers)
        if not layers or min(layers) < 1 or max(layers) > n_blocks:
            raise ValueError(f"feature layers {layers} outside 1..{n_blocks}")
        if not 1 <= dpam_start <= n_blocks:
            raise ValueError(f"dpam_start {dpam_start} outside 1..{n_blocks}")
        self.feature_layers = layers
        self.dpam_start = dpam_start
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple) else patch)

    def grid_for(self, image_size: int) -> tuple[int, int]:
        g = image_size // self.patch_size
        return (g, g)

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + class embedding, interpolated positions, ``ln_pre``: ``[B, 1 + gh*gw, W]``."""
        v: Any = self.visual
        x = v.conv1(pixels)  # [B, W, gh, gw]
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + gh*gw, W]
        x = x + interpolate_pos_embedding(v.positional_embedding, grid).to(x.dtype)
        return v.ln_pre(x), grid

    def forward(self, pixels: torch.Tensor) -> VisualFeatures:
        """``pixels [B, 3, S, S]`` (normalised) -> :class:`VisualFeatures`."""
        v: Any = self.visual
        x, grid = self.embed(pixels)
        blocks = v.transformer.resblocks
        taken: dict[int, torch.Tensor] = {}
        for i in range(self.dpam_start - 1):  # plain CLIP blocks 1 .. dpam_start-1
            x = blocks[i](x)
            if i + 1 in self.feature_layers:
                taken[i + 1] = x
        x_ori, x_vv = x, x
        for i in range(self.dpam_start - 1, len(blocks)):  # dual path
            x_ori, x_vv = dpam_block(blocks[i], x_ori, x_vv)
            if i + 1 in self.feature_layers:
                taken[i + 1] = x_vv
        # (reference code) global = class token of the original path @ proj, WITHOUT ln_post
        global_embedding = x_ori[:, 0] @ v.proj  # [B, E]
        patches = tuple(v.ln_post(taken[layer][:, 1:]) @ v.proj for layer in self.feature_layers)  # [B, L, E]
        return VisualFeatures(global_embedding=global_embedding, patch_embeddings=patches, grid_size=grid)


# ----------------------------------------------------------------------------- text side
class PromptLearner(nn.Module):
    """Object-agnostic prompt learner in the reference's exact state-dict layout.

    Keys (``{"prompt_learner": state_dict}`` in released checkpoints):
    ``ctx_pos``, ``ctx_neg`` ``[1, 1, n_ctx, D]``; ``compound_prompts_text.{0..7}``
    ``[deep_len, D]``; ``compound_prompt_projections.{0..7}.weight [896, D]|bias [896]``
    (present, unused, as in the reference); ``token_prefix_*`` ``[1, 1, 1, D]`` (SOT
    embedding); ``token_suffix_*`` ``[1, 1, L - 1 - n_ctx, D]`` (embeddings of
    ``object.`` / ``damaged object.`` + EOT + padding); ``tokenized_prompts_*``
    ``[1, 1, L]`` (token ids; only the EOT position is used). ``pos`` = normal,
    ``neg`` = abnormal. ``D`` = text width, ``L`` = context length (77).

    Build it with :meth:`initialise` (training from scratch) or
    :meth:`from_state_dict` (strict loading); the bare constructor gives zeros.
    """

    token_prefix_pos: torch.Tensor
    token_suffix_pos: torch.Tensor
    token_prefix_neg: torch.Tensor
    token_suffix_neg: torch.Tensor
    tokenized_prompts_pos: torch.Tensor
    tokenized_prompts_neg: torch.Tensor

    def __init__(
        self,
        *,
        ctx_dim: int,
        n_ctx: int = 12,
        deep_prompt_depth: int = 9,
        deep_prompt_len: int = 4,
        context_length: int = 77,
    ) -> None:
        super().__init__()
        if context_length < 2 + n_ctx:
            raise ValueError("context too short for the learnable tokens")
        self.n_ctx = n_ctx
        self.deep_prompt_len = deep_prompt_len
        self.ctx_pos = nn.Parameter(torch.zeros(1, 1, n_ctx, ctx_dim))
        self.ctx_neg = nn.Parameter(torch.zeros(1, 1, n_ctx, ctx_dim))
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.zeros(deep_prompt_len, ctx_dim)) for _ in range(deep_prompt_depth - 1)]
        )
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(ctx_dim, PROJECTION_WIDTH) for _ in range(deep_prompt_depth - 1)]
        )
        suffix = context_length - 1 - n_ctx
        self.register_buffer("token_prefix_pos", torch.zeros(1, 1, 1, ctx_dim))
        self.register_buffer("token_suffix_pos", torch.zeros(1, 1, suffix, ctx_dim))
        self.register_buffer("token_prefix_neg", torch.zeros(1, 1, 1, ctx_dim))
        self.register_buffer("token_suffix_neg", torch.zeros(1, 1, suffix, ctx_dim))
        # the reference tokenizer returns int32 ids
        self.register_buffer("tokenized_prompts_pos", torch.zeros(1, 1, context_length, dtype=torch.int32))
        self.register_buffer("tokenized_prompts_neg", torch.zeros(1, 1, context_length, dtype=torch.int32))

    @staticmethod
    def templates(n_ctx: int) -> tuple[str, str]:
        """The two prompt texts: ``X*n object.`` (normal) and ``X*n damaged object.``."""
        prefix = " ".join(["X"] * n_ctx)
        return f"{prefix} object.", f"{prefix} damaged object."

    @classmethod
    def initialise(
        cls,
        clip: Any,
        tokenizer: Any,
        *,
        n_ctx: int = 12,
        deep_prompt_depth: int = 9,
        deep_prompt_len: int = 4,
        generator: torch.Generator | None = None,
    ) -> PromptLearner:
        """A fresh learner for ``clip``: contexts and deep prompts ~ N(0, 0.02) (reference init).

        ``tokenizer`` is open_clip's tokenizer for the model (same BPE as OpenAI's).
        """
        emb = clip.token_embedding
        ctx_dim = int(emb.weight.shape[1])
        context_length = int(clip.positional_embedding.shape[0])
        learner = cls(
            ctx_dim=ctx_dim,
            n_ctx=n_ctx,
            deep_prompt_depth=deep_prompt_depth,
            deep_prompt_len=deep_prompt_len,
            context_length=context_length,
        )
        with torch.no_grad():
            for p in [learner.ctx_pos, learner.ctx_neg, *learner.compound_prompts_text]:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            projections: list[Any] = list(learner.compound_prompt_projections)
            for lin in projections:
                bound = ctx_dim**-0.5  # nn.Linear's default init, drawn from the generator
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=generator) * 2 - 1) * bound)
                lin.bias.copy_((torch.rand(lin.bias.shape, generator=generator) * 2 - 1) * bound)
            tokens = tokenizer(list(cls.templates(n_ctx)))  # [2, L]
            tokens = tokens[:, :context_length].to(emb.weight.device)
            embedded = emb(tokens).float().cpu()  # [2, L, D]
            for i, tag in enumerate(("pos", "neg")):
                getattr(learner, f"token_prefix_{tag}").copy_(embedded[i, :1].reshape(1, 1, 1, ctx_dim))
                getattr(learner, f"token_suffix_{tag}").copy_(embedded[i, 1 + n_ctx :][None, None])
                getattr(learner, f"tokenized_prompts_{tag}").copy_(
                    tokens[i].cpu()[None, None].to(torch.int32)
                )
        return learner

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        *,
        ctx_dim: int,
        context_length: int = 77,
        n_ctx: int = 12,
        deep_prompt_depth: int = 9,
        deep_prompt_len: int = 4,
        source: str = "prompt checkpoint",
    ) -> PromptLearner:
        """Load a released-format state dict STRICTLY (same keys, same shapes; dtypes cast).

        Raises:
            ValueError: keys or shapes do not match; the message lists them.
        """
        learner = cls(
            ctx_dim=ctx_dim,
            n_ctx=n_ctx,
            deep_prompt_depth=deep_prompt_depth,
            deep_prompt_len=deep_prompt_len,
            context_length=context_length,
        )
        own = learner.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: file {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
            for k in sorted(own)
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            if wrong:
                parts.append("shape mismatches " + "; ".join(wrong))
            raise ValueError(f"{source} does not fit the AnomalyCLIP prompt learner: " + ", ".join(parts))
        cast = {k: state[k].detach().to(own[k].dtype) for k in own}  # released files hold fp16 tensors
        learner.load_state_dict(cast, strict=True)
        return learner

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(prompts [2, L, D], tokens [2, L], deep prompts 8 x [deep_len, D])``; row 0 normal, 1 abnormal."""
        pos = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)  # [1, 1, L, D]
        neg = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        prompts = torch.cat([pos.flatten(0, 1), neg.flatten(0, 1)], dim=0)  # [2, L, D]
        tokens = torch.cat(
            [self.tokenized_prompts_pos.flatten(0, 1), self.tokenized_prompts_neg.flatten(0, 1)]
        )
        return prompts, tokens, list(self.compound_prompts_text)


def encode_text_deep_prompts(
    clip: Any,
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor],
    *,
    trim: bool = True,
    round_deep_prompts_fp16: bool = True,
) -> torch.Tensor:
    """CLIP text tower on prompt EMBEDDINGS, deep prompts overwriting positions ``1..n`` of layers ``2..``.

    Before text layer ``i + 1`` (``i = 1..len(deep_prompts)``, 0-indexed block ``i``)
    the tokens at positions ``1 .. n`` are replaced by ``deep_prompts[i - 1]``.
    Output: EOT token (``tokens.argmax``) after ``ln_final`` @ ``text_projection``,
    ``[P, E]`` UNNORMALISED.

    Args:
        prompts: ``[P, L, D]`` token embeddings (prefix, learned context, suffix).
        tokens: ``[P, L]`` token ids (EOT has the largest id).
        trim: run only up to the last EOT. The text mask is causal, so this is exact.
        round_deep_prompts_fp16: (reference code) the reference casts the deep prompts
            with ``.half()`` before splicing them in, even in an fp32 model.
    """
    eot = tokens.long().argmax(dim=-1)  # [P]
    n_deep = max((int(p.shape[0]) for p in deep_prompts), default=0)
    length = int(prompts.shape[1])
    if trim:
        length = min(length, max(int(eot.max().item()) + 1, 1 + n_deep))
    dtype = prompts.dtype
    x = prompts[:, :length] + clip.positional_embedding[:length].to(dtype)  # [P, l, D]
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    blocks = clip.transformer.resblocks
    if len(deep_prompts) > len(blocks) - 1:
        raise ValueError(f"{len(deep_prompts)} deep prompts for a {len(blocks)}-layer text tower")
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep_prompts):
            ctx = deep_prompts[i - 1]
            if round_deep_prompts_fp16:
                ctx = ctx.to(torch.float16)
            ctx = ctx.to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # [P, n, D]
            x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1] :]], dim=1)
        x = block(x, attn_mask=mask)
    x = clip.ln_final(x)  # [P, l, D]
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # [P, D]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # [P, E]


def text_embeddings(clip: Any, learner: PromptLearner) -> torch.Tensor:
    """``[2, E]`` L2-normalised text embeddings (normal, abnormal) of a prompt learner."""
    prompts, tokens, deep = learner()
    feats = encode_text_deep_prompts(clip, prompts.to(clip.positional_embedding.dtype), tokens, deep)
    return F.normalize(feats.float(), dim=-1)


# ----------------------------------------------------------------------------- scoring
def class_probabilities(
    features: torch.Tensor, text: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """``softmax(cos(f, [t_n, t_a]) / temperature)``: ``[..., E]`` x ``[2, E]`` -> ``[..., 2]``."""
    logits = F.normalize(features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    return logits.softmax(dim=-1)


def image_scores(global_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Image anomaly score ``[B]`` in [0, 1]: the abnormal probability of the global embedding."""
    return class_probabilities(global_embedding, text)[..., 1]


def patch_probability_maps(
    patches: torch.Tensor, text: torch.Tensor, grid: tuple[int, int], size: int
) -> torch.Tensor:
    """Per-patch class probabilities upsampled bilinearly: ``[B, gh*gw, E]`` -> ``[B, 2, size, size]``."""
    probs = class_probabilities(patches, text)  # [B, L, 2]
    probs = probs.transpose(1, 2).reshape(probs.shape[0], 2, *grid)  # [B, 2, gh, gw]
    return F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)


def anomaly_map_from_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """``(P_abnormal + 1 - P_normal) / 2``: ``[B, 2, H, W]`` -> ``[B, H, W]`` in [0, 1]."""
    return (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0


def gaussian_kernel1d(sigma: float, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """Normalised float32 Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (as scipy)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of ``[-radius, n + radius)`` folded back like scipy's ``reflect`` (``dcba|abcd|dcba``)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(
    maps: torch.Tensor, sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE
) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` with scipy ``gaussian_filter`` semantics (mode ``reflect``)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    r = (k.numel() - 1) // 2
    _, h, w = maps.shape
    x = maps.index_select(1, _symmetric_index(h, r, maps.device))  # [B, H + 2r, W]
    x = F.conv2d(x[:, None], k.view(1, 1, -1, 1))[:, 0]  # [B, H, W]
    x = x.index_select(2, _symmetric_index(w, r, maps.device))  # [B, H, W + 2r]
    return F.conv2d(x[:, None], k.view(1, 1, 1, -1))[:, 0]  # [B, H, W]


def anomaly_maps(
    patch_embeddings: Sequence[torch.Tensor],
    text: torch.Tensor,
    grid: tuple[int, int],
    size: int,
    sigma: float = BLUR_SIGMA,
) -> torch.Tensor:
    """Pixel maps ``[B, size, size]`` in [0, 1] from the patch embeddings of the feature layers.

    Per layer ``(P_abn + 1 - P_norm) / 2`` of the upsampled probabilities; the layers
    are averaged (reference code: ``test.py`` SUMS the maps of its ``--features_list``,
    since 2025-04-13 layer 24 alone; with several layers the mean ranks pixels as the
    sum and keeps the map in [0, 1]); then the Gaussian blur.
    """
    per_layer = [
        anomaly_map_from_probabilities(patch_probability_maps(p, text, grid, size)) for p in patch_embeddings
    ]
    return gaussian_blur(torch.stack(per_layer).mean(dim=0), sigma)
