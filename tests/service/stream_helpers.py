"""Helpers of the stream tests: detectors with planted scores, stream product bodies, images."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import models
from models.base import AnomalyResult
from service.app import storage_options
from service.settings import Settings

RAW = {"content-type": "image/png"}
#: Planted scores: a defect (magenta top-left pixel) scores high, everything else low.
NORMAL_SCORE = 0.1
DEFECT_SCORE = 0.9


def part(seed: int, *, defect: bool = False, h: int = 40, w: int = 48) -> np.ndarray:
    """A distinct image per seed; ``defect`` marks it with a magenta top-left pixel."""
    img = np.random.default_rng(seed).integers(0, 200, (h, w, 3), dtype=np.uint8)
    if defect:
        img[0, 0] = (255, 0, 255)
    return img


def is_defect(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[0, 0], np.array([255, 0, 255], dtype=image.dtype)))


def _plant(res: AnomalyResult, image: np.ndarray) -> AnomalyResult:
    score = DEFECT_SCORE if is_defect(image) else NORMAL_SCORE
    return dataclasses.replace(res, score=score, details={**res.details, "planted": True})


def planted(det: Any) -> Any:
    """``det`` with planted scores (the rest is the real detector: maps, features, bank entries)."""
    base = type(det)

    class Planted(base):  # type: ignore[misc, valid-type]
        def predict_batch(self, images: Any, **kw: Any) -> list[AnomalyResult]:
            out = super().predict_batch(images, **kw)
            return [_plant(r, img) for r, img in zip(out, images, strict=True)]

        def predict_stream(self, image: np.ndarray, *, bank: Any) -> Any:
            pred = super().predict_stream(image, bank=bank)
            return dataclasses.replace(pred, result=_plant(pred.result, image))

    det.__class__ = Planted
    return det


def planted_factory(method: str, *, settings: Settings, device: str, cache: Any) -> models.Detector:
    """The real tiny detectors, scores planted (a defect scores 0.9, a good part 0.1)."""
    return planted(models.load_tiny_detector(method, device="cpu", cache=cache, **storage_options(method)))


def stream_product(**stream: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"object_name": "gear", "default_method": "musc", "threshold": 0.5}
    body["stream"] = {"bank": 5, "min_bank": 3, "guard_window": 0, **stream}
    return body
