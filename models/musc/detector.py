"""MuSc detector: batch (transductive) mode and stream mode against a reference bank.

- ``predict_batch(images)`` without references: the official MuSc on the set ``images``
  (at least 2): every image is scored against all the others, then RsCIN re-scores the
  image scores over the batch.
- ``predict_batch(images, references=bank)``: the same definition on the set
  ``bank + images``: each image is scored against every bank image AND the other images
  of the request. RsCIN is not applied (it would need the bank images' scores against
  this set, see docs/musc.md). ``predict(image, references=bank)`` is the one-image case:
  stream mode.
- ``encode_references(images)`` gives a bank; :mod:`models.musc.bank` appends / evicts.

Scores and maps in results follow the [0, 1] contract of :class:`models.base.AnomalyResult`:
the official MSM values are distances between unit vectors (in [0, 2]), halved. RsCIN
scores are already in [0, 1] (min-max over the batch). ``details`` carries the official
units (``raw_score``) and what was applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    AnomalyResult,
    Detector,
    ReferenceMismatchError,
    ReferenceSet,
    check_image,
    image_hash,
)
from models.clip_backbone import OPENAI_MEAN, OPENAI_STD, normalise, pil_resize
from models.cpu import checked_precision
from models.musc.bank import check_bank
from models.musc.torch_model import (
    DEFAULT_CHUNK,
    R_LIST,
    RSCIN_K,
    TOPMIN_MAX,
    TOPMIN_MIN,
    BackboneTokens,
    MuscScores,
    layer_norm_tokens,
    musc_patch_scores,
    rscin,
    score_maps,
)

if TYPE_CHECKING:
    from prompts import ProductRecipe

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BANK_DTYPES = {"float16": np.float16, "float32": np.float32}
#: the result contract is [0, 1]; MSM distances between unit vectors lie in [0, 2]
MAP_SCALE = 0.5


def preprocess_images(
    images: Sequence[np.ndarray],
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: str,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``HWC uint8 RGB`` images -> normalised ``[B, 3, size, size]`` float32, as the official code.

    Each image alone, as the official datasets' torchvision transforms on the PIL image:
    ``Resize((size, size))`` = PIL's resize of the **uint8** image with PIL's rounding
    (``interpolation``: CLIP ``bicubic``, open_clip ``image_transform``; DINOv2 ``bilinear``,
    the datasets' own ``Resize``), ``CenterCrop`` (a no-op after it), ``ToTensor``
    (``/ 255``), ``Normalize``. Any size and aspect ratio: the image is squashed to a
    square, as in the official code.
    """
    batch = []
    for i, img in enumerate(images):
        check_image(img, f"image {i}")
        resized = np.ascontiguousarray(pil_resize(img, size, size, interpolation))  # [S, S, 3] uint8
        if not resized.flags.writeable:  # torch.from_numpy wants a writeable buffer
            resized = resized.copy()
        t = torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
        batch.append(t)  # [1, 3, S, S] in [0, 1]
    return normalise(torch.cat(batch), mean, std).to(device)


