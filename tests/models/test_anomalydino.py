"""AnomalyDINO: parity with a straightforward computation, batching, banks, options, loading."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models import (
    RANDOM_INIT,
    ReferenceMismatchError,
    ReferenceSet,
    ReferencesRequiredError,
    WeightsError,
    load_detector,
    load_detector_from_dir,
    load_tiny_detector,
    method_spec,
)
from models.anomalydino.detector import DEFAULT_IMAGE_SIZE, AnomalyDinoDetector
from models.anomalydino.torch_model import (
    CropBox,
    background_masks,
    johnson_lindenstrauss_dim,
    kcenter_greedy,
    mean_top_fraction,
    nearest_distances,
    sparse_random_projection,
)
from models.dinov2 import patch_tokens, preprocess
from models.weights import weights_path
from prompts import METHODS
from tests.models import anomalydino_reference as ref

TOL = 1e-5


def texture(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def perturbed(img: np.ndarray, seed: int, amount: int = 40) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def object_on_background(seed: int, h: int = 224, w: int = 224) -> np.ndarray:
    """A textured bright object on a dark plain background (so PCA masking has something to find)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 20, np.uint8)
    y, x = rng.integers(h // 8, h // 3), rng.integers(w // 8, w // 3)
    img[y : y + h // 2, x : x + w // 2] = rng.integers(150, 256, (h // 2, w // 2, 3))
    return img


def assert_matches_reference(det, golden, tests, *, k: int = 1, masking: bool = False) -> None:
    refs = det.encode_references(golden)
    vit = det.backbone.model
    bank = ref.encode(vit, golden, det.image_size, masking=masking)
    torch.testing.assert_close(torch.tensor(np.asarray(refs.arrays["bank"])), bank, rtol=0, atol=TOL)
    expected = ref.predict(vit, bank, tests, det.image_size, k=k, masking=masking)
    got = det.predict_batch(tests, references=refs)
    for r, (raw, emap) in zip(got, expected, strict=True):
        assert abs(r.details["raw_score"] - raw) <= TOL
        assert abs(r.score - raw / 2) <= TOL
        assert r.anomaly_map.shape == emap.shape
        assert float(np.abs(r.anomaly_map - emap).max()) <= TOL


# ----------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def tiny():
    return load_tiny_detector("anomalydino", image_size=(60, 75))  # centre-cropped to 56x70


def test_tiny_parity_with_the_straightforward_computation(tiny) -> None:
    golden = [texture(1, 90, 120), texture(2, 64, 64)]
    tests = [perturbed(golden[0], 3), texture(4, 50, 40), perturbed(golden[1], 5, 90)]
    assert_matches_reference(tiny, golden, tests)


def test_tiny_parity_at_camera_sizes(tiny) -> None:
    # a 4:3 line-camera frame and an odd portrait size, as golden and as inspected images
    golden = [texture(40, 480, 640), texture(41, 517, 333)]
    tests = [perturbed(golden[0], 42), perturbed(golden[1], 43, 90), texture(44, 480, 640)]
    assert_matches_reference(tiny, golden, tests)


def test_tiny_parity_with_three_neighbours() -> None:
    det = load_tiny_detector("anomalydino", image_size=56, num_neighbours=3)
    golden = [texture(1, 70, 70)]
    assert_matches_reference(det, golden, [perturbed(golden[0], 2), texture(3, 80, 60)], k=3)


@pytest.fixture(scope="module")
def tiny_short56():
    """An int image_size: the shorter side becomes 56, the aspect ratio is kept (anomalib, torchvision)."""
    return load_tiny_detector("anomalydino", image_size=56)


def test_int_image_size_resizes_the_shorter_side_as_torchvision(tiny_short56) -> None:
    # torchvision Resize(56): 480x640 -> 56x74 (74.67 truncated), 517x333 -> 86x56, squares stay square
    for (h, w), expected in {(480, 640): (56, 74), (517, 333): (86, 56), (90, 90): (56, 56)}.items():
        assert tiny_short56.input_size(h, w) == expected
        assert tuple(ref.pixels([texture(0, h, w)], 56).shape[-2:]) == expected
    assert tiny_short56.input_size(480, 640) == AnomalyDinoDetector(
        backbone=tiny_short56.backbone, image_size=(56, 74)
    ).input_size(480, 640)


def test_tiny_parity_with_int_image_size_on_non_square_images(tiny_short56) -> None:
    # each image keeps its aspect: 640x480 and 333x517 frames get different model inputs
    golden = [texture(50, 480, 640), texture(51, 517, 333)]
    tests = [
        perturbed(golden[0], 52),
        perturbed(golden[1], 53, 90),
        texture(54, 640, 480),
        texture(55, 60, 90),
    ]
    assert_matches_reference(tiny_short56, golden, tests)
    res = tiny_short56.predict(tests[1], references=tiny_short56.encode_references(golden))
    assert res.details["image_size"] == 56 and res.details["input_size"] == [86, 56]
    # bank: 4x5 patches of the 56x74 input (crop 56x70) + 6x4 of the 86x56 one (crop 84x56)
    assert tiny_short56.encode_references(golden).arrays["bank"].shape[0] == 4 * 5 + 6 * 4


def test_tiny_parity_with_int_image_size_and_masking() -> None:
    det = load_tiny_detector("anomalydino", image_size=112, masking=True)
    golden = [object_on_background(60, 150, 200), object_on_background(61, 210, 140)]
    tests = [perturbed(object_on_background(62, 150, 200), 63), object_on_background(64, 210, 140)]
    assert_matches_reference(det, golden, tests, masking=True)


@pytest.fixture(scope="module")
def vit_s14():
    """The real ViT-S/14 architecture on (seeded) random weights, built once for the slow tests."""
    from models.dinov2 import create_dinov2

    return create_dinov2("vit_small_patch14_dinov2", RANDOM_INIT)


@pytest.mark.slow
def test_vit_s14_random_init_parity_at_224(vit_s14) -> None:
    """The real ViT-S/14 architecture (random init) at 224 px, and 230x250 (centre crop) with k=3."""
    det = AnomalyDinoDetector(backbone=vit_s14, image_size=224)
    golden = [texture(10, 300, 280), texture(11, 256, 256)]
    tests = [perturbed(golden[0], 12), perturbed(golden[1], 13, 80)]
    assert_matches_reference(det, golden, tests)
    det = AnomalyDinoDetector(backbone=vit_s14, image_size=(230, 250), num_neighbours=3)
    assert_matches_reference(det, golden[:1], tests[:1], k=3)


@pytest.mark.slow
def test_vit_s14_random_init_parity_with_int_image_size(vit_s14) -> None:
    """The real ViT-S/14 (random init), shorter side 224 on a 640x480 and a 333x517 frame."""
    det = AnomalyDinoDetector(backbone=vit_s14, image_size=224)
    assert det.input_size(480, 640) == (224, 298) and det.input_size(517, 333) == (347, 224)
    golden = [texture(70, 480, 640), texture(71, 517, 333)]
    tests = [perturbed(golden[0], 72), perturbed(golden[1], 73, 80), texture(74, 640, 480)]
    assert_matches_reference(det, golden, tests)


@pytest.mark.slow
def test_vit_s14_random_init_parity_with_masking(vit_s14) -> None:
    det = AnomalyDinoDetector(backbone=vit_s14, image_size=224, masking=True)
    golden = [object_on_background(20), object_on_background(21)]
    tests = [perturbed(object_on_background(22), 23), object_on_background(24)]
    refs = det.encode_references(golden)
    # the masking really removed background patches (else this test would not test it)
    assert 0 < refs.arrays["bank"].shape[0] < 2 * 16 * 16
    assert_matches_reference(det, golden, tests, masking=True)


# ----------------------------------------------------------------------------- pure maths
def test_crop_box_centres_the_crop() -> None:
    box = CropBox.for_size(60, 75, 14)
    assert box.cropped == (56, 70) and box.grid == (4, 5)
    assert (box.top, box.bottom, box.left, box.right) == (2, 2, 2, 3)
    assert CropBox.for_size(56, 70, 14).is_identity


def test_nearest_distances_by_hand_and_chunking() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    torch.testing.assert_close(nearest_distances(q, bank), torch.tensor([0.0, 1.0, 0.2]))
    torch.testing.assert_close(nearest_distances(q, bank, k=2), torch.tensor([0.5, 1.5, 0.3]))
    big_q = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    big_b = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    # chunks change only the GEMM blocking: equal to float rounding
    torch.testing.assert_close(
        nearest_distances(big_q, big_b, chunk_elements=7), nearest_distances(big_q, big_b), rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="empty"):
        nearest_distances(q, torch.zeros(0, 2))


def test_mean_top_one_percent() -> None:
    d = torch.arange(1000, dtype=torch.float32)[None]
    assert float(mean_top_fraction(d)[0]) == pytest.approx((999 + 990) / 2)  # top 10
    assert float(mean_top_fraction(torch.tensor([[0.1, 0.7, 0.3]]))[0]) == pytest.approx(0.7)  # at least 1


def test_background_masks_match_the_straightforward_version(tiny) -> None:
    imgs = [object_on_background(s, 112, 112) for s in range(3)]
    feats = patch_tokens(tiny.backbone.model, preprocess(imgs, (112, 112))).float()
    for threshold in (10.0, 2.0, 0.5):
        mine = background_masks(feats, (8, 8), threshold=threshold).numpy()
        expected = ref.masks(feats, (8, 8), threshold=threshold)
        np.testing.assert_array_equal(mine, expected)
    assert 0 < ref.masks(feats, (8, 8), threshold=2.0).mean() < 1  # the case is not trivial


def test_background_masks_match_opencv_morphology_when_available() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    # features with a strong planted direction: first PC scores are +-15 on a random 0/1 pattern
    pattern = rng.random((9, 11)) < 0.3
    direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
    feats = (
        torch.randn(99, 16) * 0.1
        + torch.from_numpy(np.where(pattern.ravel(), 15.0, -15.0)).float()[:, None] * direction
    )
    got = background_masks(feats[None], (9, 11)).numpy()[0].reshape(9, 11)
    pc = ref.pca_first_component(feats.numpy())
    m = (pc > 10).reshape(9, 11)
    c = m[1:7, 2:8]
    if c.sum() <= c.size * 0.35:
        m = (-pc > 10).reshape(9, 11)
    kernel = np.ones((3, 3), np.uint8)
    m = cv2.dilate(m.astype(np.uint8), kernel)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel).astype(bool)
    np.testing.assert_array_equal(got, m)


def test_kcenter_greedy_matches_a_brute_force_version() -> None:
    x = torch.randn(200, 6)
    got = kcenter_greedy(x, 0.1, project=False, seed=3)
    # brute force: same first point, then farthest-from-the-chosen by a full distance matrix
    first = int(torch.randint(200, (1,), generator=torch.Generator().manual_seed(3)).item())
    dist = torch.cdist(x, x)
    chosen = [first]
    for _ in range(19):
        chosen.append(int(dist[:, chosen].min(dim=1).values.argmax()))
    assert got.tolist() == chosen
    assert len(set(got.tolist())) == 20


def test_sparse_random_projection_statistics() -> None:
    d, c = 400, johnson_lindenstrauss_dim(5000)
    assert c == int(4 * np.log(5000) / (0.9**2 / 2 - 0.9**3 / 3))
    p = sparse_random_projection(d, c, torch.Generator().manual_seed(0))
    density = 1 / np.sqrt(d)
    nz = p[p != 0]
    assert abs((p != 0).float().mean().item() - density) < 0.01
    assert torch.allclose(nz.abs(), torch.full_like(nz, np.sqrt(1 / density) / np.sqrt(c)))
    assert abs((nz > 0).float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize(("h", "w"), [(480, 640), (517, 333), (252, 252)])
def test_pixels_are_bit_equal_to_anomalib(h: int, w: int) -> None:
    # anomalib reads x * (1 / 255) (torchvision to_dtype), not x / 255: they differ in the
    # last bit for about half the values; the resize and normalisation are anomalib's too
    img = texture(30, h, w)
    for size in [(252, 252), (60, 75), 252, 56]:  # an int: shorter side, as torchvision Resize(int)
        assert torch.equal(preprocess([img], size), ref.pixels([img], size))


# ----------------------------------------------------------------------------- detector
def test_batched_predict_equals_single_predicts_with_different_sizes(tiny) -> None:
    golden = [texture(1, 80, 80), texture(2, 100, 60)]
    refs = tiny.encode_references(golden)
    images = [perturbed(golden[0], 3), texture(4, 33, 47), texture(5, 200, 90), perturbed(golden[1], 6)]
    batched = tiny.predict_batch(images, references=refs)
    for img, b in zip(images, batched, strict=True):
        s = tiny.predict(img, references=refs)
        assert abs(s.score - b.score) <= 1e-6
        assert s.anomaly_map.shape == b.anomaly_map.shape == img.shape[:2]
        assert float(np.abs(s.anomaly_map - b.anomaly_map).max()) <= 1e-6
    # sub-batching of the backbone does not change results either
    one_by_one = load_tiny_detector("anomalydino", image_size=(60, 75), pass_batch=1)
    for r, b in zip(one_by_one.predict_batch(images, references=refs), batched, strict=True):
        assert abs(r.score - b.score) <= 1e-6


def test_batched_predict_equals_single_predicts_with_int_image_size(tiny_short56) -> None:
    """Mixed aspects give mixed model inputs: grouped by input size, results in input order."""
    det = tiny_short56
    golden = [texture(1, 480, 640), texture(2, 517, 333), texture(3, 80, 80)]
    refs = det.encode_references(golden)
    # 56x74 twice (480x640, 240x320), 86x56, 56x56, 74x56, and 56x74 again at the end
    images = [
        perturbed(golden[0], 4),
        texture(5, 517, 333),
        texture(6, 240, 320),
        texture(7, 60, 60),
        texture(8, 640, 480),
        perturbed(golden[0], 9, 90),
    ]
    sizes = [det.input_size(*img.shape[:2]) for img in images]
    assert sizes == [(56, 74), (86, 56), (56, 74), (56, 56), (74, 56), (56, 74)]
    batched = det.predict_batch(images, references=refs)
    for img, b, size in zip(images, batched, sizes, strict=True):
        s = det.predict(img, references=refs)
        assert abs(s.score - b.score) <= 1e-6 and s.details["raw_score"] == pytest.approx(
            b.details["raw_score"]
        )
        assert s.anomaly_map.shape == b.anomaly_map.shape == img.shape[:2]
        assert float(np.abs(s.anomaly_map - b.anomaly_map).max()) <= 1e-6
        assert b.details["input_size"] == list(size)
    # the banks of golden images encoded together and one by one are the same rows, in input order
    singles = np.concatenate([np.asarray(det.encode_references([g]).arrays["bank"]) for g in golden])
    np.testing.assert_allclose(np.asarray(refs.arrays["bank"]), singles, rtol=0, atol=1e-6)
    for pass_batch in (1, 2):
        other = AnomalyDinoDetector(backbone=det.backbone, image_size=56, pass_batch=pass_batch)
        assert other.encode_references(golden).model_key == refs.model_key
        np.testing.assert_allclose(
            np.asarray(other.encode_references(golden).arrays["bank"]), refs.arrays["bank"], rtol=0, atol=1e-6
        )
        for r, b in zip(other.predict_batch(images, references=refs), batched, strict=True):
            assert abs(r.score - b.score) <= 1e-6
            assert float(np.abs(r.anomaly_map - b.anomaly_map).max()) <= 1e-6


def test_result_fields_and_ranges(tiny) -> None:
    golden = texture(1, 80, 80)
    refs = tiny.encode_references([golden])
    assert refs.method == "anomalydino" and refs.count == 1
    res = tiny.predict(texture(9, 70, 90), object_name="bottle", references=refs)
    assert 0.0 <= res.score <= 1.0 and res.details["raw_score"] == pytest.approx(2 * res.score)
    assert res.anomaly_map.dtype == np.float32 and res.anomaly_map.shape == (70, 90)
    assert res.anomaly_map.min() >= 0.0 and res.anomaly_map.max() <= 1.0
    assert not res.anomaly_map.flags.writeable
    assert res.used_references and res.random_weights and res.method == "anomalydino"
    assert {"encode", "score", "resize"} <= set(res.timings)
    # a golden image is its own nearest neighbour: distance 0
    assert tiny.predict(golden, references=refs).score < 1e-5


def test_references_are_required(tiny) -> None:
    with pytest.raises(ReferencesRequiredError, match="golden images"):
        tiny.predict(texture(1, 60, 60))
    with pytest.raises(ValueError, match="at least one"):
        tiny.encode_references([])


def test_banks_of_another_size_or_setting_are_refused(tiny) -> None:
    refs = tiny.encode_references([texture(1, 60, 60)])
    for other in (
        load_tiny_detector("anomalydino", image_size=56),
        load_tiny_detector("anomalydino", image_size=(60, 75), masking=True),
        load_tiny_detector("anomalydino", image_size=(60, 75), coreset_subsampling=True),
    ):
        assert other.model_key != tiny.model_key
        with pytest.raises(ReferenceMismatchError):
            other.predict(texture(2, 60, 60), references=refs)
    # k does not shape the bank: the same references serve
    k3 = load_tiny_detector("anomalydino", image_size=(60, 75), num_neighbours=3)
    assert k3.model_key == tiny.model_key


def test_model_key_tells_a_shorter_side_from_an_exact_size() -> None:
    short = load_tiny_detector("anomalydino", image_size=56)
    exact = AnomalyDinoDetector(backbone=short.backbone, image_size=(56, 56))
    assert short.model_key.endswith("/short56") and exact.model_key.endswith("/56x56")
    # on a square image both give 56x56 inputs, but a bank made under one meaning is not reused
    # under the other (made before the int meant the shorter side, it would be a wrong bank)
    refs = exact.encode_references([texture(1, 64, 64)])
    with pytest.raises(ReferenceMismatchError):
        short.predict(texture(2, 64, 64), references=refs)
    assert short.describe()["image_size"] == 56 and exact.describe()["image_size"] == [56, 56]
    assert AnomalyDinoDetector(backbone=short.backbone, image_size=[56, 70]).image_size == (56, 70)
    assert AnomalyDinoDetector(backbone=short.backbone, image_size=np.int64(60)).image_size == 60


def test_default_image_size_is_anomalibs_square() -> None:
    assert DEFAULT_IMAGE_SIZE == (252, 252)
    det = AnomalyDinoDetector(backbone=load_tiny_detector("anomalydino").backbone)
    assert det.image_size == (252, 252) and det.model_key.endswith("/252x252")
    assert det.input_size(480, 640) == (252, 252)  # exact: no aspect keep, as anomalib's default


def test_reference_blob_round_trip_gives_identical_results(tiny) -> None:
    refs = tiny.encode_references([texture(1, 60, 60), texture(2, 80, 50)])
    again = ReferenceSet.from_bytes(refs.to_bytes())
    img = texture(3, 64, 64)
    a, b = tiny.predict(img, references=refs), tiny.predict(img, references=again)
    assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_coreset_keeps_a_subset_and_ratio_one_changes_nothing() -> None:
    golden = [texture(1, 80, 80), texture(2, 80, 80)]
    plain = load_tiny_detector("anomalydino", image_size=56)
    full = np.asarray(plain.encode_references(golden).arrays["bank"])
    sub = load_tiny_detector("anomalydino", image_size=56, coreset_subsampling=True, sampling_ratio=0.25)
    bank = np.asarray(sub.encode_references(golden).arrays["bank"])
    assert bank.shape == (int(len(full) * 0.25), full.shape[1])
    assert all(any(np.array_equal(row, f) for f in full) for row in bank)  # rows of the full bank
    assert np.array_equal(bank, np.asarray(sub.encode_references(golden).arrays["bank"]))  # seeded
    everything = load_tiny_detector(
        "anomalydino", image_size=56, coreset_subsampling=True, sampling_ratio=1.0
    )
    refs_all = everything.encode_references(golden)
    assert sorted(map(tuple, np.asarray(refs_all.arrays["bank"]))) == sorted(map(tuple, full))
    img = perturbed(golden[0], 5)
    a = plain.predict(img, references=plain.encode_references(golden))
    b = everything.predict(img, references=refs_all)
    assert a.score == pytest.approx(b.score, abs=1e-7)


def test_masking_that_removes_everything_is_a_clear_error() -> None:
    det = load_tiny_detector("anomalydino", image_size=56, masking=True)
    flat = np.full((56, 56, 3), 90, np.uint8)  # no foreground to find
    with pytest.raises(ValueError, match="masking=False"):
        det.encode_references([flat])


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="image_size"):
        load_tiny_detector("anomalydino", image_size=20)
    for bad in (27, (28, 27), (27, 400), True, (56,), (56, 56, 56), "56"):  # min side 2 x 14
        with pytest.raises(ValueError, match="image_size"):
            load_tiny_detector("anomalydino", image_size=bad)
    assert load_tiny_detector("anomalydino", image_size=28).image_size == 28
    with pytest.raises(ValueError, match="pass_batch"):
        load_tiny_detector("anomalydino", pass_batch=0)
    with pytest.raises(ValueError, match="num_neighbours"):
        load_tiny_detector("anomalydino", num_neighbours=0)
    with pytest.raises(ValueError, match="sampling_ratio"):
        load_tiny_detector("anomalydino", sampling_ratio=0.0)
    with pytest.raises(ValueError, match="precision"):
        load_tiny_detector("anomalydino", precision="int8")
    with pytest.raises(ValueError, match="fp16"):
        load_tiny_detector("anomalydino", precision="fp16")


def test_bf16_falls_back_to_fp32_with_a_warning_where_unsupported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from models import cpu

    monkeypatch.setenv(cpu.ENV_MAX_ISA, "avx2")  # behave as on an AVX2-only CPU
    monkeypatch.setattr(cpu, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="models.cpu"):
        det = load_tiny_detector("anomalydino", precision="bf16")
        load_tiny_detector("anomalydino", precision="bf16")
    assert det.precision == "fp32" and det.model.dtype == torch.float32
    assert "running fp32" in det.describe()["precision_fallback"]
    assert sum("anomalydino: bf16" in r.getMessage() for r in caplog.records) == 1


def test_bf16_is_close_to_fp32_where_supported() -> None:
    from models.cpu import cpu_capabilities

    if not cpu_capabilities().fast_bf16:
        pytest.skip("no native bf16 on this CPU (the fallback is tested above)")
    fp32 = load_tiny_detector("anomalydino", image_size=56)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = load_tiny_detector("anomalydino", image_size=56, precision="bf16")
    assert bf16.precision == "bf16" and bf16.model.dtype == torch.bfloat16
    golden = [texture(1, 70, 70)]
    img = perturbed(golden[0], 2, 80)
    # a bf16 detector on the SAME backbone object leaves the fp32 one in fp32
    shared = AnomalyDinoDetector(backbone=fp32.backbone, image_size=56, precision="bf16")
    assert shared.model.dtype == torch.bfloat16 and fp32.backbone.model.pos_embed.dtype == torch.float32
    a = fp32.predict(img, references=fp32.encode_references(golden))
    b = bf16.predict(img, references=bf16.encode_references(golden))
    assert b.details["precision"] == "bf16"
    assert abs(a.score - b.score) < 0.02
    assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) < 0.05


