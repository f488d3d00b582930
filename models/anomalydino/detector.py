"""AnomalyDINO detector: golden images -> memory bank (a ReferenceSet), images -> scores and maps.

Scores and maps are anomalib's cosine distances divided by 2 (exactly affine, [0, 2]
-> [0, 1]); ``details["raw_score"]`` keeps the raw distance score. References are
REQUIRED: AnomalyDINO has no zero-shot mode.
"""

from __future__ import annotations

import copy
import logging
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from models.anomalydino.torch_model import (
    AnomalyDinoModel,
    PatchFeatures,
    kcenter_greedy,
)
from models.base import (
    AnomalyResult,
    Detector,
    ReferenceMismatchError,
    ReferenceSet,
    ReferencesRequiredError,
    check_image,
    image_hash,
)
from models.cpu import checked_precision
from models.dinov2 import Dinov2Backbone, ImageSize, preprocess, resized_size

if TYPE_CHECKING:
    from prompts import ProductRecipe

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: anomalib's default, a square; the paper's 448 and 672 are shorter-side sizes (ints)
DEFAULT_IMAGE_SIZE: tuple[int, int] = (252, 252)
#: tokens per backbone pass on CPU: sub-batches of whole images keep activations cache-sized
#: (about 12 images at 252x252, 4 at 448x448, 1 at 672x672); results do not depend on it
CPU_TOKENS_PER_PASS = 4096
PROMPT_DIGEST = "none"  # AnomalyDINO uses no text prompts
BANK = "bank"  # name of the ReferenceSet array: [M, D] float32 L2-normalised patch features


def _as_size(image_size: int | Sequence[int]) -> ImageSize:
    """``image_size`` as anomalib takes it: an int (shorter side) or an exact ``(height, width)``."""
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        return int(image_size)
    if isinstance(image_size, (str, bytes, bool)) or not isinstance(image_size, Sequence):
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    vals = tuple(int(v) for v in image_size)
    if len(vals) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return vals[0], vals[1]


def size_tag(image_size: ImageSize) -> str:
    """``short448`` for a shorter-side size, ``448x448`` for an exact one (model keys, logs)."""
    if isinstance(image_size, int):
        return f"short{image_size}"
    return f"{image_size[0]}x{image_size[1]}"


