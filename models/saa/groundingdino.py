"""GroundingDINO (package ``groundingdino-py``): building, loading, and a stateless grounding pass.

Architecture: the package's own ``GroundingDINO_SwinT_OGC.py`` config, read as data,
with optional overrides (the tiny test configuration shrinks the transformer and
the query count; the Swin-T backbone is the package's fixed builder). The BERT
text encoder always comes from a LOCAL directory (``text_encoder_type`` = a path):
its hub download cannot work offline.

Inference is split the way SAM splits ``set_image`` / ``predict``: the expensive
image backbone runs once per image (:func:`encode_image`, an immutable result),
then all captions of a request go through text encoder, encoder-decoder and heads in
ONE batched call (:func:`ground`). The package's own ``forward`` would rerun the
Swin backbone for every caption; the reference does exactly that.

The package has no compiled deformable attention in 0.4.0 (pure PyTorch
``multi_scale_deformable_attn_pytorch``), so it runs on CPU as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.base import WeightsError
from models.checkpoints import read_state_dict
from models.clip_backbone import normalise, pil_resize
from models.weights import fetch_hint

GROUNDINGDINO_WEIGHTS = "groundingdino-swint-ogc"
BERT_WEIGHTS = "bert-base-uncased"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Overrides for inference (no gradient checkpointing) and for the tiny test model.
INFERENCE_OVERRIDES: dict[str, Any] = {"use_checkpoint": False, "use_transformer_ckpt": False}
TINY_OVERRIDES: dict[str, Any] = {
    "enc_layers": 1,
    "dec_layers": 1,
    "hidden_dim": 256,  # the package hard-codes 256 in its text position embedding
    "dim_feedforward": 128,
    "nheads": 8,
    "num_queries": 30,
}
#: Tiny BERT used by the tiny configuration (random weights, vocabulary made on the fly).
TINY_BERT: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}


def official_config_path() -> Path:
    """The package's ``GroundingDINO_SwinT_OGC.py`` (plain assignments)."""
    import groundingdino

    return Path(groundingdino.__file__).resolve().parent / "config" / "GroundingDINO_SwinT_OGC.py"


def dino_args(text_encoder_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """Model arguments: the official Swin-T OGC config, inference overrides, then ``overrides``."""
    values = {
        k: v
        for k, v in runpy.run_path(str(official_config_path())).items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))
    }
    values.update(INFERENCE_OVERRIDES)
    values.update(overrides or {})
    values["text_encoder_type"] = str(text_encoder_dir)
    values["device"] = "cpu"
    return argparse.Namespace(**values)


# ----------------------------------------------------------------------------- BERT
_BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_bert_dir(bert_dir: str | Path | None, weights_dir: str | Path | None = None) -> Path:
    """Return ``bert_dir`` if it holds a usable BERT (config, vocabulary, weights); else WeightsError."""
    where = Path(weights_dir) if weights_dir is not None else Path("<weights dir>")
    hint = fetch_hint([BERT_WEIGHTS], where)
    if bert_dir is None:
        raise WeightsError(
            "GroundingDINO needs its BERT text encoder (bert-base-uncased) from a local directory; "
            f"pass bert_dir=... or use a weights dir. Fetch it where a network exists with: {hint}"
        )
    path = Path(bert_dir)
    if not path.is_dir():
        raise WeightsError(f"BERT directory not found: {path}. Fetch it where a network exists with: {hint}")
    missing = [n for n in ("config.json", "vocab.txt") if not (path / n).exists()]
    if not any((path / n).exists() for n in _BERT_WEIGHT_FILES):
        missing.append(" or ".join(_BERT_WEIGHT_FILES))
    if missing:
        raise WeightsError(
            f"BERT directory {path} is incomplete (missing {', '.join(missing)}). "
            f"Fetch it where a network exists with: {hint}"
        )
    return path


def write_vocab(path: Path, extra_words: Sequence[str] = ()) -> list[str]:
    """A small WordPiece vocabulary: BERT's special tokens, ASCII characters and their ``##`` pieces."""
    chars = [chr(c) for c in range(33, 127)]
    words = [w for w in dict.fromkeys(w.lower() for w in extra_words) if w]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    vocab = list(dict.fromkeys(vocab))
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def save_random_bert(
    directory: str | Path, *, config: Mapping[str, int] | None = None, extra_words: Sequence[str] = ()
) -> Path:
    """Save a random-init BERT with a made-up vocabulary to ``directory`` (tests, demo).

    ``config=None`` gives bert-base-uncased's shape (random weights; the vocabulary is
    ours, so token ids differ from the real one).
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(directory / "vocab.txt", extra_words)
    cfg = BertConfig(**dict(config)) if config is not None else BertConfig()
    if config is not None:
        cfg.vocab_size = len(vocab)
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    BertModel(cfg).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------- model
def build_groundingdino(args: argparse.Namespace) -> torch.nn.Module:
    """Build the model with the package's builder (random init; BERT read from ``args.text_encoder_type``)."""
    try:
        from groundingdino.models import build_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "SAA+ needs groundingdino-py: pip install --no-deps --no-build-isolation groundingdino-py==0.4.0 "
            f"(see docs/saa.md): {exc}"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the text encoder path
        model = build_model(args)
    return model.eval()


