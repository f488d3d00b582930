"""MuSc detector: API, errors, precision, bank helpers and serialisation (tiny random ViT)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import models
from models.base import RANDOM_INIT, ReferenceMismatchError, ReferenceSet, WeightsError
from models.musc import (
    MuscDetector,
    bank_append,
    bank_bytes_per_image,
    bank_concat,
    bank_evict,
    bank_split,
    bank_summary,
)
from prompts import METHODS


@pytest.fixture(scope="module")
def det() -> MuscDetector:
    d = models.load_tiny_detector("musc")
    assert isinstance(d, MuscDetector)
    return d


def imgs(n: int, seed: int = 0, size: tuple[int, int] = (112, 112)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3))
    return [np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def test_registered_and_described(det: MuscDetector) -> None:
    assert "musc" in models.list_detectors() and "musc" in METHODS
    d = det.describe()
    assert d["method"] == "musc" and d["random_weights"] is True and d["supports_references"]
    assert d["r_list"] == [1, 3, 5] and d["topmin"] == [0.0, 0.3] and d["rscin_k"] == [1, 2, 3]
    assert d["bank_bytes_per_image"] == det.bytes_per_image
    # the key names the features: a bank is only valid for the same size and blocks
    assert det.model_key == "musc/tiny-musc-clip-test/random-init/112/1-2-3-4"


def test_real_architecture_settings_are_the_official_ones() -> None:
    from models.musc import ARCHS

    a = ARCHS["ViT-L-14-336"]
    assert a.model == "ViT-L-14-336"  # plain GELU config, as MuSc builds it at 518
    assert a.image_size == 518 and a.feature_layers == (6, 12, 18, 24)
    assert a.weights_name == "openclip-vit-l-14-336-openai" and a.pretrained_tag == "openai"
    assert models.method_spec("musc").required_weights() == ("openclip-vit-l-14-336-openai",)


def test_one_image_without_bank_is_a_clear_error(det: MuscDetector) -> None:
    with pytest.raises(ValueError, match="at least 2 images"):
        det.predict_batch(imgs(1))
    with pytest.raises(ValueError, match="at least 2 images"):
        det.predict(imgs(1)[0])
    assert det.predict_batch([]) == []


def test_maps_come_back_at_each_input_size(det: MuscDetector) -> None:
    images = imgs(2, size=(90, 150)) + imgs(1, size=(200, 120))
    res = det.predict_batch(images)
    for img, r in zip(images, res, strict=True):
        assert r.anomaly_map.shape == img.shape[:2] and r.anomaly_map.dtype == np.float32
        assert float(r.anomaly_map.min()) >= 0.0 and float(r.anomaly_map.max()) <= 1.0
        assert 0.0 <= r.score <= 1.0 and not r.anomaly_map.flags.writeable
        assert r.random_weights and r.method == "musc"
        assert set(r.timings) >= {"backbone", "scoring", "postprocess"}


def test_bank_from_another_model_or_method_is_refused(det: MuscDetector) -> None:
    bank = det.encode_references(imgs(3))
    other = ReferenceSet(
        method="musc", model_key="musc/x/y/112/1", image_hashes=bank.image_hashes, arrays=bank.arrays
    )
    with pytest.raises(ReferenceMismatchError, match="encoded by"):
        det.predict(imgs(1)[0], references=other)
    wrong_size = models.load_tiny_detector("musc", image_size=98)
    with pytest.raises(ReferenceMismatchError):
        wrong_size.predict(imgs(1)[0], references=bank)
    winclip_like = ReferenceSet(
        method="winclip", model_key=det.model_key, image_hashes=("a",), arrays={"patches": np.zeros((2, 3))}
    )
    with pytest.raises(ReferenceMismatchError, match="not a MuSc bank"):
        det.predict(imgs(1)[0], references=winclip_like)


def test_bank_append_and_evict_keep_at_most_n_newest_first_out(det: MuscDetector) -> None:
    images = imgs(7, seed=3)
    bank = None
    for i, img in enumerate(images):
        bank = bank_append(bank, det.encode_references([img]), max_images=4)
        assert bank.count == min(i + 1, 4)
        assert bank.arrays["tokens"].shape[0] == bank.count == bank.arrays["added_at"].shape[0]
    assert bank is not None
    whole = det.encode_references(images)
    assert bank.image_hashes == whole.image_hashes[-4:]
    np.testing.assert_array_equal(bank.arrays["tokens"], whole.arrays["tokens"][-4:])
    assert np.all(np.diff(bank.arrays["added_at"]) >= 0)  # oldest first
    assert bank_evict(bank, 2).image_hashes == bank.image_hashes[-2:]
    assert bank_evict(bank, 10) is bank
    with pytest.raises(ValueError, match="max_images"):
        bank_evict(bank, 0)
    # split / concat round trip
    assert bank_concat(bank_split(bank)).image_hashes == bank.image_hashes
    np.testing.assert_array_equal(bank_concat(bank_split(bank)).arrays["tokens"], bank.arrays["tokens"])
    # entries of another configuration do not mix
    other = models.load_tiny_detector("musc", bank_dtype="float16").encode_references(images[:1])
    with pytest.raises(ValueError, match="does not fit"):
        bank_append(bank, other, max_images=4)


def test_default_bank_is_exact_stream_equals_batch_without_rscin(det: MuscDetector) -> None:
    """The model's default bank (float32) keeps the stated equivalence exact; float16 is opt-in."""
    images = imgs(6, seed=31)
    assert det.bank_dtype == "float32"
    bank = det.encode_references(images[:-1])
    assert bank.arrays["tokens"].dtype == np.float32
    # 4 blocks x 64 patches x 64 channels x 4 bytes + 32 x 4 (embedding) + 8 (time)
    assert det.bytes_per_image == 4 * 64 * 64 * 4 + 32 * 4 + 8 == bank_bytes_per_image(bank)
    stream = det.predict(images[-1], references=bank)
    batch = det.predict_batch(images, rscin=False)[-1]
    np.testing.assert_allclose(stream.anomaly_map, batch.anomaly_map, rtol=0, atol=1e-6)
    assert stream.score == pytest.approx(batch.score, abs=1e-6)


