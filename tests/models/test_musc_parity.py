"""MuSc against a straightforward re-implementation of the official code (tests/models/musc_reference.py).

Tiny random ViTs of both backbone kinds: open_clip (GELU, 4 blocks, 8x8 grid at 112 px,
positional embedding resized from 4x4 as the official code does at 518 from 24x24) and
timm DINOv2 (2 blocks, 7x7 trained grid resized to 8x8 as the torch-hub DINOv2 does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import models
from models.musc import MuscDetector
from models.musc.torch_model import rscin
from tests.models.musc_reference import ref_musc, ref_rscin

N = 8  # 7 other images: MSM interval = lowest int(7 * 0.3) = 2 per-image distances
SIZE = 112


BACKBONES = {"clip": "tiny-musc-clip-test", "dinov2": "tiny-musc-dinov2-test"}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def det(kind: str) -> MuscDetector:
    d = models.load_tiny_detector("musc", backbone=BACKBONES[kind], bank_dtype="float32")
    assert isinstance(d, MuscDetector)
    if kind == "dinov2":
        # DINOv2 initialises LayerScale at 1e-5: random blocks would barely change the
        # tokens and every class token would be the same. Give the blocks a say.
        enc: Any = d.encoder
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for block in enc.model.blocks:
                for ls in (block.ls1, block.ls2):
                    ls.gamma.copy_(torch.rand(ls.gamma.shape, generator=g) + 0.5)
    return d


def same_model(det: MuscDetector, bank_dtype: str) -> MuscDetector:
    return MuscDetector(
        encoder=det.encoder,
        model_name=det.model_name,
        weights_tag=det.weights_tag,
        random_weights=True,
        config=det.config,
        mean=det.mean,
        std=det.std,
        interpolation=det.interpolation,
        bank_dtype=bank_dtype,
    )


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (SIZE, SIZE, 3))
    # a shared "product" plus per-image noise, so that images resemble each other
    return [np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(N)]


@pytest.fixture(scope="module")
def reference(
    kind: str, det: MuscDetector, images: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    enc: Any = det.encoder
    return ref_musc(
        enc.visual if kind == "clip" else enc.model,
        images,
        kind=kind,
        out_layers=list(det.feature_layers),
        r_list=[1, 3, 5],
        image_size=SIZE,
        k_list=[1, 2, 3],
    )


def test_batch_mode_maps_and_scores_match_the_official_definitions(
    det: MuscDetector, images: list[np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    ref_maps, ref_scores, ref_rs = reference
    normed, emb = det.features(images)
    out = det.score_features(normed, emb)
    assert out.n_others == N - 1
    np.testing.assert_allclose(out.maps.numpy(), ref_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.image_scores.numpy(), ref_scores, rtol=0, atol=1e-5)
    assert out.rscin_scores is not None
    np.testing.assert_allclose(out.rscin_scores.numpy(), ref_rs, rtol=0, atol=1e-5)
    # the scores are not all alike: the comparison has something to compare
    assert np.ptp(ref_scores) > 1e-3 and np.ptp(ref_rs) > 0.1

    results = det.predict_batch(images)
    for i, r in enumerate(results):
        assert r.details["score_kind"] == "rscin"
        assert r.score == pytest.approx(float(ref_rs[i]), abs=1e-5)
        assert r.details["raw_score"] == pytest.approx(float(ref_scores[i]), abs=1e-5)
        # the result map is the official map halved (distances in [0, 2] -> [0, 1])
        np.testing.assert_allclose(r.anomaly_map, ref_maps[i] / 2, rtol=0, atol=1e-5)


def test_stream_with_bank_of_b_equals_batch_of_b_plus_1_for_the_last_image_before_rscin(
    det: MuscDetector, images: list[np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """Stated in docs/musc.md: map and pre-RsCIN score are equal; only RsCIN differs."""
    ref_maps, ref_scores, ref_rs = reference
    bank = det.encode_references(images[:-1])  # float32 bank: exact comparison
    res = det.predict(images[-1], references=bank)
    assert res.details["mode"] == "stream" and res.details["n_others"] == N - 1
    np.testing.assert_allclose(res.anomaly_map, ref_maps[-1] / 2, rtol=0, atol=1e-5)
    assert res.details["raw_score"] == pytest.approx(float(ref_scores[-1]), abs=1e-5)
    assert res.score == pytest.approx(float(ref_scores[-1]) / 2, abs=1e-5)
    # batch mode without RsCIN gives exactly the stream answer for the last image
    plain = det.predict_batch(images, rscin=False)[-1]
    assert plain.score == pytest.approx(res.score, abs=1e-6)
    # with RsCIN the batch score is RsCIN of the batch's pre-RsCIN scores: that is the
    # whole difference, and it is a real one here
    batch = det.predict_batch(images)[-1]
    assert batch.score == pytest.approx(float(ref_rs[-1]), abs=1e-5)
    assert abs(batch.score - res.score) > 1e-3


def test_stream_with_a_float16_bank_is_close_to_the_float32_answer(
    det: MuscDetector, images: list[np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    ref_maps, ref_scores, _ = reference
    d16 = same_model(det, "float16")
    bank = d16.encode_references(images[:-1])
    assert bank.arrays["tokens"].dtype == np.float16
    res = d16.predict(images[-1], references=bank)
    np.testing.assert_allclose(res.anomaly_map, ref_maps[-1] / 2, rtol=0, atol=2e-3)
    assert res.details["raw_score"] == pytest.approx(float(ref_scores[-1]), abs=4e-3)


def test_batch_with_bank_equals_the_batch_of_bank_plus_images(
    det: MuscDetector, images: list[np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """predict_batch(images, references=bank): each image against bank + the other images."""
    ref_maps, ref_scores, _ = reference
    bank = det.encode_references(images[:5])
    res = det.predict_batch(images[5:], references=bank)
    for i, r in enumerate(res):
        assert r.details["mode"] == "batch+bank" and r.details["n_others"] == N - 1
        np.testing.assert_allclose(r.anomaly_map, ref_maps[5 + i] / 2, rtol=0, atol=1e-5)
        assert r.details["raw_score"] == pytest.approx(float(ref_scores[5 + i]), abs=1e-5)
        assert r.details["score_kind"] == "msm"


def test_rscin_function_matches_the_official_mmo_on_its_own() -> None:
    import torch

    rng = np.random.default_rng(3)
    scores = rng.uniform(0.2, 1.3, 12)
    emb = rng.normal(size=(12, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for k_list in ([1, 2, 3], [1, 8, 9], [12]):
        ours = rscin(torch.tensor(scores), torch.tensor(emb), k_list).numpy()
        np.testing.assert_allclose(ours, ref_rscin(scores, emb, k_list), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- camera sizes
#: (height, width): 4:3 line-camera frames and odd portrait ones, mixed in one batch
CAMERA_SIZES = [(480, 640), (517, 333)]


@pytest.fixture(scope="module")
def camera_images() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(N):
        h, w = CAMERA_SIZES[i % 2]
        yy, xx = np.mgrid[0:h, 0:w]
        base = 110 + 60 * np.sin(xx / 19.0)[..., None] + 40 * np.cos(yy / 13.0)[..., None]
        img = base + rng.normal(0, 30, (h, w, 3))
        img[h // 3 : h // 3 + 40 + 10 * i, w // 4 : w // 2] = 245  # a bright part; edges resize differently
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_pixels_equal_the_official_transforms_at_camera_sizes(
    kind: str, det: MuscDetector, camera_images: list[np.ndarray]
) -> None:
    """PIL resize of the uint8 image (bicubic for CLIP, bilinear for DINOv2), PIL's rounding."""
    from tests.models.musc_reference import official_pixels

    got = det.pixels(camera_images)
    want = official_pixels(camera_images, kind, SIZE)
    assert got.shape == want.shape == (N, 3, SIZE, SIZE)
    assert torch.equal(got, want)


def test_batch_mode_at_camera_sizes_matches_the_official_code(
    kind: str, det: MuscDetector, camera_images: list[np.ndarray]
) -> None:
    enc: Any = det.encoder
    ref_maps, ref_scores, ref_rs = ref_musc(
        enc.visual if kind == "clip" else enc.model,
        camera_images,
        kind=kind,
        out_layers=list(det.feature_layers),
        r_list=[1, 3, 5],
        image_size=SIZE,
        k_list=[1, 2, 3],
    )
    normed, emb = det.features(camera_images)
    out = det.score_features(normed, emb)
    np.testing.assert_allclose(out.maps.numpy(), ref_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.image_scores.numpy(), ref_scores, rtol=0, atol=1e-5)
    assert out.rscin_scores is not None
    np.testing.assert_allclose(out.rscin_scores.numpy(), ref_rs, rtol=0, atol=1e-5)
    for i, r in enumerate(det.predict_batch(camera_images)):
        assert r.anomaly_map.shape == camera_images[i].shape[:2]
        assert r.score == pytest.approx(float(ref_rs[i]), abs=1e-5)
        assert r.details["raw_score"] == pytest.approx(float(ref_scores[i]), abs=1e-5)
