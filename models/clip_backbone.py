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
from PIL import Image
from torch import nn

from models.base import RANDOM_INIT, WeightsError, check_image
from models.checkpoints import load_strict, read_state_dict

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
    load_strict(model, state, source, model_name)


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


#: how an image of any aspect ratio becomes the square input of a tower
FIT_MODES = ("squash", "pad")


@dataclass(frozen=True)
class SquareFit:
    """Where an ``(H, W)`` image lies in the ``size x size`` processing frame.

    ``squash`` (every reference's default): the whole frame, aspect ratio not kept.
    ``pad``: resized to ``height x width`` with the aspect ratio kept, at ``(top, left)``;
    the rest of the frame is black padding.
    """

    top: int
    left: int
    height: int
    width: int


def square_fit(height: int, width: int, size: int, fit: str = "squash") -> SquareFit:
    """The :class:`SquareFit` of an ``height x width`` image in a ``size x size`` frame.

    ``pad`` follows open_clip's ``ResizeMaxSize`` (the AnomalyCLIP reference's
    ``image_transform(resize_longest_max=True)``): ``scale = size / max(H, W)``, sides
    ``round(side * scale)`` (Python rounding), padding split ``pad // 2`` before and the
    rest after. Unlike ``ResizeMaxSize`` the frame is also padded when the long side
    already equals ``size`` (it then returns a non-square image).
    """
    if fit == "squash":
        return SquareFit(0, 0, size, size)
    if fit != "pad":
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    scale = size / float(max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    return SquareFit((size - h) // 2, (size - w) // 2, h, w)


def _uint8_chw(img: np.ndarray) -> torch.Tensor:
    """``HWC uint8`` numpy -> ``[1, 3, H, W]`` uint8 tensor (a view where the array allows)."""
    arr = np.ascontiguousarray(img)
    if not arr.flags.writeable:  # torch.from_numpy wants a writeable buffer
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def normalise(
    x: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[B, 3, H, W]`` float32 (torchvision ``Normalize``)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def preprocess(
    images: list[np.ndarray],
    size: int,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``HWC uint8 RGB`` images -> normalised ``[B, 3, size, size]`` float32, as anomalib 2.7's WinCLIP.

    Each image alone, exactly as anomalib 2.7 reads it (``read_image(as_tensor=True)``:
    torchvision ``to_dtype(scale=True)``, i.e. ``x * (1 / 255)`` in float32, not ``x / 255``)
    and pre-processes it (``WinClip.configure_pre_processor``: torchvision v2
    ``Resize((size, size), BICUBIC, antialias=True)`` on the FLOAT image, skipped when it
    already has that size, then ``Normalize``). The float resize neither rounds nor clamps
    (values may overshoot [0, 1] at edges, as in the reference). The image is squashed to
    a square (no aspect keep), as the reference.
    """
    batch = []
    for i, img in enumerate(images):
        check_image(img, f"image {i}")
        t = _uint8_chw(img).to(torch.float32).mul_(1.0 / 255)  # [1, 3, H, W] in [0, 1]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        batch.append(t)
    return normalise(torch.cat(batch), mean, std).to(device)


def pil_resize(img: np.ndarray, height: int, width: int, resample: str = "bicubic") -> np.ndarray:
    """PIL's resize of an ``HWC`` (or ``HW``) uint8 image to ``height x width`` (uint8, PIL's rounding).

    This is what torchvision ``Resize`` does on a PIL image (any version): PIL's
    antialiased convolution (support scaled by the reduction factor), fixed-point
    arithmetic, rounded and clipped to uint8. ``resample``: ``bicubic`` or ``bilinear``.
    """
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    if (int(img.shape[0]), int(img.shape[1])) == (height, width):
        return img
    out = Image.fromarray(np.ascontiguousarray(img)).resize((width, height), filters[resample])
    return np.asarray(out)


def preprocess_pil(
    images: list[np.ndarray],
    size: int,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    device: str | torch.device = "cpu",
    *,
    fit: str = "squash",
) -> torch.Tensor:
    """``HWC uint8 RGB`` images -> normalised ``[B, 3, size, size]`` float32, as zqhang/AnomalyCLIP.

    Each image alone, as the reference's ``utils.get_transform``: torchvision
    ``Resize((size, size), BICUBIC)`` on the PIL image (PIL's bicubic resize of the uint8
    image, rounded to uint8), ``CenterCrop(size)`` (a no-op after it), ``ToTensor``
    (``x / 255``), ``Normalize(mean, std)``.

    Args:
        fit: ``squash`` (reference; aspect ratio not kept) or ``pad`` (aspect ratio kept,
            black padding: see :func:`square_fit`).
    """
    batch = []
    for i, img in enumerate(images):
        check_image(img, f"image {i}")
        box = square_fit(int(img.shape[0]), int(img.shape[1]), size, fit)
        resized = pil_resize(img, box.height, box.width, "bicubic")  # [h, w, 3] uint8
        if (box.height, box.width) != (size, size):
            frame = np.zeros((size, size, 3), dtype=np.uint8)
            frame[box.top : box.top + box.height, box.left : box.left + box.width] = resized
            resized = frame
        batch.append(_uint8_chw(resized).to(torch.float32).div_(255.0))  # [1, 3, S, S] in [0, 1]
    return normalise(torch.cat(batch), mean, std).to(device)


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
