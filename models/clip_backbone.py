"""open_clip backbones: build an architecture by name, load its weights, preprocess images.

Architectures come from open_clip's registry plus our own JSON configs in
``models/configs`` (tiny test configs). Weights are separate: the official
pretrained tag (downloaded by open_clip where a network exists), a local
checkpoint file (a saved ``state_dict``, or an OpenAI TorchScript archive), or
random init (tests / labelled demo only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from models.base import RANDOM_INIT, WeightsError, check_image
from models.checkpoints import read_state_dict

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

RANDOM_INIT_SEED = 0
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipBackbone:
    """A loaded open_clip model and where its weights came from."""

    model: nn.Module
    model_name: str
    weights_tag: str
    random_weights: bool
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


def list_architectures() -> list[str]:
    return list(open_clip.list_models())


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` safely (see :func:`models.checkpoints.read_state_dict`).

    An OpenAI TorchScript archive (as published for ``ViT-L-14-336``) is read with
    ``torch.jit.load`` and its state dict taken; its metadata entries are dropped.
    """
    return read_state_dict(path)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    """Load ``state`` strictly; a clear :class:`WeightsError` when it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise WeightsError(
            f"weights file {source} does not fit architecture {model_name}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def create_clip(
    model_name: str,
    weights: str | Path | None,
    *,
    pretrained_tag: str | None,
    device: str | torch.device = "cpu",
) -> ClipBackbone:
    """Build ``model_name`` and load weights.

    Args:
        model_name: open_clip architecture, e.g. ``ViT-B-16-plus-240``.
        weights: ``None`` = the official ``pretrained_tag`` through open_clip (download
            where a network exists); a path = that checkpoint file; ``RANDOM_INIT`` =
            random weights (never a real result).
        pretrained_tag: official tag for ``weights=None``, e.g. ``laion400m_e31``.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown architecture {model_name!r}")
    random_weights = False
    if weights is None:
        if not pretrained_tag:
            raise WeightsError(f"no official weights tag known for {model_name}; pass a weights file")
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained_tag, device="cpu")
        except Exception as exc:
            raise WeightsError(
                f"could not obtain the official weights {model_name}/{pretrained_tag} through open_clip "
                f"({type(exc).__name__}: {exc}). Without a network, fetch them where one exists with "
                f"'anomaly-inspect weights fetch' and pass the file as weights=PATH."
            ) from exc
        tag = pretrained_tag
    elif str(weights) == RANDOM_INIT:
        # seeded, so every process builds the SAME random model: the model key
        # (and therefore shared cache entries) then names one set of weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        tag = RANDOM_INIT
        random_weights = True
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file not found: {path}. Fetch it with 'anomaly-inspect weights fetch' "
                f"(where a network exists) or pass the path of an open_clip checkpoint for {model_name}."
            )
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        load_state_into(model, read_checkpoint(path), str(path), model_name)
        tag = path.name
    model.eval().requires_grad_(False)
    model.to(device)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return ClipBackbone(
        model=model,
        model_name=model_name,
        weights_tag=tag,
        random_weights=random_weights,
        image_size=image_size,
    )


def preprocess(
    images: list[np.ndarray],
    size: int,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``HWC uint8 RGB`` images -> normalised ``[B, 3, size, size]`` float32.

    Bicubic resize with antialias to a square (no aspect keep, as the reference),
    then OpenAI mean/std.
    """
    batch = []
    for i, img in enumerate(images):
        check_image(img, f"image {i}")
        t = (
            torch.from_numpy(np.array(img, copy=not img.flags.writeable, order="C"))
            .permute(2, 0, 1)
            .unsqueeze(0)
            .float()
            .div_(255.0)
        )  # [1,3,H,W]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        batch.append(t)
    x = torch.cat(batch).to(device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def text_tower_context_trim(tokens: torch.Tensor) -> int:
    """Length up to the last end-of-text token over a batch (EOT has the largest id)."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


@torch.no_grad()
def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` (unnormalised) computed only up to the last EOT token.

    The text transformer is causal, so outputs at or before EOT do not depend on
    the padding after it: trimming is exact and saves most of the cost (prompts
    are ~15 tokens of 77). Returns ``[N, E]``.
    """
    if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    n_ctx = text_tower_context_trim(tokens)
    tokens = tokens[:, :n_ctx]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # [N, n_ctx, D]
    x = x + model.positional_embedding[:n_ctx].to(cast_dtype)
    mask = model.attn_mask[:n_ctx, :n_ctx] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)  # [N, n_ctx, D]
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT token  [N, D]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
