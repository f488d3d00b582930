"""MuSc on a line stream with PLANTED features: the mutual-scoring logic, not random weights.

The backbone is a stub whose patch tokens are a fixed function of each 8x8 pixel patch
(mean colour and texture through fixed projections), so what each image's tokens look
like is decided by the test. Everything after the backbone is the real detector:
LayerNorm, LNAMD, MSM, the bank and its helpers.

The "product" is one textured part, seen each time with camera noise and a random shift
of up to two patches (so that matching patches are NOT at the same grid position: the
nearest-patch search has to find them). The defect is a small blob of a colour the part
never has.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.musc import MuscConfig, MuscDetector, bank_append
from models.musc.torch_model import BackboneTokens

SIZE = 64
PATCH = 8
MIN_BANK = 8
MAX_BANK = 32


class PlantedEncoder(nn.Module):
    """Tokens of each 8x8 patch: fixed random projections of its pixel statistics."""

    feature_layers = (1, 2)
    patch_size = PATCH
    token_dim = 24
    embedding_dim = 6

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = [torch.randn(12, self.token_dim, generator=g) for _ in self.feature_layers]

    def forward(self, pixels: torch.Tensor) -> BackboneTokens:
        b = pixels.shape[0]
        mean = F.avg_pool2d(pixels, PATCH)  # [B, 3, g, g]
        sq = F.avg_pool2d(pixels * pixels, PATCH)  # [B, 3, g, g]
        dx = F.avg_pool2d(F.pad((pixels[..., 1:] - pixels[..., :-1]).abs(), (0, 1)), PATCH)  # [B, 3, g, g]
        dy = F.avg_pool2d(F.pad((pixels[..., 1:, :] - pixels[..., :-1, :]).abs(), (0, 0, 0, 1)), PATCH)
        stats = torch.cat([mean, sq, dx, dy], dim=1)  # [B, 12, g, g]
        grid = (int(stats.shape[-2]), int(stats.shape[-1]))
        flat = stats.flatten(2).transpose(1, 2)  # [B, L, 12]
        tokens = tuple(torch.tanh(flat @ p) for p in self.proj)  # [B, L, C]
        emb = torch.cat([mean.mean(dim=(2, 3)), sq.mean(dim=(2, 3))], dim=1)  # [B, 6]
        return BackboneTokens(patch_tokens=tokens, image_embedding=emb.reshape(b, -1), grid=grid)


def make_detector() -> MuscDetector:
    return MuscDetector(
        encoder=PlantedEncoder(),
        model_name="planted-stub",
        weights_tag="planted",
        random_weights=True,
        config=MuscConfig(image_size=SIZE),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


OBJECT = 32  # the part: 4 x 4 patches on a plain background
BACKGROUND = (120, 120, 120)
DEFECT = (250, 0, 250)  # a colour the part never has


def part_texture() -> np.ndarray:
    """The part's look: the same every time (fixed seed)."""
    rng = np.random.default_rng(1234)
    cells = rng.integers(30, 220, (OBJECT // PATCH, OBJECT // PATCH, 3))
    tex = np.kron(cells, np.ones((PATCH, PATCH, 1)))  # piecewise-constant patches
    return tex + 25 * np.sin(np.arange(OBJECT) / 1.5)[None, :, None]  # fine stripes


def product(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """One camera image of the part: placed with a random offset of up to one patch, noise.

    Returns the image and the part's top-left corner.
    """
    img = np.empty((SIZE, SIZE, 3))
    img[:] = BACKGROUND
    oy, ox = (int(v) for v in 16 + rng.integers(-1, 2, 2) * PATCH)
    img[oy : oy + OBJECT, ox : ox + OBJECT] = part_texture()
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), (oy, ox)


def with_defect(img: np.ndarray, origin: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    """A defect filling patch ``cell`` (row, col) of the part."""
    out = img.copy()
    y, x = origin[0] + cell[0] * PATCH, origin[1] + cell[1] * PATCH
    out[y : y + PATCH, x : x + PATCH] = DEFECT
    return out


def run_stream(det: MuscDetector, images: list[np.ndarray]) -> tuple[list[float | None], object]:
    """Service-like loop: score against the bank once it holds MIN_BANK images; accept all."""
    bank = None
    scores: list[float | None] = []
    for img in images:
        if bank is not None and bank.count >= MIN_BANK:
            pred = det.predict_stream(img, bank=bank)
            scores.append(pred.result.score)
            entry = pred.entry
        else:
            scores.append(None)  # warming up
            entry = det.encode_references([img])
        bank = bank_append(bank, entry, max_images=MAX_BANK)
        assert bank.count <= MAX_BANK
    return scores, bank


def test_forty_good_parts_then_a_defect_the_defect_ranks_above_every_good_one() -> None:
    det = make_detector()
    rng = np.random.default_rng(5)
    good = [product(rng)[0] for _ in range(40)]
    defect = with_defect(*product(rng), cell=(1, 2))
    scores, bank = run_stream(det, good)
    good_scores = [s for s in scores if s is not None]
    assert len(good_scores) == 40 - MIN_BANK
    res = det.predict(defect, references=bank)
    assert res.details["mode"] == "stream" and res.details["n_others"] == MAX_BANK
    assert res.score > max(good_scores)
    # by a clear margin, not by a hair
    assert res.score - max(good_scores) > 0.5 * (max(good_scores) - min(good_scores))
    # the map points at the blob
    y, x = np.unravel_index(int(np.argmax(res.anomaly_map)), res.anomaly_map.shape)
    blob = np.all(defect == DEFECT, axis=-1)
    ys, xs = np.nonzero(blob)
    assert ys.min() - PATCH <= y <= ys.max() + PATCH and xs.min() - PATCH <= x <= xs.max() + PATCH


def test_the_same_stream_in_batch_mode_ranks_the_defect_first() -> None:
    det = make_detector()
    rng = np.random.default_rng(5)
    images = [product(rng)[0] for _ in range(40)]
    images.append(with_defect(*product(rng), cell=(2, 1)))
    res = det.predict_batch(images)
    raw = [r.details["raw_score"] for r in res]
    assert int(np.argmax(raw)) == 40
    rs = [r.score for r in res]
    assert int(np.argmax(rs)) == 40  # RsCIN keeps it first


def test_a_defect_that_fills_the_msm_interval_of_the_bank_is_masked_poisoning() -> None:
    """docs/musc.md: a recurring defect is hidden once about int(0.3 * bank) bank images have it.

    With a bank of 32 the patch score averages the distances to the 9 nearest images: the
    same defect in 1 bank image barely lowers the score; in 9 it looks normal.
    """
    det = make_detector()
    rng = np.random.default_rng(11)
    good = [product(rng) for _ in range(MAX_BANK)]
    cell = (1, 1)
    query = with_defect(*product(rng), cell=cell)
    normal_query = product(rng)[0]

    def score_with(n_poisoned: int) -> float:
        poisoned = [with_defect(img, origin, cell) for img, origin in good[:n_poisoned]]
        bank = det.encode_references(poisoned + [img for img, _ in good[n_poisoned:]])
        return det.predict(query, references=bank).score

    clean_bank = det.encode_references([img for img, _ in good])
    normal = det.predict(normal_query, references=clean_bank).score
    clean = score_with(0)
    one = score_with(1)
    nine = score_with(9)
    assert clean > normal
    assert one > normal + 0.5 * (clean - normal)  # one poisoned bank image: still flagged
    assert nine < normal + 0.25 * (clean - normal)  # int(0.3 * 32) = 9 poisoned: masked


@pytest.mark.parametrize("n", [MIN_BANK, MAX_BANK])
def test_stream_result_equals_predict_with_references(n: int) -> None:
    det = make_detector()
    rng = np.random.default_rng(2)
    bank = det.encode_references([product(rng)[0] for _ in range(n)])
    img = product(rng)[0]
    a = det.predict_stream(img, bank=bank)
    b = det.predict(img, references=bank)
    assert a.result.score == pytest.approx(b.score, abs=1e-7)
    np.testing.assert_array_equal(a.result.anomaly_map, b.anomaly_map)
    fresh = det.encode_references([img])
    np.testing.assert_array_equal(a.entry.arrays["tokens"], fresh.arrays["tokens"])
    assert a.entry.image_hashes == fresh.image_hashes