# ----------------------------------------------------------------------------- registry and weights
def test_registered_and_listed_as_a_product_method() -> None:
    assert "anomalydino" in METHODS
    spec = method_spec("anomalydino")
    assert spec.required_weights() == ("timm-vit-small-patch14-dinov2",)
    assert spec.required_weights(backbone="vit_base_patch14_dinov2") == ("timm-vit-base-patch14-dinov2",)


def test_load_from_dir_picks_the_manifest_file_and_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="anomaly-inspect weights fetch timm-vit-small-patch14-dinov2"):
        load_detector_from_dir("anomalydino", tmp_path)
    from safetensors.torch import save_file

    from models.dinov2 import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        state = build_model("vit_small_patch14_dinov2").state_dict()
    target = weights_path("timm-vit-small-patch14-dinov2", tmp_path)
    target.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    det = load_detector_from_dir("anomalydino", tmp_path, image_size=56)
    assert det.weights_tag == target.name and not det.random_weights
    assert torch.equal(det.backbone.model.state_dict()["norm.weight"], state["norm.weight"])


def test_official_source_offline_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.dinov2 as dinov2

    def offline(arch: str, *, pretrained: bool = False):
        raise OSError("network unreachable")

    monkeypatch.setattr(dinov2, "build_model", offline)
    with pytest.raises(WeightsError, match="weights fetch timm-vit-small-patch14-dinov2"):
        load_detector("anomalydino", weights=None)


def test_check_references_refuses_a_bank_of_the_wrong_shape(tiny) -> None:
    """A stored bank whose width is not the backbone's, or that has no rows, is refused up front."""
    rng = np.random.default_rng(3)
    golden = [rng.integers(0, 256, (60, 75, 3), dtype=np.uint8) for _ in range(2)]
    refs = tiny.encode_references(golden)
    tiny.check_references(refs)
    bank = refs.arrays["bank"]
    for arrays in ({"bank": bank[:, :-1]}, {"bank": bank[:0]}, {"other": bank}):
        bad = ReferenceSet(refs.method, refs.model_key, refs.image_hashes, arrays)
        with pytest.raises(ReferenceMismatchError, match="bank"):
            tiny.check_references(bad)
        with pytest.raises(ReferenceMismatchError):
            tiny.predict(golden[0], references=bad)
