"""DINOv2 backbones: building, strict weights loading, patch tokens (tiny random-init models)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode, Resize

from models.base import RANDOM_INIT, WeightsError
from models.dinov2 import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_ARCH,
    build_model,
    create_dinov2,
    patch_tokens,
    position_embedding,
    preprocess,
    resized_size,
)
from models.weights import manifest


@pytest.fixture(scope="module")
def tiny():
    return create_dinov2(TINY_ARCH, RANDOM_INIT)


def test_random_init_is_seeded_and_labelled(tiny) -> None:
    again = create_dinov2(TINY_ARCH, RANDOM_INIT)
    assert tiny.random_weights and tiny.weights_tag == RANDOM_INIT
    for (k, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert tiny.patch_size == 14 and tiny.embed_dim == 48


def test_official_architectures_have_manifest_entries() -> None:
    for arch, spec in ARCHS.items():
        if spec.weights_name is not None:
            assert "anomalydino" in manifest()[spec.weights_name].used_by, arch  # musc uses ViT-B too
            assert f"{spec.timm_name}.lvd142m" in manifest()[spec.weights_name].url


def test_patch_tokens_are_timm_intermediates_without_prefix_tokens(tiny) -> None:
    """Same as timm's forward_intermediates(norm=True) with pos-embed antialiasing off (as anomalib)."""
    import timm.models.vision_transformer as vit

    model = tiny.model
    x = torch.randn(2, 3, 56, 84)
    original = vit.resample_abs_pos_embed
    vit.resample_abs_pos_embed = functools.partial(original, antialias=False)
    try:
        (ref,) = model.forward_intermediates(
            x, indices=[len(model.blocks) - 1], norm=True, output_fmt="NLC", intermediates_only=True
        )
    finally:
        vit.resample_abs_pos_embed = original
    got = patch_tokens(model, x)
    assert got.shape == (2, 4 * 6, 48)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_position_embedding_resampling_antialias_matters_when_shrinking(tiny) -> None:
    # the tiny model's grid is 7x7: a 4x6 grid shrinks it, so antialiasing changes the result
    a = position_embedding(tiny.model, (4, 6), antialias=False)
    b = position_embedding(tiny.model, (4, 6), antialias=True)
    assert a.shape == b.shape == (1, 1 + 24, 48)
    assert not torch.allclose(a, b)
    # the native grid is returned unchanged
    assert position_embedding(tiny.model, (7, 7)) is tiny.model.pos_embed


def _save_state(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["dino.pth", "model.safetensors"])
def test_weights_load_from_state_dict_and_safetensors(tmp_path: Path, name: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        source = build_model(TINY_ARCH)
    path = _save_state(tmp_path, name, source.state_dict())
    bb = create_dinov2(TINY_ARCH, path)
    assert bb.weights_tag == name and not bb.random_weights
    for k, v in source.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["dino.pth", "model.safetensors"])
def test_strict_load_reports_missing_unexpected_and_shape(tmp_path: Path, name: str) -> None:
    state = build_model(TINY_ARCH).state_dict()
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(WeightsError, match=r"missing key\(s\), e\.g\. norm\.weight"):
        create_dinov2(TINY_ARCH, _save_state(tmp_path, "a-" + name, missing))
    extra = {**state, "head.weight": torch.zeros(3, 48)}
    with pytest.raises(WeightsError, match=r"unexpected key\(s\), e\.g\. head\.weight"):
        create_dinov2(TINY_ARCH, _save_state(tmp_path, "b-" + name, extra))
    wrong = {**state, "pos_embed": torch.zeros(1, 5, 48)}
    with pytest.raises(WeightsError, match=r"shape mismatch.*pos_embed: file \(1, 5, 48\)"):
        create_dinov2(TINY_ARCH, _save_state(tmp_path, "c-" + name, wrong))


def test_other_architecture_file_is_refused(tmp_path: Path) -> None:
    """A ViT-S state dict does not load into the tiny model (and the error names the file)."""
    path = _save_state(tmp_path, "vits.pth", build_model("vit_small_patch14_dinov2").state_dict())
    with pytest.raises(WeightsError, match=r"vits\.pth does not fit architecture tiny-dinov2-test"):
        create_dinov2(TINY_ARCH, path)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"not found.*weights fetch timm-vit-small-patch14-dinov2"):
        create_dinov2("vit_small_patch14_dinov2", tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_dinov2(TINY_ARCH, bad)
    bad_pt = tmp_path / "bad.pth"
    bad_pt.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_dinov2(TINY_ARCH, bad_pt)


def test_official_source_without_network_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.dinov2 as dinov2

    def offline(arch: str, *, pretrained: bool = False):
        raise OSError("no network")

    monkeypatch.setattr(dinov2, "build_model", offline)
    with pytest.raises(WeightsError, match=r"Hugging Face hub.*weights fetch timm-vit-small-patch14-dinov2"):
        dinov2.create_dinov2("vit_small_patch14_dinov2", None)
    with pytest.raises(WeightsError, match="test configuration"):
        dinov2.create_dinov2(TINY_ARCH, None)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown DINOv2 architecture"):
        create_dinov2("vit_huge_patch14_dinov2", RANDOM_INIT)


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [
        (480, 640, 56),  # 74.67 -> 74: truncated, not rounded
        (640, 480, 56),
        (517, 333, 448),  # 695.6 -> 695
        (333, 517, 448),
        (100, 100, 252),  # a square stays square
        (900, 899, 448),
        (2, 700, 5),  # extreme aspect
        (480, 640, 480),  # the shorter side already at size: no change
        (480, 640, (252, 300)),  # a pair is exact
        (33, 47, (60, 75)),
    ],
)
def test_resized_size_is_torchvision_resize(h: int, w: int, size: int | tuple[int, int]) -> None:
    x = torch.zeros(1, h, w, dtype=torch.uint8)
    out = Resize(size, interpolation=InterpolationMode.NEAREST)(x)
    assert resized_size(h, w, size) == tuple(out.shape[-2:])


def test_preprocess_takes_one_resized_size_per_call() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)  # same aspect: same resized size
    c = rng.integers(0, 256, (640, 480, 3), dtype=np.uint8)
    assert preprocess([a, b], 56).shape == (2, 3, 56, 74)
    assert preprocess([c], 56).shape == (1, 3, 74, 56)
    with pytest.raises(ValueError, match="resized size"):
        preprocess([a, c], 56)
    # already at its resized size: only read and normalised
    d = rng.integers(0, 256, (56, 74, 3), dtype=np.uint8)
    x = torch.from_numpy(d).permute(2, 0, 1)[None].float() * (1.0 / 255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(preprocess([d], 56), (x - mean) / std)
