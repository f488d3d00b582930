"""AnomalyCLIP detector: released checkpoint format, weights errors, caching, output contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.anomalyclip.checkpoint import learner_digest, load_prompt_learner, save_prompt_checkpoint
from models.anomalyclip.detector import (
    ARCHS,
    CLIP_WEIGHTS_NAME,
    DEFAULT_BACKBONE,
    PROMPT_WEIGHTS_NAMES,
    AnomalyClipDetector,
    build_anomalyclip,
    load_prompts,
    required_weights,
    weights_from_dir,
)
from models.anomalyclip.torch_model import DpamVisualEncoder, gaussian_blur
from models.base import RANDOM_INIT, LocalArrayCache, ReferenceMismatchError, ReferenceSet, WeightsError
from models.weights import manifest
from tests.models._anomalyclip_helpers import (
    TINY_ARCH,
    one_thread,
    random_image,
    ref_gaussian_blur,
    released_state,
    save_released,
    tiny_backbone,
)

VITL_KEYS_AND_SHAPES = {
    "ctx_pos": (1, 1, 12, 768),
    "ctx_neg": (1, 1, 12, 768),
    "token_prefix_pos": (1, 1, 1, 768),
    "token_prefix_neg": (1, 1, 1, 768),
    "token_suffix_pos": (1, 1, 64, 768),
    "token_suffix_neg": (1, 1, 64, 768),
    "tokenized_prompts_pos": (1, 1, 77),
    "tokenized_prompts_neg": (1, 1, 77),
    **{f"compound_prompts_text.{i}": (4, 768) for i in range(8)},
    **{f"compound_prompt_projections.{i}.weight": (896, 768) for i in range(8)},
    **{f"compound_prompt_projections.{i}.bias": (896,) for i in range(8)},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def tiny_detector(prompts: str | Path = RANDOM_INIT, **kwargs: object) -> AnomalyClipDetector:
    """A detector on the shared tiny CLIP with the given prompt checkpoint."""
    bb = tiny_backbone()
    learner, tag, rnd = load_prompts(prompts, bb, TINY_ARCH, seed=0)
    return AnomalyClipDetector(
        backbone=bb, prompt_learner=learner, prompt_tag=tag, arch=TINY_ARCH, prompts_random=rnd, **kwargs
    )


# ----------------------------------------------------------------------------- checkpoint format
def test_released_vitl_format_loads_strictly(tmp_path: Path) -> None:
    # given a file in the released format with the exact ViT-L key names and shapes (fp16 values)
    state = released_state(768)
    assert {k: tuple(v.shape) for k, v in state.items()} == VITL_KEYS_AND_SHAPES
    path = save_released(state, tmp_path / "epoch_15.pth")
    # when loaded for the ViT-L text width
    learner = load_prompt_learner(path, ctx_dim=768, context_length=77, arch=ARCHS[DEFAULT_BACKBONE])
    # then every tensor is there with the file's values
    got = learner.state_dict()
    assert set(got) == set(VITL_KEYS_AND_SHAPES)
    for k, v in state.items():
        assert torch.equal(got[k].to(v.dtype), v), k


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.pop("compound_prompts_text.7"), "missing keys ['compound_prompts_text.7']"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected keys ['extra']"),
        (lambda s: s.update(ctx_pos=torch.zeros(1, 1, 8, 768)), "ctx_pos: file (1, 1, 8, 768)"),
    ],
)
def test_non_matching_checkpoint_is_refused_naming_the_file(tmp_path: Path, change, needle: str) -> None:
    state = released_state(768)
    change(state)
    path = save_released(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        load_prompt_learner(path, ctx_dim=768, context_length=77, arch=ARCHS[DEFAULT_BACKBONE])
    assert needle in str(err.value) and str(path) in str(err.value)


def test_file_without_prompt_learner_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(released_state(48), str(path))  # a bare state dict, not {"prompt_learner": ...}
    with pytest.raises(WeightsError, match="prompt_learner"):
        load_prompt_learner(path, ctx_dim=48, context_length=77, arch=TINY_ARCH)


def test_released_checkpoint_gives_deterministic_results(tmp_path: Path) -> None:
    # given a tiny-width checkpoint in the released format
    path = save_released(released_state(48, seed=11), tmp_path / "epoch_15.pth")
    img = random_image(0, 50, 64)
    # when two detectors are built from it and predict the same image
    a = tiny_detector(path).predict(img)
    b = tiny_detector(path).predict(img)
    # then results are identical and labelled with the checkpoint
    assert a.score == b.score
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
    assert a.prompt_digest == b.prompt_digest
    assert a.weights == "random-init+" + f"{tmp_path.name}/epoch_15.pth"
    # and another checkpoint gives another digest and other outputs
    other = tiny_detector(save_released(released_state(48, seed=12), tmp_path / "other.pth")).predict(img)
    assert other.prompt_digest != a.prompt_digest
    assert not np.array_equal(other.anomaly_map, a.anomaly_map)


def test_save_round_trip_keeps_format_and_digest(tmp_path: Path) -> None:
    learner, _, _ = load_prompts(RANDOM_INIT, tiny_backbone(), TINY_ARCH, seed=3)
    path = save_prompt_checkpoint(learner, tmp_path / "ck" / "epoch_1.pth")
    blob = torch.load(str(path), weights_only=True)
    assert list(blob) == ["prompt_learner"]
    assert set(blob["prompt_learner"]) == set(VITL_KEYS_AND_SHAPES)  # the released key names
    again = load_prompt_learner(path, ctx_dim=48, context_length=77, arch=TINY_ARCH)
    assert learner_digest(again) == learner_digest(learner)


# ----------------------------------------------------------------------------- weights resolution
def test_required_weights_and_dir_mapping(tmp_path: Path) -> None:
    assert required_weights() == (CLIP_WEIGHTS_NAME, PROMPT_WEIGHTS_NAMES["visa"])
    assert required_weights(prompt_checkpoint="mvtec")[1] == PROMPT_WEIGHTS_NAMES["mvtec"]
    w = weights_from_dir(tmp_path, prompt_checkpoint="mvtec")
    assert w.clip == tmp_path / manifest()[CLIP_WEIGHTS_NAME].file
    assert w.prompts == tmp_path / manifest()[PROMPT_WEIGHTS_NAMES["mvtec"]].file
    with pytest.raises(ValueError, match="prompt_checkpoint"):
        required_weights(prompt_checkpoint="bogus")


def test_empty_weights_dir_names_files_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        models.load_detector_from_dir("anomalyclip", tmp_path)
    msg = str(err.value)
    assert CLIP_WEIGHTS_NAME in msg and PROMPT_WEIGHTS_NAMES["visa"] in msg
    assert f"anomaly-inspect weights fetch {CLIP_WEIGHTS_NAME}" in msg


def test_missing_prompt_file_names_file_and_fetch_command(tmp_path: Path) -> None:
    # the CLIP file is present (a tiny state dict), the prompt checkpoint is not
    w = weights_from_dir(tmp_path)
    with pytest.raises(WeightsError) as err:
        build_anomalyclip(weights=w, backbone="tiny-vitl-test")
    msg = str(err.value)
    assert str(w.prompts) in msg
    assert f"anomaly-inspect weights fetch {PROMPT_WEIGHTS_NAMES['visa']} --dir {tmp_path}" in msg


def test_missing_clip_file_names_file_and_fetch_command(tmp_path: Path) -> None:
    w = weights_from_dir(tmp_path)
    Path(w.prompts).parent.mkdir(parents=True)
    save_released(released_state(48), Path(w.prompts))
    with pytest.raises(WeightsError) as err:
        build_anomalyclip(weights=w, backbone="tiny-vitl-test")
    assert str(w.clip) in str(err.value)
    assert f"anomaly-inspect weights fetch {CLIP_WEIGHTS_NAME} --dir {tmp_path}" in str(err.value)


def test_no_weights_is_an_error_not_random() -> None:
    with pytest.raises(WeightsError, match="anomaly-inspect weights fetch"):
        build_anomalyclip(weights=None, backbone="tiny-vitl-test")


def test_weights_dir_with_tiny_files_builds_through_the_same_loading_code(tmp_path: Path) -> None:
    # given a weights dir holding a tiny CLIP state dict and a tiny prompt checkpoint at manifest paths
    w = weights_from_dir(tmp_path)
    Path(w.clip).parent.mkdir(parents=True)
    torch.save(tiny_backbone().model.state_dict(), str(w.clip))
    Path(w.prompts).parent.mkdir(parents=True)
    save_released(released_state(48, seed=2), Path(w.prompts))
    # when built from the directory
    det = models.load_detector_from_dir("anomalyclip", tmp_path, backbone="tiny-vitl-test", cache=None)
    # then it is a real-weights detector that reproduces the in-memory one
    assert not det.random_weights
    img = random_image(1, 40, 40)
    ref = tiny_detector(Path(w.prompts)).predict(img)
    res = det.predict(img)
    assert res.score == pytest.approx(ref.score, abs=1e-6)
    np.testing.assert_allclose(res.anomaly_map, ref.anomaly_map, atol=1e-6)


# ----------------------------------------------------------------------------- detector contract
def test_tiny_detector_output_contract() -> None:
    det = models.load_tiny_detector("anomalyclip")
    imgs = [random_image(2, 45, 80), random_image(3, 70, 70), random_image(4, 120, 90)]
    results = det.predict_batch(imgs)
    assert len(results) == 3
    for img, r in zip(imgs, results, strict=True):
        assert r.anomaly_map.shape == img.shape[:2]
        assert r.anomaly_map.dtype == np.float32
        assert 0.0 <= float(r.anomaly_map.min()) <= float(r.anomaly_map.max()) <= 1.0
        assert 0.0 <= r.score <= 1.0
        assert r.method == "anomalyclip" and r.model == "tiny-vitl-test"
        assert r.random_weights and not r.used_references
        assert r.prompt_digest == det.prompt_digest()
        assert set(r.timings) == {"text", "preprocess", "encode_score", "resize"}
    assert det.predict_batch([]) == []


def test_object_agnostic_and_no_references() -> None:
    det = tiny_detector()
    img = random_image(5, 64, 64)
    a = det.predict(img)
    b = det.predict(img, object_name="bottle")
    assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
    assert det.prompt_digest("bottle") == det.prompt_digest()
    refs = ReferenceSet(method="anomalyclip", model_key=det.model_key, image_hashes=("x",), arrays={})
    with pytest.raises(ReferenceMismatchError):
        det.predict(img, references=refs)


def test_text_embeddings_computed_once_and_shared_through_the_cache() -> None:
    cache = LocalArrayCache()
    det = tiny_detector(cache=cache)
    img = random_image(6, 32, 32)
    det.predict(img)
    det.predict_batch([img, img])
    assert det.counters().get("text_prototypes_computed") == 1
    key = det.text_cache_key()
    assert det.model_key in key and det.checkpoint_digest in key
    assert cache.get_array(key).shape == (2, 32)
    # a second detector on the same cache computes nothing
    det2 = tiny_detector(cache=cache)
    det2.predict(img)
    assert det2.counters().get("text_prototypes_computed", 0) == 0


def test_map_at_processing_size_is_blurred_mean_of_abnormal_probabilities() -> None:
    # given an image at the processing size (70 = 5x5 patches of 14): no final resize,
    # and the two-layer option (the tiny default is the top layer only)
    det = tiny_detector(feature_layers=(6, 7))
    img = random_image(7, 70, 70)
    res = det.predict(img)
    # when recomputed from the encoder features with numpy
    from models.clip_backbone import preprocess_pil

    pixels = preprocess_pil([img], 70)
    enc = DpamVisualEncoder(visual=tiny_backbone().model.visual, feature_layers=(6, 7))
    with torch.no_grad():
        feats = enc(pixels)
    text = det.text_embeddings().numpy().astype(np.float64)
    layer_maps = []
    for p in feats.patch_embeddings:
        f = p[0].numpy().astype(np.float64)
        cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ text.T
        e = np.exp(cos / 0.07)
        prob = e / e.sum(1, keepdims=True)  # [25, 2]
        grid = torch.from_numpy(prob.T.reshape(1, 2, 5, 5))
        up = torch.nn.functional.interpolate(grid, size=(70, 70), mode="bilinear", align_corners=False)[
            0
        ].numpy()
        layer_maps.append((up[1] + 1 - up[0]) / 2)
    want = ref_gaussian_blur(np.mean(layer_maps, axis=0), 4.0)
    g = feats.global_embedding[0].numpy().astype(np.float64)
    e = np.exp((g / np.linalg.norm(g)) @ text.T / 0.07)
    # then map and score agree
    np.testing.assert_allclose(res.anomaly_map, want, atol=1e-5)
    assert res.score == pytest.approx(e[1] / e.sum(), abs=1e-6)


def test_bf16_is_close_to_fp32() -> None:
    img = random_image(8, 70, 70)
    a = tiny_detector().predict(img)
    b = tiny_detector(precision="bf16").predict(img)
    assert abs(a.score - b.score) < 0.05
    assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) < 0.05
    with pytest.raises(ValueError, match="fp16"):
        tiny_detector(precision="fp16")


def test_gaussian_blur_keeps_constant_maps() -> None:
    m = torch.full((1, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(m, 4.0), m, atol=1e-6)