def test_bytes_per_image_as_stated_and_bytes_round_trip() -> None:
    det = models.load_tiny_detector("musc", bank_dtype="float16")  # as the service stores banks
    assert isinstance(det, MuscDetector)
    bank = det.encode_references(imgs(5, seed=4))
    assert bank.arrays["tokens"].dtype == np.float16 and bank.arrays["embedding"].dtype == np.float16
    # 4 blocks x 64 patches x 64 channels x 2 bytes + 32 x 2 (embedding) + 8 (time)
    assert det.bytes_per_image == 4 * 64 * 64 * 2 + 32 * 2 + 8 == bank_bytes_per_image(bank)
    blob = bank.to_bytes()
    assert bank.count * det.bytes_per_image < len(blob) < bank.count * det.bytes_per_image + 2000
    back = ReferenceSet.from_bytes(blob)
    assert back.image_hashes == bank.image_hashes and back.model_key == bank.model_key
    for k in bank.arrays:
        assert back.arrays[k].dtype == bank.arrays[k].dtype
        np.testing.assert_array_equal(back.arrays[k], bank.arrays[k])
    q = imgs(1, seed=9)[0]
    a, b = det.predict(q, references=bank), det.predict(q, references=back)
    assert a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    s = bank_summary(back)
    assert s["size"] == 5 and s["bytes_per_image"] == det.bytes_per_image and s["dtype"] == "float16"
    assert s["oldest_added_at"] <= s["newest_added_at"]


def test_bank_with_one_image_scores_against_it(det: MuscDetector) -> None:
    images = imgs(2, seed=6)
    bank = det.encode_references(images[:1])
    r = det.predict(images[1], references=bank)
    assert r.details["n_others"] == 1 and r.details["bank_size"] == 1 and r.used_references


def test_bf16_runs_close_to_fp32(det: MuscDetector) -> None:
    low = models.load_tiny_detector("musc", precision="bf16")
    images = imgs(4, seed=8)
    a = det.predict_batch(images, rscin=False)
    b = low.predict_batch(images, rscin=False)
    for x, y in zip(a, b, strict=True):
        assert abs(x.score - y.score) < 0.02
    with pytest.raises(ValueError, match="precision"):
        models.load_tiny_detector("musc", precision="int4")
    with pytest.raises(ValueError, match="fp16 is only supported on CUDA"):
        models.load_tiny_detector("musc", precision="fp16")


