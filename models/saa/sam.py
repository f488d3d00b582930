"""Segment Anything (package ``segment-anything``): size variants as data, stateless box decoding.

``SamPredictor`` keeps the image embedding on ``self`` (not thread-safe); here
:func:`embed_image` returns an immutable :class:`SamImageEmbedding` and
:func:`decode_boxes` decodes ALL boxes of a request in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import WeightsError
from models.saa.groundingdino import read_checkpoint

SAM_WEIGHTS = {"vit_h": "sam-vit-h", "vit_l": "sam-vit-l", "vit_b": "sam-vit-b"}


@dataclass(frozen=True)
class SamConfig:
    """Shape of a SAM model (``segment_anything.build_sam._build_sam`` with the sizes as fields)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    # tests only: same modules, tiny sizes
    "tiny": SamConfig(
        32,
        2,
        2,
        (1,),
        image_size=128,
        window_size=4,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def build_sam(config: SamConfig) -> torch.nn.Module:
    """A random-init SAM of shape ``config`` from the package's modules."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.image_size // config.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def create_sam(variant: str, weights: str | Path | None, device: str = "cpu") -> torch.nn.Module:
    """SAM ``variant`` (vit_h / vit_l / vit_b / tiny); ``weights`` a checkpoint path or None (random)."""
    if variant not in SAM_CONFIGS:
        raise ValueError(f"sam_variant must be one of {', '.join(SAM_CONFIGS)}, got {variant!r}")
    sam = build_sam(SAM_CONFIGS[variant])
    if weights is not None:
        state = read_checkpoint(weights, SAM_WEIGHTS.get(variant, "sam-vit-h"))
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights} does not fit SAM {variant}: {str(exc)[:400]}") from exc
    return sam.to(device).eval()


@dataclass(frozen=True)
class SamImageEmbedding:
    """SAM image embedding of one image (immutable; reuse it for any number of boxes).

    ``features``: ``[1, C, g, g]`` float32. ``input_size``: ``(h, w)`` after the
    longest-side resize. ``original_size``: ``(H, W)`` of the input image.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@torch.no_grad()
def embed_image(sam: Any, image: np.ndarray) -> SamImageEmbedding:
    """Image encoder on an ``HWC uint8 RGB`` image (the package's own resize, normalise, pad)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image)  # HWC uint8
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    features = sam.image_encoder(sam.preprocess(x))  # [1, C, g, g]
    return SamImageEmbedding(
        features=features,
        input_size=(int(resized.shape[0]), int(resized.shape[1])),
        original_size=(int(image.shape[0]), int(image.shape[1])),
    )


@torch.no_grad()
def decode_boxes(sam: Any, emb: SamImageEmbedding, boxes_xyxy: np.ndarray) -> np.ndarray:
    """One mask per box, all boxes in one call (``multimask_output=False``).

    Args:
        boxes_xyxy: ``[N, 4]`` float, pixel coordinates of the original image.

    Returns:
        ``[N, H, W]`` bool masks at the original resolution.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = emb.original_size
    if len(boxes_xyxy) == 0:
        return np.zeros((0, h, w), dtype=bool)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32), device=sam.device)
    boxes = transform.apply_boxes_torch(boxes, emb.original_size)  # [N, 4] in the resized frame
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    low_res, _ = sam.mask_decoder(
        image_embeddings=emb.features,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )  # [N, 1, 256, 256]
    masks = sam.postprocess_masks(low_res, emb.input_size, emb.original_size) > sam.mask_threshold
    return masks[:, 0].cpu().numpy()


__all__ = [
    "SAM_CONFIGS",
    "SAM_WEIGHTS",
    "SamConfig",
    "SamImageEmbedding",
    "build_sam",
    "create_sam",
    "decode_boxes",
    "embed_image",
]