class AnomalyDinoDetector(Detector):
    """AnomalyDINO (few-shot) on a timm DINOv2 ViT, numerics of anomalib 2.7 ``AnomalyDINOModel``.

    Holds the model only; memory banks are immutable :class:`ReferenceSet` objects
    (array ``bank``: ``[M, D]`` float32), so ``predict_batch`` and
    ``encode_references`` may run concurrently from several threads.

    Args:
        backbone: loaded DINOv2 (:func:`models.dinov2.create_dinov2`).
        device: torch device string.
        image_size: model input size as anomalib 2.7 ``configure_pre_processor`` takes it
            (torchvision ``Resize``, bicubic, antialiased): an int resizes the SHORTER side
            to it and keeps the aspect ratio (longer side ``int(s * long / short)``), a
            ``(height, width)`` resizes to exactly that. Default ``(252, 252)`` as anomalib
            (18x18 patches); the paper uses shorter sides 448 (32x32 patches on a square
            image) and 672 (48x48): finer detail, about 3x and 7x the tokens of 252.
            The input is then centre-cropped to a multiple of the patch size.
        num_neighbours: ``k`` nearest bank patches averaged (anomalib default 1).
        masking: PCA background masking (anomalib ``masking``; for objects on a plain
            background, see the paper: it helps some MVTec objects, hurts textures).
        coreset_subsampling: reduce the bank by greedy k-center coreset at encode time.
        sampling_ratio: coreset fraction kept (anomalib default 0.1).
        precision: ``fp32`` (default) or ``bf16`` for the backbone (``fp16`` on CUDA);
            distances, scores and maps are float32.
        pass_batch: images per backbone pass (``None``: about 4096 tokens' worth on CPU,
            counted from each group's real input size; the whole group on GPU).
    """

    method = "anomalydino"
    supports_references = True
    requires_references = True

    def __init__(
        self,
        *,
        backbone: Dinov2Backbone,
        device: str = "cpu",
        image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
        num_neighbours: int = 1,
        masking: bool = False,
        coreset_subsampling: bool = False,
        sampling_ratio: float = 0.1,
        precision: str = "fp32",
        pass_batch: int | None = None,
    ) -> None:
        self.device = str(device)
        self.precision_choice = checked_precision(precision, self.device, method=self.method)
        self.precision = self.precision_choice.effective  # what runs
        self.image_size: ImageSize = _as_size(image_size)
        min_side = 2 * backbone.patch_size  # the blur's reflect border needs > 16 px after the crop
        sides = (self.image_size,) if isinstance(self.image_size, int) else self.image_size
        if min(sides) < min_side:
            raise ValueError(f"image_size must be at least {min_side} px per side, got {self.image_size}")
        if pass_batch is not None and int(pass_batch) < 1:
            raise ValueError(f"pass_batch must be >= 1 or None, got {pass_batch}")
        if int(num_neighbours) < 1:
            raise ValueError(f"num_neighbours must be >= 1, got {num_neighbours}")
        if not 0.0 < float(sampling_ratio) <= 1.0:
            raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
        self.backbone = backbone
        self.model_name = backbone.arch
        self.weights_tag = backbone.weights_tag
        self.random_weights = backbone.random_weights
        self.num_neighbours = int(num_neighbours)
        self.masking = bool(masking)
        self.coreset_subsampling = bool(coreset_subsampling)
        self.sampling_ratio = float(sampling_ratio)
        self.on_cpu = not self.device.startswith("cuda")
        self.pass_batch = None if pass_batch is None else int(pass_batch)
        dtype = _PRECISIONS[self.precision]
        # a low-precision COPY: the backbone may be shared with an fp32 detector
        vit = backbone.model if dtype == torch.float32 else copy.deepcopy(backbone.model).to(dtype)
        self.model = AnomalyDinoModel(
            vit=vit,
            patch_size=backbone.patch_size,
            num_neighbours=self.num_neighbours,
            masking=self.masking,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ identity
    @property
    def model_key(self) -> str:
        """``method/model/weights`` plus what shapes the memory bank (size, masking, coreset).

        The size is ``short448`` for an int ``image_size`` (shorter side) and ``448x448``
        for an exact one: a bank encoded at another size, under the other meaning of the
        size, or with other masking/coreset settings does not fit, so it is refused
        (:class:`models.base.ReferenceMismatchError`) and a service recomputes it.
        ``num_neighbours``, ``precision`` and ``pass_batch`` do not change it.
        """
        key = f"{self.method}/{self.model_name}/{self.weights_tag}/{size_tag(self.image_size)}"
        if self.masking:
            key += "/masking"
        if self.coreset_subsampling:
            key += f"/coreset{self.sampling_ratio:g}"
        return key

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        return PROMPT_DIGEST

    def _precision_details(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "precision": self.precision,
            "precision_requested": self.precision_choice.requested,
        }
        if self.precision_choice.fallback:
            out["precision_fallback"] = self.precision_choice.fallback
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **self._precision_details(),
            "image_size": self._size_detail(),
            "num_neighbours": self.num_neighbours,
            "masking": self.masking,
            "coreset_subsampling": self.coreset_subsampling,
            "sampling_ratio": self.sampling_ratio,
        }

    # ------------------------------------------------------------------ features
    def _size_detail(self) -> int | list[int]:
        """``image_size`` for JSON: the int (shorter side) or ``[height, width]``."""
        return self.image_size if isinstance(self.image_size, int) else list(self.image_size)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input ``(h, w)`` of an ``height x width`` image: resized, before the crop."""
        return resized_size(height, width, self.image_size)

    def _per_pass(self, input_size: tuple[int, int]) -> int | None:
        """Images per backbone pass at ``input_size`` (``None``: all of them)."""
        if self.pass_batch is not None or not self.on_cpu:
            return self.pass_batch
        p = self.backbone.patch_size
        tokens = (input_size[0] // p) * (input_size[1] // p)  # the cropped grid
        return max(1, CPU_TOKENS_PER_PASS // tokens)

    def _passes(self, images: Sequence[np.ndarray]) -> Iterator[tuple[list[int], PatchFeatures]]:
        """``(indices, features)`` per backbone pass: images grouped by input size, in chunks.

        One pass holds images of one resized size (one tensor); groups come in the
        order of their first image, indices ascending within a group. Features do not
        depend on the grouping or chunking (each image is resized and encoded alone).
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(int(img.shape[0]), int(img.shape[1])), []).append(i)
        for size, idx in groups.items():
            n = self._per_pass(size) or len(idx)
            for start in range(0, len(idx), n):
                chunk = idx[start : start + n]
                pixels = preprocess(
                    [images[i] for i in chunk], size, self.backbone.mean, self.backbone.std, self.device
                )  # [b, 3, h, w]
                yield chunk, self.model.extract(pixels)

    @torch.no_grad()
    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        """The memory bank of K golden images: their (foreground) patch features, L2-normalised.

        With ``coreset_subsampling`` the bank keeps ``int(M * sampling_ratio)`` patches
        chosen by greedy k-center (seeded: the same images give the same bank).
        ``object_name``/``product`` do not matter (no prompts).
        """
        if len(images) == 0:
            raise ValueError("at least one golden (reference) image is needed")
        for i, img in enumerate(images):
            check_image(img, f"reference image {i}")
        rows: list[torch.Tensor] = [torch.zeros(0)] * len(images)
        for idx, feats in self._passes(images):
            for j, i in enumerate(idx):
                rows[i] = feats.features[j][feats.masks[j]]  # [m_i, D] foreground patches
        bank = torch.cat(rows)  # [M, D], image-major in input order (coreset draws depend on it)
        if bank.shape[0] == 0:
            raise ValueError(
                "background masking removed every patch of the golden images; use masking=False for this product"
            )
        if self.coreset_subsampling:
            bank = bank[kcenter_greedy(bank, self.sampling_ratio)]
        self.count("references_encoded", len(images))
        return ReferenceSet(
            method=self.method,
            model_key=self.model_key,
            image_hashes=tuple(image_hash(img) for img in images),
            arrays={BANK: bank.cpu().numpy().astype(np.float32, copy=False)},
        )

    def check_references(self, references: ReferenceSet | None) -> None:
        """Also the bank itself: a non-empty ``[M, D]`` array, ``D`` this backbone's width.

        Raises:
            ReferenceMismatchError: another model's bank, or a bank of the wrong shape (a
                corrupt stored bank must be refused here, not fail inside the model).
        """
        super().check_references(references)
        if references is None:
            return
        bank = references.arrays.get(BANK)
        dim = self.backbone.embed_dim
        if bank is None or bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] != dim:
            got = "missing" if bank is None else f"of shape {tuple(bank.shape)}"
            raise ReferenceMismatchError(
                f"AnomalyDINO bank {BANK!r} is {got}; this detector needs [M >= 1, {dim}]"
            )

    def bank_tensor(self, references: ReferenceSet) -> torch.Tensor:
        """The bank of ``references`` as a float32 ``[M, D]`` tensor on the detector's device."""
        bank = references.arrays.get(BANK)
        if bank is None or bank.ndim != 2 or bank.shape[1] != self.backbone.embed_dim:
            raise ValueError(f"reference set has no [M, {self.backbone.embed_dim}] '{BANK}' array")
        return torch.tensor(np.asarray(bank), dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Score ``HWC uint8 RGB`` images (sizes may differ) against the golden-image bank.

        Each result's ``anomaly_map`` is float32 ``(H, W)`` of its image, values in [0, 1]
        (cosine distance / 2); ``score`` is the mean of the top 1 % patch distances / 2.
        Timings are per batch.

        Raises:
            ReferencesRequiredError: ``references`` is None.
            ReferenceMismatchError: the bank was encoded with another model/size/setting.
        """
        if references is None:
            raise ReferencesRequiredError(
                "anomalydino compares images with golden images of the product: encode them first "
                "(detector.encode_references([...])) and pass references=...; in the service, upload "
                "golden images for the product"
            )
        self.check_references(references)
        if len(images) == 0:
            return []
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        t0 = time.perf_counter()
        bank = self.bank_tensor(references)
        t_bank = time.perf_counter() - t0
        t_encode = t_score = 0.0
        raw_scores: list[float] = [0.0] * len(images)
        raw_maps: list[torch.Tensor] = [torch.zeros(0)] * len(images)  # each [h, w] at its input size
        passes = self._passes(images)
        while True:
            ta = time.perf_counter()
            step = next(passes, None)
            if step is None:
                break
            idx, feats = step
            tb = time.perf_counter()
            out = self.model.score(feats, bank)
            for j, i in enumerate(idx):
                raw_scores[i] = float(out.pred_score[j])
                raw_maps[i] = out.anomaly_map[j]
            t_encode += tb - ta
            t_score += time.perf_counter() - tb
        t1 = time.perf_counter()
        maps: list[np.ndarray] = []
        for img, m in zip(images, raw_maps, strict=True):
            h, w = int(img.shape[0]), int(img.shape[1])
            if (h, w) != tuple(m.shape):
                shrink = h < m.shape[0] or w < m.shape[1]
                m = F.interpolate(
                    m[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
                )[0, 0]
            arr = (m / 2.0).clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
            arr.setflags(write=False)
            maps.append(arr)
        t2 = time.perf_counter()
        # "encode" includes preprocessing and masking; "score" the nearest-neighbour search and maps
        timings = {"bank": t_bank, "encode": t_encode, "score": t_score, "resize": t2 - t1}
        details_common = {
            **self._precision_details(),
            "image_size": self._size_detail(),
            "num_neighbours": self.num_neighbours,
            "masking": self.masking,
            "bank_size": int(bank.shape[0]),
            "references": references.count,
            "batch_size": len(images),
        }
        results = []
        for img, raw, amap in zip(images, raw_scores, maps, strict=True):
            input_hw = self.input_size(int(img.shape[0]), int(img.shape[1]))
            results.append(
                AnomalyResult(
                    score=min(max(raw / 2.0, 0.0), 1.0),
                    anomaly_map=amap,
                    method=self.method,
                    model=self.model_name,
                    weights=self.weights_tag,
                    prompt_digest=PROMPT_DIGEST,
                    used_references=True,
                    random_weights=self.random_weights,
                    timings=dict(timings),
                    details={**details_common, "raw_score": raw, "input_size": list(input_hw)},
                )
            )
        return results


__all__ = [
    "BANK",
    "DEFAULT_IMAGE_SIZE",
    "AnomalyDinoDetector",
    "size_tag",
]
