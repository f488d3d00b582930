"""timm DINOv2 backbones: build by name, load weights strictly, read last-block patch tokens.

Architectures are timm's ``vit_small_patch14_dinov2`` (default), ``vit_base_patch14_dinov2``
and ``vit_large_patch14_dinov2``, built as anomalib 2.7 builds them
(``timm.create_model(name, dynamic_img_size=True)``: any input size that is a multiple
of the patch size; the position embedding is resampled to the input grid), plus
``tiny-dinov2-test``, a 2-block random-init model with the same code path for tests.

Weights are separate from the architecture:

- ``None``: the official timm checkpoint from the Hugging Face hub (needs a network
  the first time; a clear :class:`models.base.WeightsError` otherwise);
- a path: a timm-format state dict, either the hub's ``model.safetensors`` or a
  ``torch.save(model.state_dict())`` file (read with ``weights_only=True``);
- :data:`models.base.RANDOM_INIT`: seeded random weights (tests, labelled demo only).

Loading is strict: a missing, unexpected or mis-shaped tensor is a ``WeightsError``
naming the file and the first offending key.

:func:`patch_tokens` returns the last block's patch tokens after the final norm,
without class/register tokens: ``[B, gh*gw, D]`` float32 for ``[B, 3, H, W]`` pixels
normalised with ImageNet mean/std (H, W multiples of the patch size).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from models import checkpoints
from models.base import RANDOM_INIT, WeightsError, check_image
from models.checkpoints import read_state_dict

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FETCH_COMMAND = "anomaly-inspect weights fetch"


@dataclass(frozen=True)
class Dinov2Arch:
    """One DINOv2 architecture.

    Attributes:
        timm_name: timm model builder (``vit_small_patch14_dinov2`` ...).
        weights_name: manifest name of its official checkpoint (``None`` for test configs).
        hub_tag: timm pretrained tag used for ``weights=None`` (``lvd142m``).
        overrides: extra ``timm.create_model`` keyword arguments (test configs only).
    """

    timm_name: str
    weights_name: str | None
    hub_tag: str | None = "lvd142m"
    overrides: Mapping[str, Any] = field(default_factory=dict)


#: architecture name -> how to build it (segment-anything style size registry)
ARCHS: dict[str, Dinov2Arch] = {
    "vit_small_patch14_dinov2": Dinov2Arch("vit_small_patch14_dinov2", "timm-vit-small-patch14-dinov2"),
    "vit_base_patch14_dinov2": Dinov2Arch("vit_base_patch14_dinov2", "timm-vit-base-patch14-dinov2"),
    "vit_large_patch14_dinov2": Dinov2Arch("vit_large_patch14_dinov2", "timm-vit-large-patch14-dinov2"),
    # real DINOv2 block layout (LayerScale, patch 14, class token, dynamic size), tiny sizes
    "tiny-dinov2-test": Dinov2Arch(
        "vit_small_patch14_dinov2",
        None,
        hub_tag=None,
        overrides={"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 98},
    ),
}
DEFAULT_ARCH = "vit_small_patch14_dinov2"
TINY_ARCH = "tiny-dinov2-test"


@dataclass(frozen=True)
class Dinov2Backbone:
    """A loaded DINOv2 model and where its weights came from.

    Attributes:
        model: the timm ``VisionTransformer`` (eval mode, no grad).
        arch: architecture name (a key of :data:`ARCHS`).
        weights_tag: file name, ``timm/<name>.<tag>`` or ``random-init``.
        random_weights: True for random weights: never a real inspection result.
        patch_size: pixels per patch side (14).
        embed_dim: token width D.
    """

    model: nn.Module
    arch: str
    weights_tag: str
    random_weights: bool
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def list_architectures() -> list[str]:
    return list(ARCHS)


def arch_spec(arch: str) -> Dinov2Arch:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown DINOv2 architecture {arch!r}; known: {', '.join(ARCHS)}") from None


def build_model(arch: str, *, pretrained: bool = False) -> nn.Module:
    """The timm model for ``arch``, as anomalib builds it (``dynamic_img_size=True``); not loaded."""
    spec = arch_spec(arch)
    name = spec.timm_name
    if pretrained:
        if spec.hub_tag is None:
            raise WeightsError(f"{arch} is a test configuration without official weights")
        name = f"{name}.{spec.hub_tag}"
    return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **dict(spec.overrides))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` state dict (``weights_only=True``)."""
    return read_state_dict(path)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model``: every key present, none extra, same shapes; else ``WeightsError``."""
    hint = (
        f" (expected a timm-format state dict, e.g. the hub's timm/{arch_spec(arch).timm_name}.lvd142m "
        "model.safetensors)"
    )
    checkpoints.load_strict(model, state, source, arch, hint=hint)


def create_dinov2(
    arch: str = DEFAULT_ARCH,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Dinov2Backbone:
    """Build ``arch`` and load weights (see the module docstring for ``weights``)."""
    spec = arch_spec(arch)
    random_weights = False
    if weights is None:
        if spec.hub_tag is None:
            raise WeightsError(f"{arch} is a test configuration: pass weights=RANDOM_INIT")
        try:
            model = build_model(arch, pretrained=True)
        except Exception as exc:  # no network, hub error, missing huggingface_hub
            raise WeightsError(
                f"could not obtain the official weights timm/{spec.timm_name}.{spec.hub_tag} from the "
                f"Hugging Face hub ({type(exc).__name__}: {exc}). Without a network, fetch them where one "
                f"exists with '{FETCH_COMMAND} {spec.weights_name} --dir weights' and pass the file as "
                f"weights=PATH (or use load_detector_from_dir)."
            ) from exc
        tag = f"timm/{spec.timm_name}.{spec.hub_tag}"
    elif str(weights) == RANDOM_INIT:
        # seeded, so every process builds the SAME random model (shared cache keys name one model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_model(arch)
        tag = RANDOM_INIT
        random_weights = True
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            hint = (
                f"Fetch it (where a network exists) with '{FETCH_COMMAND} {spec.weights_name} --dir DIR'"
                if spec.weights_name
                else "Pass a timm-format state dict"
            )
            raise WeightsError(f"DINOv2 weights file not found: {path}. {hint}.")
        model = build_model(arch)
        load_strict(model, read_weights(path), str(path), arch)
        tag = path.name
    model.eval().requires_grad_(False)
    model.to(device)
    vit: Any = model
    patch = vit.patch_embed.patch_size
    return Dinov2Backbone(
        model=model,
        arch=arch,
        weights_tag=tag,
        random_weights=random_weights,
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        embed_dim=int(vit.embed_dim),
    )


def position_embedding(model: Any, grid: tuple[int, int], *, antialias: bool = False) -> torch.Tensor:
    """The position embedding for a ``grid = (gh, gw)`` patch grid: ``[1, P + prefix, D]``.

    Bicubic resampling of the learned grid as timm's ``dynamic_img_size`` path does, with
    ``antialias=False`` by default because anomalib 2.7 switches timm's antialiasing off
    for these backbones (it matters when the grid shrinks, e.g. 37 -> 18 at 252 px).
    """
    return resample_abs_pos_embed(
        model.pos_embed,
        new_size=list(grid),
        old_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
        antialias=antialias,
    )


#: a model input size as anomalib 2.7 / torchvision ``Resize`` take it: an int resizes the
#: SHORTER side to it (aspect kept), ``(height, width)`` resizes to exactly that
ImageSize = int | tuple[int, int]


def resized_size(height: int, width: int, size: ImageSize) -> tuple[int, int]:
    """``(height, width)`` that torchvision v2 ``Resize(size)`` gives an ``height x width`` image.

    An int ``s``: the shorter side becomes ``s``, the longer ``int(s * long / short)``
    (float division, then truncation, as torchvision's ``_compute_resized_output_size``;
    a square image gives ``s x s``). A pair: exactly ``(size[0], size[1])``.
    """
    if isinstance(size, int):
        if width <= height:
            return int(size * height / width), size  # width is the shorter side
        return size, int(size * width / height)
    return int(size[0]), int(size[1])


def preprocess(
    images: list[np.ndarray],
    size: ImageSize,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``HWC uint8 RGB`` images -> ``[B, 3, h, w]`` float32, ImageNet-normalised.

    Each image alone, as anomalib 2.7 reads it (``read_image(as_tensor=True)``: torchvision
    ``to_dtype(scale=True)``, i.e. ``x * (1 / 255)`` in float32, not ``x / 255``) and
    pre-processes it: resized bicubic with antialias (torchvision ``Resize(size,
    antialias=True, interpolation=BICUBIC)`` on the float tensor; no rounding), then
    ``(x - mean) / std``. ``size``: an int resizes the shorter side to it, aspect kept
    (:func:`resized_size`); ``(h, w)`` exactly. An image already at its resized size is
    not resampled (as torchvision).

    Raises:
        ValueError: the images resize to different sizes (group them by
            :func:`resized_size` first: one tensor holds one size).
    """
    batch = []
    out_size: tuple[int, int] | None = None
    for i, img in enumerate(images):
        check_image(img, f"image {i}")
        target = resized_size(int(img.shape[0]), int(img.shape[1]), size)
        if out_size is None:
            out_size = target
        elif target != out_size:
            raise ValueError(
                f"image {i} resizes to {target[0]}x{target[1]}, image 0 to {out_size[0]}x{out_size[1]}: "
                "one call takes images of one resized size (group them by models.dinov2.resized_size)"
            )
        arr = np.ascontiguousarray(img)
        if not arr.flags.writeable:  # torch.from_numpy needs a writable buffer
            arr = arr.copy()
        t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
        t = t.mul_(1.0 / 255)  # in [0, 1], as torchvision to_dtype(scale=True)
        if tuple(t.shape[-2:]) != target:
            t = F.interpolate(t, size=target, mode="bicubic", align_corners=False, antialias=True)
        batch.append(t)
    x = torch.cat(batch).to(device)  # [B, 3, h, w]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def patch_tokens(model: Any, pixels: torch.Tensor, *, pos_antialias: bool = False) -> torch.Tensor:
    """Last-block tokens after the final norm, patch tokens only.

    Same computation as timm ``forward_intermediates(indices=[last], norm=True)`` on a
    ``dynamic_img_size`` model, written out so that no hook or global patch is needed.

    Args:
        model: a timm DINOv2 ``VisionTransformer`` built with ``dynamic_img_size=True``.
        pixels: ``[B, 3, H, W]`` ImageNet-normalised, H and W multiples of the patch size,
            in the model's dtype.
        pos_antialias: antialias the position-embedding resampling (anomalib: off).

    Returns:
        ``[B, (H/14)*(W/14), D]`` in the model's dtype, row-major over the patch grid;
        class and register tokens removed.
    """
    x = model.patch_embed(pixels)  # [B, gh, gw, D] (NHWC with dynamic_img_size)
    b, gh, gw, d = x.shape
    pos = position_embedding(model, (gh, gw), antialias=pos_antialias).to(x.dtype)
    x = x.reshape(b, gh * gw, d)  # [B, P, D]
    prefix = []
    if model.cls_token is not None:
        prefix.append(model.cls_token.expand(b, -1, -1))
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(b, -1, -1))
    # DINOv2: the embedding covers the class token too (concatenate, then add)
    no_embed_class = bool(model.no_embed_class)
    x = torch.cat([*prefix, x + pos], dim=1) if no_embed_class else torch.cat([*prefix, x], dim=1) + pos
    x = model.pos_drop(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return x[:, model.num_prefix_tokens :]  # [B, P, D]


__all__ = [
    "ARCHS",
    "DEFAULT_ARCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TINY_ARCH",
    "Dinov2Arch",
    "Dinov2Backbone",
    "ImageSize",
    "arch_spec",
    "build_model",
    "create_dinov2",
    "list_architectures",
    "load_strict",
    "patch_tokens",
    "position_embedding",
    "preprocess",
    "read_weights",
    "resized_size",
]