def read_checkpoint(path: str | Path, weights_name: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``{"model": sd}`` or a bare state dict; ``module.`` removed).

    A missing file names the manifest entry and the fetch command.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"weights file not found: {path}. Fetch it where a network exists with: "
            f"{fetch_hint([weights_name], path.parent.parent)}"
        )
    return read_state_dict(path)


def load_groundingdino_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load the checkpoint; every model parameter must be in it. Returns the ignored extra keys.

    The reference loads with ``strict=False``; we refuse a checkpoint that leaves any
    model weight untouched (that would silently run on random weights) but tolerate
    extra keys (old transformers versions saved BERT buffers such as ``position_ids``).
    """
    state = read_checkpoint(path, GROUNDINGDINO_WEIGHTS)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    if bad or result.missing_keys:
        raise WeightsError(
            f"{path} does not fit GroundingDINO Swin-T OGC: "
            f"missing {sorted(result.missing_keys)[:8]}, wrong shape {bad[:8]}"
        )
    return list(result.unexpected_keys)


def create_groundingdino(
    weights: str | Path | None,
    *,
    bert_dir: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    random_bert: Mapping[str, int] | None = None,
    device: str = "cpu",
) -> torch.nn.Module:
    """GroundingDINO on ``device``.

    Args:
        weights: checkpoint path, or ``None`` for random init.
        bert_dir: local BERT directory; ``None`` only with ``weights=None`` (a random
            BERT of shape ``random_bert`` is then saved to a temporary directory, read
            by the package's builder, and the directory removed).
        overrides: config values replacing the official ones (tiny configuration).
    """
    if bert_dir is None and weights is not None:
        check_bert_dir(None)
    with contextlib.ExitStack() as stack:
        if bert_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="saa-bert-"))
            bert_dir = save_random_bert(tmp, config=random_bert)
        else:
            bert_dir = check_bert_dir(bert_dir)
        model = build_groundingdino(dino_args(bert_dir, overrides))
    if weights is not None:
        load_groundingdino_weights(model, weights)
    return model.to(device).eval()


# ------------------------------------------------------------------------ inference
def dino_resize_shape(
    height: int, width: int, size: int = 800, max_size: int | None = 1333
) -> tuple[int, int]:
    """Output ``(h, w)`` of the reference's ``RandomResize([size], max_size)`` (short side = size)."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = round(max_size * short / long)
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def dino_preprocess(
    image: np.ndarray, size: int = 800, max_size: int | None = 1333, device: str = "cpu"
) -> torch.Tensor:
    """``HWC uint8 RGB`` in [0, 255] -> ``[1, 3, h, w]`` float32, resized and ImageNet-normalised.

    As the reference's GroundingDINO transform (``RandomResize([size], max_size)``,
    ``ToTensor``, ``Normalize``): torchvision's resize of the PIL image, i.e. PIL's
    bilinear (antialiased) resize of the uint8 image, rounded to uint8; then ``/ 255``
    and ImageNet mean/std.
    """
    h, w = dino_resize_shape(image.shape[0], image.shape[1], size, max_size)
    resized = pil_resize(image, h, w, "bilinear")  # [h, w, 3] uint8
    x = torch.tensor(resized, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0  # [1, 3, h, w]
    return normalise(x, IMAGENET_MEAN, IMAGENET_STD).to(device)


@dataclass(frozen=True)
class DinoImageFeatures:
    """Projected multi-scale image features of ONE image (immutable, reusable for any caption)."""

    srcs: tuple[torch.Tensor, ...]  # each [1, hidden, h_l, w_l]
    masks: tuple[torch.Tensor, ...]  # each [1, h_l, w_l] bool, True = padding
    poss: tuple[torch.Tensor, ...]  # each [1, hidden, h_l, w_l]


@dataclass(frozen=True)
class GroundingOutput:
    """Per-caption detections, all queries (no thresholding yet).

    ``token_scores``: ``[C, Q, T]`` float32 sigmoid token scores (T = real tokens of the
    longest caption, padding is 0). ``boxes``: ``[C, Q, 4]`` normalised ``cx, cy, w, h``.
    ``input_ids``: per caption, its token ids (no padding).
    """

    token_scores: torch.Tensor
    boxes: torch.Tensor
    input_ids: tuple[tuple[int, ...], ...]


@torch.no_grad()
def encode_image(model: Any, pixels: torch.Tensor) -> DinoImageFeatures:
    """Swin backbone + input projections for ``pixels [1, 3, h, w]`` (as the package's forward does)."""
    from groundingdino.util.misc import NestedTensor, nested_tensor_from_tensor_list

    samples = nested_tensor_from_tensor_list(pixels)
    features, poss = model.backbone(samples)
    srcs, masks = [], []
    for level, feat in enumerate(features):
        src, mask = feat.decompose()
        srcs.append(model.input_proj[level](src))
        masks.append(mask)
    for level in range(len(srcs), model.num_feature_levels):  # extra strided levels
        src = model.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
        mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        poss.append(model.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        srcs.append(src)
        masks.append(mask)
    return DinoImageFeatures(tuple(srcs), tuple(masks), tuple(poss))


def text_masks(
    input_ids: torch.Tensor, lengths: Sequence[int], special_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sentence attention masks ``[C, T, T]`` bool and position ids ``[C, T]`` for a padded batch.

    Each caption's masks are those of the caption ALONE (the package's function on
    its unpadded tokens); padding positions attend to themselves only. The package's
    function applied to a padded batch treats a short caption's ``[SEP]`` as a
    phrase separator, which changes its text features.
    """
    from groundingdino.models.GroundingDINO.bertwarper import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    n, t = input_ids.shape
    attn = torch.eye(t, dtype=torch.bool, device=input_ids.device).repeat(n, 1, 1)
    pos = torch.zeros((n, t), dtype=torch.long, device=input_ids.device)
    for i, length in enumerate(lengths):
        a, p, _ = generate_masks_with_special_tokens_and_transfer_map(
            {"input_ids": input_ids[i : i + 1, :length]}, list(special_ids), None
        )
        attn[i, :length, :length] = a[0]
        pos[i, :length] = p[0]
    return attn, pos


def _per_head(model: Any, attn: torch.Tensor) -> torch.Tensor:
    """Text self-attention mask ``[C, T, T]`` -> ``[C * heads, T, T]`` in batch-major order.

    The package's text enhancer expands a ``[C, T, T]`` mask with ``repeat(nhead, 1, 1)``
    (head-major), but ``nn.MultiheadAttention`` reads ``[C * heads]`` batch-major: with
    more than one caption, captions would get each other's masks. The reference runs one
    caption at a time and never meets this. Given the expanded mask, the layer uses it as is.
    """
    layers = getattr(model.transformer.encoder, "text_layers", None)
    if not layers:
        return attn
    return attn.repeat_interleave(int(layers[0].nhead), dim=0)


@torch.no_grad()
def ground(model: Any, image: DinoImageFeatures, captions: Sequence[str]) -> GroundingOutput:
    """Score every query of one image against each caption, all captions in one batched pass."""
    from groundingdino.util.misc import inverse_sigmoid

    device = image.srcs[0].device
    max_len = int(model.max_text_len)
    tok = model.tokenizer(list(captions), padding="longest", return_tensors="pt")
    ids = tok["input_ids"][:, :max_len].to(device)  # [C, T]
    valid = tok["attention_mask"][:, :max_len].to(device).bool()  # [C, T]
    lengths = valid.sum(dim=1).tolist()
    attn, pos = text_masks(ids, lengths, model.specical_tokens)
    bert = model.bert(
        input_ids=ids,
        attention_mask=attn,
        token_type_ids=tok["token_type_ids"][:, :max_len].to(device),
        position_ids=pos,
    )
    text_dict = {
        "encoded_text": model.feat_map(bert["last_hidden_state"]),  # [C, T, hidden]
        "text_token_mask": valid,
        "position_ids": pos,
        "text_self_attention_masks": _per_head(model, attn),
    }
    c = len(captions)
    srcs = [s.expand(c, -1, -1, -1) for s in image.srcs]
    masks = [m.expand(c, -1, -1) for m in image.masks]
    poss = [p.expand(c, -1, -1, -1) for p in image.poss]
    hs, reference, _, _, _ = model.transformer(srcs, masks, None, poss, None, None, text_dict)
    # last decoder layer only (what the package's forward returns)
    delta = model.bbox_embed[-1](hs[-1])  # [C, Q, 4]
    boxes = (delta + inverse_sigmoid(reference[-2])).sigmoid()
    logits = model.class_embed[-1](hs[-1], text_dict)  # [C, Q, 256], -inf beyond the text
    t = ids.shape[1]
    scores = logits[..., :t].sigmoid().float()
    return GroundingOutput(
        token_scores=scores,
        boxes=boxes.float(),
        input_ids=tuple(tuple(ids[i, : lengths[i]].tolist()) for i in range(c)),
    )


__all__ = [
    "BERT_WEIGHTS",
    "GROUNDINGDINO_WEIGHTS",
    "TINY_BERT",
    "TINY_OVERRIDES",
    "DinoImageFeatures",
    "GroundingOutput",
    "check_bert_dir",
    "create_groundingdino",
    "dino_args",
    "dino_preprocess",
    "dino_resize_shape",
    "encode_image",
    "ground",
    "save_random_bert",
]
