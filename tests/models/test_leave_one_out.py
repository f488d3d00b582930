"""Leave-one-out scoring of golden images (for threshold calibration): no image is scored against itself.

Given K golden images, when each is scored leave-one-out, then result i equals scoring image i
against references encoded from the other K - 1 images, and differs from scoring it against a set
that holds itself. WinCLIP+'s fast path (each image encoded once) gives the generic path's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

import models
from models.base import AnomalyResult, Detector, ReferenceSet, image_hash, leave_one_out_indices
from prompts import ProductRecipe, get_builtin_product


@pytest.fixture(scope="module")
def det() -> models.Detector:
    torch.manual_seed(7)
    return models.load_tiny_detector("winclip")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(48, 64), (64, 48), (40, 40), (56, 72)]
    return [rng.integers(0, 256, (*shapes[i % 4], 3), dtype=np.uint8) for i in range(n)]


def test_winclip_fast_path_equals_the_generic_path(det) -> None:
    """Given 5 golden images of different sizes, when WinCLIP+ scores them leave-one-out with its fast
    path (each image encoded once), then scores and maps equal the generic path (references encoded
    from the others, then predict) within 1e-5, and it encodes K images instead of K (K - 1)."""
    images = _images(5, seed=1)
    product = get_builtin_product("bottle")
    before = det.counters().get("references_encoded", 0)
    fast = det.leave_one_out(images, product=product)
    fast_encoded = det.counters().get("references_encoded", 0) - before
    generic = Detector.leave_one_out(det, images, product=product)
    generic_encoded = det.counters().get("references_encoded", 0) - before - fast_encoded
    assert fast_encoded == 5 and generic_encoded == 5 * 4
    assert len(fast) == len(generic) == 5
    for f, g, img in zip(fast, generic, images, strict=True):
        assert abs(f.score - g.score) <= 1e-5, (f.score, g.score)
        assert f.anomaly_map.shape == img.shape[:2] == g.anomaly_map.shape
        assert float(np.abs(f.anomaly_map - g.anomaly_map).max()) <= 1e-5
        assert f.used_references and g.used_references
        assert f.details["reference_count"] == g.details["reference_count"] == 4
        assert f.details["leave_one_out"] is True
        assert f.prompt_digest == g.prompt_digest == det.prompt_digest(product=product)


def test_each_image_is_scored_against_the_others_only(det) -> None:
    """Given golden images, when scored leave-one-out, then result i is predict(image i, references of
    the others), and NOT the score against the full set (which holds image i itself: its patches find
    themselves in the memory, so its few-shot part is ~0 and it looks more normal than it is)."""
    images = _images(4, seed=2)
    loo = det.leave_one_out(images)
    full = det.encode_references(images)
    for i, img in enumerate(images):
        others = det.encode_references([im for j, im in enumerate(images) if j != i])
        want = det.predict(img, references=others)
        assert abs(loo[i].score - want.score) <= 1e-5
        against_all = det.predict(img, references=full)
        assert against_all.score < loo[i].score - 1e-3, (i, against_all.score, loo[i].score)


def test_pixel_identical_copies_are_left_out_too(det) -> None:
    """Given a golden set holding the same image twice, when scored leave-one-out, then neither copy is
    scored against the other (it would be scored against itself)."""
    a, b, c = _images(3, seed=3)
    loo = det.leave_one_out([a, a.copy(), b, c])
    want = det.predict(a, references=det.encode_references([b, c]))
    assert abs(loo[0].score - want.score) <= 1e-5 and abs(loo[1].score - want.score) <= 1e-5
    assert loo[0].details["reference_count"] == 2 and loo[2].details["reference_count"] == 3
    assert leave_one_out_indices([a, a.copy(), b]) == [[2], [2], [0, 1]]


def test_too_few_distinct_images_is_a_clear_error(det) -> None:
    a, b = _images(2, seed=4)
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        det.leave_one_out([a])
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        det.leave_one_out([a, a.copy()])
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        Detector.leave_one_out(det, [b])
    assert det.leave_one_out([]) == []


class MeanColourDetector(Detector):
    """A toy few-shot method (like AnomalyDINO / MuSc: references, no override of leave_one_out):
    the score is the distance of the image's mean colour to the nearest reference's."""

    method = "toy"
    supports_references = True
    model_name = "toy"
    weights_tag = "none"
    device = "cpu"
    random_weights = True

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        return "none"

    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        means = np.stack([im.reshape(-1, 3).mean(axis=0) / 255.0 for im in images]).astype(np.float32)
        return ReferenceSet(self.method, self.model_key, tuple(image_hash(im) for im in images), {"m": means})

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        out = []
        for im in images:
            m = im.reshape(-1, 3).mean(axis=0) / 255.0
            score = 0.0
            if references is not None:
                score = float(np.abs(references.arrays["m"] - m).sum(axis=1).min()) / 3.0
            amap = np.full(im.shape[:2], score, np.float32)
            out.append(AnomalyResult(score, amap, self.method, "toy", "none", "none", references is not None))
        return out


def test_generic_default_works_for_a_method_without_its_own_path() -> None:
    """Given a reference method with no leave_one_out of its own, when its golden images are scored
    leave-one-out, then image i's score is its distance to the nearest OTHER image (never 0, which it
    would be against itself)."""
    toy = MeanColourDetector()
    levels = [10, 40, 45, 200]
    images = [np.full((8, 8, 3), v, np.uint8) for v in levels]
    got = [r.score for r in toy.leave_one_out(images)]
    means = np.array(levels) / 255.0
    want = [min(abs(means[i] - means[j]) for j in range(4) if j != i) for i in range(4)]
    assert got == pytest.approx(want, abs=1e-6)
    assert all(s > 0 for s in got)


def test_a_method_without_references_scores_the_images_as_they_are() -> None:
    """Zero-shot methods have nothing to leave out: leave_one_out is predict_batch."""

    class ZeroShot(MeanColourDetector):
        supports_references = False

    images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 40)]
    det = ZeroShot()
    assert [r.score for r in det.leave_one_out(images)] == [r.score for r in det.predict_batch(images)]
    assert [r.used_references for r in det.leave_one_out([images[0]])] == [False]
