"""WinCLIP detector on the tiny random-init model: batched paths vs plain loops, API contract."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import models
from models import RANDOM_INIT, ImageError, ReferenceMismatchError, ReferenceSet
from models.clip_backbone import encode_text_trimmed
from prompts import get_builtin_product


@pytest.fixture(scope="module")
def det() -> models.Detector:
    torch.manual_seed(1234)
    return models.load_tiny_detector("winclip")


def _images(n: int, seed: int = 0, shape: tuple[int, int] = (96, 128)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def test_batched_windows_equal_per_window_loop(det) -> None:
    """Given a batch of 3 images, when all windows of a scale go through one pass,
    then each embedding equals running that window alone (<= 1e-5)."""
    from models.clip_backbone import preprocess
    from models.winclip.encoder import VisualTower

    enc = det.encoder
    plain = VisualTower(det.clip.visual)  # open_clip's own modules, one sequence set at a time
    pixels = preprocess(_images(3), det.backbone.image_size)
    batched = enc.encode(pixels)
    tokens = enc.embed_tokens(pixels)  # [B, 1+P, D]
    for k in det.scales:
        for w, patches in enumerate(enc.masks[k].tolist()):
            keep = [0] + [p + 1 for p in patches]
            pooled, _ = plain(tokens[:, keep])  # one window at a time
            diff = (pooled - batched.windows[k][:, w]).abs().max().item()
            assert diff <= 1e-5, (k, w, diff)
    full, patches = plain(tokens)
    assert torch.allclose(full, batched.image, atol=1e-6)
    assert batched.patches.shape == (3, enc.n_patches, tokens.shape[-1])


def test_packed_tower_equals_open_clip_modules(det) -> None:
    """Given the full image and all windows, when they go through ONE packed pass,
    then every output equals the plain open_clip tower run per group (<= 1e-5)."""
    from models.clip_backbone import preprocess
    from models.winclip.encoder import PackedTower, VisualTower

    enc = det.encoder
    tokens = enc.embed_tokens(preprocess(_images(2, seed=4), det.backbone.image_size))
    groups = [tokens] + [enc.window_sequences(tokens, k) for k in det.scales]
    packed = PackedTower(det.clip.visual).forward_groups(groups)
    plain = VisualTower(det.clip.visual)
    for g, (p_pooled, p_tokens) in zip(groups, packed, strict=True):
        pooled, toks = plain(g)
        assert (pooled - p_pooled).abs().max().item() <= 1e-5
        assert (toks - p_tokens).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("options", "tol"),
    [
        ({"prepack": False}, 1e-5),  # plain F.linear path
        ({"prepack": True}, 1e-5),  # oneDNN prepacked weights (where available)
        ({"fuse_gelu": True, "explicit_attention": True}, 1e-5),
        ({"dtype": torch.bfloat16}, 0.15),  # low precision: close, not equal
    ],
)
def test_packed_tower_variants_match_open_clip(det, options, tol) -> None:
    from models.clip_backbone import preprocess
    from models.winclip.encoder import PackedTower, VisualTower, onednn_linear_available

    if options.get("prepack") and not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN prepacked linear")
    tokens = det.encoder.embed_tokens(preprocess(_images(1, seed=8), det.backbone.image_size))
    windows = det.encoder.window_sequences(tokens, 2)
    (full, _), (win, _) = PackedTower(det.clip.visual, **options).forward_groups([tokens, windows])
    plain = VisualTower(det.clip.visual)
    assert full.dtype == torch.float32
    assert (full - plain(tokens)[0]).abs().max().item() <= tol
    assert (win - plain(windows)[0]).abs().max().item() <= tol


def test_sub_batches_give_the_same_embeddings(det) -> None:
    from models.clip_backbone import preprocess

    pixels = preprocess(_images(3, seed=6), det.backbone.image_size)
    whole = det.encoder.with_tower(det.encoder.tower)
    whole.max_tokens_per_pass = None
    split = det.encoder.with_tower(det.encoder.tower)
    split.max_tokens_per_pass = split.tokens_per_image  # one image per pass
    a, b = whole.encode(pixels), split.encode(pixels)
    assert torch.allclose(a.image, b.image, atol=1e-5) and torch.allclose(a.patches, b.patches, atol=1e-5)
    for k in det.scales:
        assert torch.allclose(a.windows[k], b.windows[k], atol=1e-5)


def test_trimmed_text_encoder_equals_open_clip_encode_text(det) -> None:
    tokens = det.tokenizer(
        ["a photo of a bottle.", "a photo of the flawless metal nut for visual inspection."]
    )
    ref = det.clip.encode_text(tokens)
    assert (encode_text_trimmed(det.clip, tokens) - ref).abs().max().item() <= 1e-5


def test_map_has_input_shape_and_unit_range(det) -> None:
    img = _images(1, shape=(57, 203))[0]
    res = det.predict(img, object_name="bottle")
    assert res.anomaly_map.shape == (57, 203)
    assert res.anomaly_map.dtype == np.float32
    assert 0.0 <= float(res.anomaly_map.min()) <= float(res.anomaly_map.max()) <= 1.0
    assert 0.0 <= res.score <= 1.0
    assert res.random_weights is True and res.weights == RANDOM_INIT
    assert not res.anomaly_map.flags.writeable


def test_batch_equals_single_calls(det) -> None:
    imgs = _images(4, seed=3)
    batch = det.predict_batch(imgs, object_name="bottle")
    for img, b in zip(imgs, batch, strict=True):
        single = det.predict(img, object_name="bottle")
        assert abs(single.score - b.score) <= 1e-5
        assert np.abs(single.anomaly_map - b.anomaly_map).max() <= 1e-5


def test_product_recipe_changes_prompt_digest(det) -> None:
    bottle = get_builtin_product("bottle")
    custom = bottle.model_copy(update={"extra_anomalous_states": ("cracked {}",)})
    assert det.prompt_digest(product=bottle) == det.prompt_digest(object_name="bottle")
    assert det.prompt_digest(product=custom) != det.prompt_digest(product=bottle)
    assert det.prompt_digest(object_name="cable") != det.prompt_digest(object_name="bottle")


def test_text_prototypes_computed_once_per_prompt_set(det) -> None:
    before = det.counters().get("text_prototypes_computed", 0)
    for _ in range(3):
        det.text_prototypes(object_name="hazelnut")
    det.text_prototypes(object_name="screw")
    assert det.counters()["text_prototypes_computed"] - before == 2


def test_references_roundtrip_and_few_shot(det) -> None:
    normal = _images(2, seed=10)
    refs = det.encode_references(normal, object_name="bottle")
    assert refs.count == 2 and refs.model_key == det.model_key
    restored = ReferenceSet.from_bytes(refs.to_bytes())
    img = _images(1, seed=11)[0]
    a = det.predict(img, object_name="bottle", references=refs)
    b = det.predict(img, object_name="bottle", references=restored)
    zero = det.predict(img, object_name="bottle")
    assert a.used_references and not zero.used_references
    assert a.score == pytest.approx(b.score, abs=1e-7)
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
    assert abs(a.score - zero.score) > 1e-6  # the references changed the result
    # a reference image scored against its own memory: the few-shot part is ~0
    self_res = det.predict(normal[0], object_name="bottle", references=refs)
    assert self_res.score < det.predict(normal[0], object_name="bottle").score


def test_references_from_another_model_are_refused(det) -> None:
    refs = det.encode_references(_images(1), object_name="bottle")
    foreign = ReferenceSet(
        method="winclip", model_key="winclip/other/x", image_hashes=refs.image_hashes, arrays=refs.arrays
    )
    with pytest.raises(ReferenceMismatchError):
        det.predict(_images(1)[0], references=foreign)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32), "img"],
)
def test_bad_images_raise_image_error(det, bad) -> None:
    with pytest.raises(ImageError):
        det.predict(bad)


def test_concurrent_predict_from_threads_is_consistent(det) -> None:
    imgs = _images(4, seed=20)
    expected = [det.predict(i, object_name="pill").score for i in imgs]
    got: dict[int, float] = {}

    def work(i: int) -> None:
        got[i] = det.predict(imgs[i], object_name="pill").score

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == pytest.approx(expected, abs=1e-6)


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="precision"):
        models.load_tiny_detector("winclip", precision="int3")


def test_bf16_tower_close_to_fp32(det) -> None:
    torch.manual_seed(1234)
    low = models.load_tiny_detector("winclip", precision="bf16")
    img = _images(1, seed=5)[0]
    a = det.predict(img, object_name="bottle").anomaly_map
    b = low.predict(img, object_name="bottle").anomaly_map
    assert np.abs(a - b).max() < 5e-2


def test_check_references_refuses_a_memory_of_the_wrong_shape(det) -> None:
    """A stored set whose arrays do not fit this encoder is refused up front (a corrupt store
    entry), not by a shape error deep inside the few-shot maths."""
    refs = det.encode_references(_images(2, seed=9))
    det.check_references(refs)
    for edit in (lambda a: a[:, :-1], lambda a: a[:0], lambda a: a[:-1]):
        for name in refs.arrays:
            arrays = {k: (edit(v) if k == name else v) for k, v in refs.arrays.items()}
            bad = ReferenceSet(refs.method, refs.model_key, refs.image_hashes, arrays)
            with pytest.raises(ReferenceMismatchError, match=name):
                det.check_references(bad)
            with pytest.raises(ReferenceMismatchError):
                det.predict(_images(1)[0], object_name="bottle", references=bad)
    missing = ReferenceSet(
        refs.method, refs.model_key, refs.image_hashes, {"patches": refs.arrays["patches"]}
    )
    with pytest.raises(ReferenceMismatchError, match="windows_"):
        det.check_references(missing)