@dataclass(frozen=True)
class MuscConfig:
    """Scoring settings (official defaults).

    Attributes:
        image_size: processing size (official 518).
        r_list: LNAMD aggregation degrees (official 1, 3, 5).
        topmin_min, topmin_max: MSM interval of the sorted per-image distances (official 0, 0.3).
        rscin_k: RsCIN ``k_list`` (official 1, 2, 3; VisA 1, 8, 9; empty = off).
    """

    image_size: int
    r_list: tuple[int, ...] = R_LIST
    topmin_min: float = TOPMIN_MIN
    topmin_max: float = TOPMIN_MAX
    rscin_k: tuple[int, ...] = RSCIN_K

    def digest(self, feature_layers: Sequence[int]) -> str:
        blob = json.dumps(
            {
                "image_size": self.image_size,
                "layers": list(feature_layers),
                "r": list(self.r_list),
                "topmin": [self.topmin_min, self.topmin_max],
                "rscin_k": list(self.rscin_k),
            },
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class StreamPrediction:
    """Stream-mode answer: the result and the image's bank entry (to append if accepted)."""

    result: AnomalyResult
    entry: ReferenceSet


class MuscDetector(Detector):
    """MuSc on a ViT token encoder (open_clip CLIP or timm DINOv2).

    Holds the model and its settings only: no per-request state, so ``predict_batch``
    and ``encode_references`` may run from several threads at once.

    Args:
        encoder: module mapping normalised pixels ``[B, 3, S, S]`` to
            :class:`~models.musc.torch_model.BackboneTokens`; must expose ``feature_layers``,
            ``token_dim`` and ``embedding_dim``.
        model_name: architecture label (``ViT-L-14-336``, ``dinov2_vitb14``, ...).
        weights_tag: weights file name, official tag, or ``random-init``.
        random_weights: True for random weights (never a real result).
        config: :class:`MuscConfig`.
        mean, std, interpolation: preprocessing of the backbone.
        precision: ``fp32`` (default), ``bf16`` (autocast on the backbone only; LNAMD and
            MSM always run in float32, as the official ``cdist``) or ``fp16`` (CUDA).
        bank_dtype: ``float32`` (default, exact) or ``float16`` (half the bytes; the service's
            choice) for bank tokens.
        chunk: reference images per ``cdist`` call.
        encode_batch: images per backbone pass.
    """

    method = "musc"
    supports_references = True

    def __init__(
        self,
        *,
        encoder: nn.Module,
        model_name: str,
        weights_tag: str,
        random_weights: bool,
        config: MuscConfig,
        mean: tuple[float, float, float] = OPENAI_MEAN,
        std: tuple[float, float, float] = OPENAI_STD,
        interpolation: str = "bicubic",
        device: str = "cpu",
        precision: str = "fp32",
        bank_dtype: str = "float32",
        chunk: int = DEFAULT_CHUNK,
        encode_batch: int = 8,
    ) -> None:
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {', '.join(_BANK_DTYPES)}, got {bank_dtype!r}")
        if any(r < 1 or r % 2 == 0 for r in config.r_list) or not config.r_list:
            raise ValueError(f"r_list must hold positive odd degrees, got {config.r_list}")
        enc: Any = encoder
        patch = int(enc.patch_size)
        if config.image_size % patch:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size {patch}")
        self.encoder = encoder.to(device).eval().requires_grad_(False)
        self.model_name = model_name
        self.weights_tag = weights_tag
        self.random_weights = bool(random_weights)
        self.config = config
        self.mean = mean
        self.std = std
        self.interpolation = interpolation
        self.device = str(device)
        self.precision_choice = checked_precision(precision, self.device, method=self.method)
        self.precision = self.precision_choice.effective  # what runs
        self.requested_precision = precision
        self.bank_dtype = bank_dtype
        self.chunk = int(chunk)
        self.encode_batch = max(1, int(encode_batch))
        self.feature_layers: tuple[int, ...] = tuple(int(i) for i in enc.feature_layers)
        self.token_dim = int(enc.token_dim)
        self.embedding_dim = int(enc.embedding_dim)
        self.patch_size = patch
        g = config.image_size // patch
        self.grid = (g, g)
        self._digest = config.digest(self.feature_layers)

    # ---------------------------------------------------------------- identity
    @property
    def model_key(self) -> str:
        """``musc/model/weights/size/blocks``: banks are only valid for the same features."""
        layers = "-".join(str(i) for i in self.feature_layers)
        return f"{self.method}/{self.model_name}/{self.weights_tag}/{self.config.image_size}/{layers}"

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        """MuSc uses no prompts: digest of the scoring settings (arguments ignored)."""
        return self._digest

    @property
    def bytes_per_image(self) -> int:
        """Bank bytes per image: tokens ``n_blocks*L*C`` + embedding ``E`` in ``bank_dtype``, + 8 (time)."""
        item = np.dtype(_BANK_DTYPES[self.bank_dtype]).itemsize
        n = self.grid[0] * self.grid[1]
        return len(self.feature_layers) * n * self.token_dim * item + self.embedding_dim * item + 8

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "requested_precision": self.requested_precision,
            **(
                {"precision_fallback": self.precision_choice.fallback}
                if self.precision_choice.fallback
                else {}
            ),
            "image_size": self.config.image_size,
            "feature_layers": list(self.feature_layers),
            "r_list": list(self.config.r_list),
            "topmin": [self.config.topmin_min, self.config.topmin_max],
            "rscin_k": list(self.config.rscin_k),
            "bank_dtype": self.bank_dtype,
            "bank_bytes_per_image": self.bytes_per_image,
        }

    # ---------------------------------------------------------------- features
    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return preprocess_images(
            images, self.config.image_size, self.mean, self.std, self.interpolation, self.device
        )

    @torch.inference_mode()
    def encode_tokens(self, pixels: torch.Tensor) -> BackboneTokens:
        """Backbone pass in the detector's precision; tokens returned as float32."""
        if self.precision == "fp32":
            out = self.encoder(pixels)
        else:
            device_type = "cuda" if self.device.startswith("cuda") else "cpu"
            with torch.autocast(device_type=device_type, dtype=_PRECISIONS[self.precision]):
                out = self.encoder(pixels)
        if tuple(out.grid) != self.grid:
            raise RuntimeError(f"encoder gave a {out.grid} grid, expected {self.grid}")
        return BackboneTokens(
            patch_tokens=tuple(t.float() for t in out.patch_tokens),
            image_embedding=out.image_embedding.float(),
            grid=out.grid,
        )

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNormed tokens ``[B, n_blocks, L, C]`` float32 and embeddings ``[B, E]`` float32.

        The backbone sees at most ``encode_batch`` images at a time (bounds activation memory).
        """
        normed, emb = [], []
        for s in range(0, len(images), self.encode_batch):
            toks = self.encode_tokens(self.pixels(images[s : s + self.encode_batch]))
            normed.append(torch.stack([layer_norm_tokens(t, self.grid) for t in toks.patch_tokens], dim=1))
            emb.append(toks.image_embedding)
        return torch.cat(normed), torch.cat(emb)

    def _entry(self, images: Sequence[np.ndarray], normed: torch.Tensor, emb: torch.Tensor) -> ReferenceSet:
        dt = _BANK_DTYPES[self.bank_dtype]
        now = time.time()
        return ReferenceSet(
            method=self.method,
            model_key=self.model_key,
            image_hashes=tuple(image_hash(img) for img in images),
            arrays={
                "tokens": normed.cpu().numpy().astype(dt),
                "embedding": emb.cpu().numpy().astype(dt),
                "added_at": np.full((len(images),), now, dtype=np.float64),
            },
        )

    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        """A bank of ``images`` (oldest first): one backbone pass, no scoring.

        Arrays: ``tokens [M, n_blocks, L, C]`` (LayerNormed, ``bank_dtype``),
        ``embedding [M, E]``, ``added_at [M]`` float64. ``object_name``/``product`` are
        ignored (MuSc uses no prompts).
        """
        if len(images) == 0:
            raise ValueError("at least one image is needed to make a MuSc bank")
        for i, img in enumerate(images):
            check_image(img, f"reference image {i}")
        normed, emb = self.features(list(images))
        self.count("references_encoded", len(images))
        return self._entry(list(images), normed, emb)

    def check_references(self, references: ReferenceSet | None) -> None:
        super().check_references(references)
        if references is None:
            return
        check_bank(references)
        tokens = references.arrays["tokens"]
        want = (
            len(self.feature_layers),
            self.grid[0] * self.grid[1],
            self.token_dim,
        )
        if tuple(tokens.shape[1:]) != want:
            raise ReferenceMismatchError(
                f"bank tokens have per-image shape {tuple(tokens.shape[1:])}, this detector needs {want}"
            )

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score_features(
        self,
        normed: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        *,
        bank: ReferenceSet | None = None,
        apply_rscin: bool = True,
    ) -> MuscScores:
        """Official-unit MuSc scores of query features within ``queries + bank``.

        Args:
            normed: ``[Q, n_blocks, L, C]`` LayerNormed tokens (:meth:`features`).
            embeddings: ``[Q, E]`` image embeddings (needed for RsCIN).
            bank: a bank, or ``None`` (batch mode: needs ``Q >= 2``).
            apply_rscin: RsCIN over the queries; only in batch mode (never with a bank, even
                an empty one).
        """
        q = int(normed.shape[0])
        m = 0 if bank is None else bank.count
        if q + m < 2:
            raise ValueError(
                "MuSc scores images against OTHER images: give at least 2 images, or a bank "
                "(references=...) with at least one image"
            )
        bank_normed = None
        if bank is not None and m > 0:
            bt = torch.from_numpy(np.array(bank.arrays["tokens"])).to(self.device)  # [M, nb, L, C]
            bank_normed = [bt[:, li] for li in range(bt.shape[1])]
        patch = musc_patch_scores(
            [normed[:, li] for li in range(normed.shape[1])],
            self.grid,
            bank_normed=bank_normed,
            r_list=self.config.r_list,
            topmin_min=self.config.topmin_min,
            topmin_max=self.config.topmin_max,
            chunk=self.chunk,
        )
        maps, img_scores = score_maps(patch, self.grid, self.config.image_size)
        rs = None
        if bank is None and apply_rscin and self.config.rscin_k and 0 not in self.config.rscin_k:
            if embeddings is None:
                raise ValueError("RsCIN needs the image embeddings")
            rs = rscin(img_scores, embeddings, self.config.rscin_k)
        return MuscScores(
            patch_scores=patch, maps=maps, image_scores=img_scores, rscin_scores=rs, n_others=q - 1 + m
        )

    def _results(
        self,
        images: Sequence[np.ndarray],
        scores: MuscScores,
        *,
        mode: str,
        bank: ReferenceSet | None,
        timings: dict[str, float],
    ) -> list[AnomalyResult]:
        out = []
        for i, img in enumerate(images):
            h, w = int(img.shape[0]), int(img.shape[1])
            m = scores.maps[i].float() * MAP_SCALE  # [S, S]
            if (h, w) != tuple(m.shape):
                shrink = h < m.shape[0] or w < m.shape[1]
                m = F.interpolate(
                    m[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
                )[0, 0]
            arr = m.clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
            arr.setflags(write=False)
            raw = float(scores.image_scores[i])
            if scores.rscin_scores is not None:
                score, kind = float(scores.rscin_scores[i]), "rscin"
            else:
                score, kind = raw * MAP_SCALE, "msm"
            details = {
                "mode": mode,
                "score_kind": kind,
                "raw_score": raw,
                "n_others": scores.n_others,
                "bank_size": 0 if bank is None else bank.count,
                "batch_size": len(images),
                "precision": self.precision,
                "image_size": self.config.image_size,
                "feature_layers": list(self.feature_layers),
                "r_list": list(self.config.r_list),
            }
            if self.precision_choice.fallback:
                details["precision_fallback"] = self.precision_choice.fallback
            out.append(
                AnomalyResult(
                    score=min(1.0, max(0.0, score)),
                    anomaly_map=arr,
                    method=self.method,
                    model=self.model_name,
                    weights=self.weights_tag,
                    prompt_digest=self._digest,
                    used_references=bank is not None,
                    random_weights=self.random_weights,
                    timings=dict(timings),
                    details=details,
                )
            )
        return out

    def _check_batch(self, images: Sequence[np.ndarray], references: ReferenceSet | None) -> None:
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        if references is not None:
            self.check_references(references)
        if len(images) + (0 if references is None else references.count) < 2:
            raise ValueError(
                "MuSc needs at least 2 images in a batch without references (each image is scored "
                "against the others); for one image pass references=<bank>"
            )

    @torch.inference_mode()
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
        rscin: bool = True,
    ) -> list[AnomalyResult]:
        """Score ``HWC uint8 RGB`` images of one product (sizes may differ).

        Without ``references``: transductive, the batch (>= 2 images) scores itself, then
        RsCIN (``rscin=False`` skips it and returns the MSM score). With ``references``:
        each image against the bank and the other images of the batch, no RsCIN.
        ``object_name``/``product`` are ignored.
        """
        if len(images) == 0:
            return []
        self._check_batch(images, references)
        t0 = time.perf_counter()
        normed, emb = self.features(list(images))
        t1 = time.perf_counter()
        scores = self.score_features(normed, emb, bank=references, apply_rscin=rscin)
        t2 = time.perf_counter()
        mode = "batch" if references is None else ("stream" if len(images) == 1 else "batch+bank")
        timings = {"backbone": t1 - t0, "scoring": t2 - t1}
        res = self._results(images, scores, mode=mode, bank=references, timings=timings)
        t3 = time.perf_counter()
        return [dataclasses.replace(r, timings={**r.timings, "postprocess": t3 - t2}) for r in res]

    @torch.inference_mode()
    def predict_stream(self, image: np.ndarray, *, bank: ReferenceSet) -> StreamPrediction:
        """Stream mode: score ``image`` against ``bank`` and return its bank entry too.

        One backbone pass: the entry (what :meth:`encode_references` would give for this
        image) can be appended with :func:`models.musc.bank.bank_append` if the image is
        accepted as normal. Same result as ``predict(image, references=bank)``.
        """
        self._check_batch([image], bank)
        t0 = time.perf_counter()
        normed, emb = self.features([image])
        t1 = time.perf_counter()
        scores = self.score_features(normed, emb, bank=bank)
        t2 = time.perf_counter()
        res = self._results(
            [image], scores, mode="stream", bank=bank, timings={"backbone": t1 - t0, "scoring": t2 - t1}
        )
        return StreamPrediction(result=res[0], entry=self._entry([image], normed, emb))
