"""SAA+ detector: GroundingDINO boxes -> property filters -> SAM masks -> saliency rescoring -> top-K map.

Per image (METHODS.md section 3)::

    dino = encode_image(image)                          # Swin backbone once
    out  = ground(dino, [object caption, *defect captions])   # one batched pass
    object boxes: score > box_thr, 0 < area < 1/N       -> object area (largest box, else 1)
    defect boxes: score > box_thr, 0 < area < r * object area, phrase without the
                  filter word, >= min_object_overlap inside an object box
    sam  = embed_image(image)                           # once
    masks = decode_boxes(sam, [object boxes if N > 1, defect boxes])   # one batched call
    saliency: WRN50-2 self-similarity (N = 1) or cross-object similarity (N > 1)
    s' = s * exp(3 * mean saliency in mask); keep top K; A = sum m s' / (1 + sum m)
    anomaly_map = 1 - exp(-A); score = max(anomaly_map)

Everything a request needs lives in local variables: nothing on ``self`` changes
after construction (the reference keeps ``is_sam_set``, the saliency size and the
prompts on its model object).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.base import AnomalyResult, Detector, ReferenceSet, check_image
from models.saa import hybrid
from models.saa.groundingdino import dino_preprocess, encode_image, ground
from models.saa.saliency import wrn_features
from models.saa.sam import decode_boxes, embed_image
from prompts.saa import SaaPromptSet, resolve_saa_prompts

if TYPE_CHECKING:
    from prompts import ProductRecipe


@dataclass(frozen=True)
class SaaSettings:
    """Resolutions of the three models (request-independent, fixed at construction).

    Reference values: GroundingDINO short side 800 (long side <= 1333), SAM's own
    1024, saliency 256 for one object and 1024 for several.
    """

    dino_size: int = 800
    dino_max_size: int | None = 1333
    saliency_size: int = 256
    multi_instance_saliency_size: int = 1024
    saliency_top_n: int = hybrid.SALIENCY_TOP_N


@dataclass(frozen=True)
class BoxCandidate:
    """One detected box after the property filters (JSON-friendly via :meth:`to_json`)."""

    prompt: str
    phrase: str
    box_xyxy: tuple[float, float, float, float]
    area_ratio: float
    score: float
    object_overlap: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "phrase": self.phrase,
            "box_xyxy": [round(v, 2) for v in self.box_xyxy],
            "area_ratio": round(self.area_ratio, 6),
            "score": round(self.score, 6),
            "object_overlap": round(self.object_overlap, 4),
        }


@dataclass(frozen=True)
class Proposals:
    """Object and defect boxes of one image."""

    objects: tuple[BoxCandidate, ...]
    defects: tuple[BoxCandidate, ...]
    object_area: float
    rejected: dict[str, int] = field(default_factory=dict)


class SaaPlusDetector(Detector):
    """SAA+ (Cao et al., 2023) on GroundingDINO Swin-T OGC, SAM and WideResNet-50-2.

    Args:
        dino: GroundingDINO model (:func:`models.saa.groundingdino.create_groundingdino`).
        sam: SAM model (:func:`models.saa.sam.create_sam`).
        wrn: WideResNet-50-2 (:func:`models.saa.saliency.create_wrn`).
        model_name / weights_tag / random_weights: identity reported in results.
        settings: model input resolutions.
    """

    method = "saa_plus"
    supports_references = False

    def __init__(
        self,
        *,
        dino: Any,
        sam: torch.nn.Module,
        wrn: torch.nn.Module,
        model_name: str,
        weights_tag: str,
        random_weights: bool,
        device: str = "cpu",
        settings: SaaSettings | None = None,
    ) -> None:
        self.dino = dino
        self.sam: Any = sam
        self.wrn = wrn
        self.model_name = model_name
        self.weights_tag = weights_tag
        self.random_weights = random_weights
        self.device = str(device)
        self.settings = settings or SaaSettings()
        self.tokenizer: Any = dino.tokenizer  # a transformers tokenizer
        self._special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)

    # ------------------------------------------------------------------ prompts
    def prompt_set(
        self, object_name: str | None = None, product: ProductRecipe | None = None
    ) -> SaaPromptSet:
        name = object_name or (product.object_name if product is not None else None)
        return resolve_saa_prompts(name, product.saa if product is not None else None)

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        return self.prompt_set(object_name, product).digest()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["settings"] = {
            "dino_size": self.settings.dino_size,
            "dino_max_size": self.settings.dino_max_size,
            "sam_image_size": int(self.sam.image_encoder.img_size),
            "saliency_size": self.settings.saliency_size,
            "multi_instance_saliency_size": self.settings.multi_instance_saliency_size,
            "precision": "fp32",
        }
        return d

    # ---------------------------------------------------------------- proposals
    def _token_words(self, ids: Sequence[int]) -> list[str]:
        words = self.tokenizer.convert_ids_to_tokens(list(ids))
        return ["" if i in self._special_ids else w for i, w in zip(ids, words, strict=True)]

    def propose(self, image: np.ndarray, prompts: SaaPromptSet) -> tuple[Proposals, dict[str, float]]:
        """GroundingDINO + language and property prompts for one ``HWC uint8 RGB`` image."""
        h, w = image.shape[:2]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pixels = dino_preprocess(image, self.settings.dino_size, self.settings.dino_max_size, self.device)
        feats = encode_image(self.dino, pixels)
        t1 = time.perf_counter()
        captions = [prompts.object_caption] + [c for c, _ in prompts.defect_prompts]
        out = ground(self.dino, feats, captions)
        t2 = time.perf_counter()
        timings["dino_image"] = t1 - t0
        timings["dino_grounding"] = t2 - t1

        scores_all = out.token_scores.cpu().numpy()  # [C, Q, T]
        boxes_all = out.boxes.cpu().numpy()  # [C, Q, 4]
        rejected = {"filter_word": 0, "outside_object": 0}

        def candidates(ci: int, max_area: float, filter_word: str | None) -> list[BoxCandidate]:
            n_tok = len(out.input_ids[ci])
            tok_scores = scores_all[ci, :, :n_tok]  # [Q, T]
            box_scores = tok_scores.max(axis=1)  # box score = max token score
            areas = hybrid.box_areas(boxes_all[ci])
            keep = hybrid.property_filter(
                box_scores, areas, box_threshold=prompts.box_threshold, max_area=max_area
            )
            words = self._token_words(out.input_ids[ci])
            xyxy = hybrid.cxcywh_to_xyxy(boxes_all[ci], w, h)
            found = []
            for q in np.flatnonzero(keep):
                phrase = hybrid.phrase_from_tokens(tok_scores[q], words, prompts.text_threshold)
                if filter_word is not None and hybrid.phrase_is_filtered(phrase, filter_word):
                    rejected["filter_word"] += 1
                    continue
                found.append(
                    BoxCandidate(
                        prompt=captions[ci],
                        phrase=phrase,
                        box_xyxy=tuple(float(v) for v in xyxy[q]),  # type: ignore[arg-type]
                        area_ratio=float(areas[q]),
                        score=float(box_scores[q]),
                    )
                )
            return found

        # the object itself: at most 1/N of the image (no filter word: the reference's 'PlaceHolder')
        objects = candidates(0, 1.0 / prompts.object_count, None)
        obj_area = hybrid.object_area(np.array([o.area_ratio for o in objects]))
        defects: list[BoxCandidate] = []
        for ci, (_, filter_word) in enumerate(prompts.defect_prompts, start=1):
            defects += candidates(ci, obj_area * prompts.max_area_ratio, filter_word)
        if objects and defects and prompts.min_object_overlap > 0:
            overlap = hybrid.overlap_with_objects(
                np.array([d.box_xyxy for d in defects]), np.array([o.box_xyxy for o in objects])
            )
            kept = []
            for d, ov in zip(defects, overlap, strict=True):
                if ov >= prompts.min_object_overlap:
                    kept.append(
                        BoxCandidate(d.prompt, d.phrase, d.box_xyxy, d.area_ratio, d.score, float(ov))
                    )
                else:
                    rejected["outside_object"] += 1
            defects = kept
        timings["filters"] = time.perf_counter() - t2
        return Proposals(tuple(objects), tuple(defects), obj_area, rejected), timings

    # ---------------------------------------------------------------- saliency
    def saliency(self, image: np.ndarray, object_masks: np.ndarray, object_count: int) -> np.ndarray:
        """``float32 (H, W)`` saliency in [0, 1] at the image resolution."""
        h, w = image.shape[:2]
        if object_count > 1 and len(object_masks) >= 2:
            size = self.settings.multi_instance_saliency_size
            feats = wrn_features(self.wrn, image, size)  # [C, s/4, s/4]
            grid = feats.shape[-2:]
            m = torch.from_numpy(object_masks).to(feats.device)[:, None].float()
            small = torch.nn.functional.interpolate(m, size=grid, mode="nearest")[:, 0] > 0.5
            sal = hybrid.multi_instance_saliency(feats, small)
        else:
            feats = wrn_features(self.wrn, image, self.settings.saliency_size)
            sal = hybrid.self_similarity_saliency(feats, self.settings.saliency_top_n)
        return hybrid.resize_map(sal, h, w)

    # ---------------------------------------------------------------- inference
    def _predict_one(self, image: np.ndarray, prompts: SaaPromptSet, digest: str) -> AnomalyResult:
        h, w = image.shape[:2]
        start = time.perf_counter()
        props, timings = self.propose(image, prompts)
        defects = props.defects
        use_objects = prompts.object_count > 1 and len(props.objects) >= 2
        raw = np.zeros((h, w), dtype=np.float64)
        kept_json: list[dict[str, Any]] = []
        if defects:
            t0 = time.perf_counter()
            emb = embed_image(self.sam, image)
            t1 = time.perf_counter()
            boxes = [d.box_xyxy for d in defects]
            if use_objects:
                boxes = [o.box_xyxy for o in props.objects] + boxes
            masks = decode_boxes(self.sam, emb, np.array(boxes, dtype=np.float32))  # one call
            t2 = time.perf_counter()
            n_obj = len(props.objects) if use_objects else 0
            object_masks, defect_masks = masks[:n_obj], masks[n_obj:]
            sal = self.saliency(image, object_masks, prompts.object_count)
            t3 = time.perf_counter()
            rescored, sal_means = hybrid.rescore(np.array([d.score for d in defects]), defect_masks, sal)
            order = hybrid.top_k(rescored, prompts.max_anomalies)
            raw = hybrid.anomaly_map(defect_masks[order], rescored[order])
            timings.update(sam_image=t1 - t0, sam_decode=t2 - t1, saliency=t3 - t2)
            for rank, i in enumerate(order):
                kept_json.append(
                    {
                        **defects[i].to_json(),
                        "saliency": round(float(sal_means[i]), 6),
                        "rescored": round(float(rescored[i]), 6),
                        "mask_area_ratio": round(float(defect_masks[i].mean()), 6),
                        "rank": rank,
                    }
                )
        amap = hybrid.to_unit_interval(raw)
        amap.setflags(write=False)
        raw_score = float(raw.max())
        timings["postprocess"] = time.perf_counter() - start - sum(timings.values())
        timings["total"] = time.perf_counter() - start
        details = {
            "boxes": kept_json,
            "candidates": len(defects),
            "object_boxes": [o.to_json() for o in props.objects],
            "object_area_ratio": round(props.object_area, 6),
            "rejected": dict(props.rejected),
            "raw_score": raw_score,
            "map_transform": "1 - exp(-A)",
            "prompts": prompts.to_json(),
        }
        return AnomalyResult(
            score=float(amap.max()),
            anomaly_map=amap,
            method=self.method,
            model=self.model_name,
            weights=self.weights_tag,
            prompt_digest=digest,
            used_references=False,
            random_weights=self.random_weights,
            timings=timings,
            details=details,
        )

    @torch.no_grad()
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Score ``HWC uint8 RGB`` images of one product, one after the other.

        SAA+ work is per image (its own boxes, masks and saliency); a batch gives no
        shared pass, so images are processed in turn.
        """
        self.check_references(references)
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        prompts = self.prompt_set(object_name, product)
        digest = prompts.digest()
        results = []
        for img in images:
            results.append(self._predict_one(img, prompts, digest))
            self.count("images_scored")
        return results


__all__ = ["BoxCandidate", "Proposals", "SaaPlusDetector", "SaaSettings"]