def test_bf16_without_cpu_support_falls_back_to_fp32_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from models import cpu

    monkeypatch.setenv(cpu.ENV_MAX_ISA, "avx2")  # behave as on an AVX2-only CPU
    monkeypatch.setattr(cpu, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="models.cpu"):
        a = models.load_tiny_detector("musc", precision="bf16")
        b = models.load_tiny_detector("musc", precision="bf16")
    assert a.describe()["precision"] == "fp32" == b.describe()["precision"]
    assert a.describe()["requested_precision"] == "bf16"
    assert "running fp32" in a.describe()["precision_fallback"]
    assert sum("musc: bf16" in r.getMessage() for r in caplog.records) == 1


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        models.load_detector("musc", weights=tmp_path / "nope.pt", backbone="tiny-musc-clip-test")
    with pytest.raises(WeightsError, match="anomaly-inspect weights fetch openclip-vit-l-14-336-openai"):
        models.load_detector_from_dir("musc", tmp_path)


def test_weights_file_is_loaded_into_the_same_architecture(tmp_path: Path, det: MuscDetector) -> None:
    from models.clip_backbone import create_clip

    model = create_clip("tiny-musc-clip-test", RANDOM_INIT, pretrained_tag=None).model
    with torch.no_grad():
        model.visual.proj.mul_(2.0)  # different weights than the random-init detector
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = models.load_detector("musc", weights=ckpt, backbone="tiny-musc-clip-test")
    assert loaded.weights_tag == "tiny.pt" and not loaded.random_weights
    torch.testing.assert_close(loaded.encoder.visual.proj, model.visual.proj)


def test_no_request_state_concurrent_calls_agree(det: MuscDetector) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a, b = imgs(3, seed=1), imgs(3, seed=2)
    want_a = [r.score for r in det.predict_batch(a)]
    want_b = [r.score for r in det.predict_batch(b)]
    with ThreadPoolExecutor(2) as ex:
        fa = ex.submit(det.predict_batch, a)
        fb = ex.submit(det.predict_batch, b)
        assert [r.score for r in fa.result()] == pytest.approx(want_a, abs=1e-6)
        assert [r.score for r in fb.result()] == pytest.approx(want_b, abs=1e-6)


def test_dinov2_backbone_official_settings_and_tiny_build(tmp_path: Path) -> None:
    from models.musc import ARCHS

    a = ARCHS["dinov2_vitb14"]
    assert a.kind == "dinov2" and a.model == "vit_base_patch14_dinov2"
    assert a.image_size == 518 and a.feature_layers == (3, 6, 9, 12)
    assert models.method_spec("musc").required_weights(backbone="dinov2_vitb14") == (
        "timm-vit-base-patch14-dinov2",
    )
    with pytest.raises(WeightsError, match="not found"):
        models.load_detector("musc", weights=tmp_path / "nope.safetensors", backbone="dinov2_vitb14")
    tiny = models.load_tiny_detector("musc", backbone="tiny-musc-dinov2-test")
    assert tiny.describe()["feature_layers"] == [1, 2]
    res = tiny.predict_batch(imgs(3, seed=12))
    assert all(0.0 <= r.score <= 1.0 for r in res)
    bank = tiny.encode_references(imgs(2, seed=13))
    # 2 blocks x 64 patches x 48 channels x 4 bytes (float32 default) + 48 x 4 + 8
    assert bank_bytes_per_image(bank) == tiny.bytes_per_image == 2 * 64 * 48 * 4 + 48 * 4 + 8


def test_vit_l_activation_follows_the_official_builder() -> None:
    """MuSc's open_clip: QuickGELU only at the config's own 336, plain GELU at 518."""
    from models.musc import ARCHS

    a = ARCHS["ViT-L-14-336"]
    assert a.model_for(518) == "ViT-L-14-336"
    assert a.model_for(336) == "ViT-L-14-336-quickgelu"
    assert ARCHS["dinov2_vitb14"].model_for(336) == "vit_base_patch14_dinov2"


def test_backbone_chunks_do_not_change_the_features(det: MuscDetector) -> None:
    images = imgs(5, seed=21)
    chunked = MuscDetector(
        encoder=det.encoder,
        model_name=det.model_name,
        weights_tag=det.weights_tag,
        random_weights=True,
        config=det.config,
        encode_batch=2,
    )
    a, ea = det.features(images)
    b, eb = chunked.features(images)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ea, eb, atol=1e-5, rtol=0)


def test_written_out_clip_block_equals_the_open_clip_block(det: MuscDetector) -> None:
    from models.musc.torch_model import clip_block

    enc: Any = det.encoder
    x = torch.randn(3, 17, enc.token_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for block in enc.visual.transformer.resblocks:
            torch.testing.assert_close(clip_block(block, x), block(x), atol=1e-5, rtol=0)
