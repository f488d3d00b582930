"""Weights loading: local checkpoint files, clear errors, no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import WeightsError
from models.clip_backbone import create_clip


def test_saved_state_dict_loads_and_reproduces_results(tmp_path: Path) -> None:
    torch.manual_seed(7)
    det = models.load_tiny_detector("winclip")
    ckpt = tmp_path / "tiny.pt"
    torch.save(det.clip.state_dict(), ckpt)
    again = models.load_detector("winclip", weights=ckpt, backbone="tiny-vit-test")
    assert again.random_weights is False and again.weights_tag == "tiny.pt"
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a, b = det.predict(img), again.predict(img)
    assert a.score == pytest.approx(b.score, abs=1e-6)
    assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-6


def test_wrapped_state_dict_is_accepted(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = create_clip("tiny-vit-test", models.RANDOM_INIT, pretrained_tag=None).model
    ckpt = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    assert models.load_detector("winclip", weights=ckpt, backbone="tiny-vit-test").weights_tag == "wrapped.pt"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"not found: .*nope\.pt.*anomaly-inspect weights fetch"):
        models.load_detector("winclip", weights=tmp_path / "nope.pt", backbone="tiny-vit-test")


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    model = create_clip("tiny-vit-test", models.RANDOM_INIT, pretrained_tag=None).model
    state = model.state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    ckpt = tmp_path / "other.pt"
    torch.save(state, ckpt)
    with pytest.raises(WeightsError, match=r"does not fit architecture tiny-vit-test.*visual\.proj"):
        models.load_detector("winclip", weights=ckpt, backbone="tiny-vit-test")


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "garbage.pt"
    ckpt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        models.load_detector("winclip", weights=ckpt, backbone="tiny-vit-test")


def test_missing_weights_dir_lists_names_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        models.load_detector_from_dir("winclip", tmp_path)
    msg = str(info.value)
    assert "openclip-vit-b-16-plus-240-laion400m_e31" in msg
    assert f"anomaly-inspect weights fetch openclip-vit-b-16-plus-240-laion400m_e31 --dir {tmp_path}" in msg


def test_official_tag_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # HF_HUB_OFFLINE makes the hub client refuse at once: nothing is downloaded.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(WeightsError, match="could not obtain the official weights"):
        create_clip("tiny-vit-test", None, pretrained_tag="laion400m_e31")
    with pytest.raises(
        WeightsError, match="could not obtain the official weights ViT-B-16-plus-240/laion400m_e31"
    ):
        create_clip("ViT-B-16-plus-240", None, pretrained_tag="laion400m_e31", device="meta")


def test_random_init_is_labelled_and_identical_across_builds() -> None:
    """Two processes in demo mode share one model key, so they must hold the same weights."""
    torch.manual_seed(1)
    a = models.load_tiny_detector("winclip")
    torch.manual_seed(2)
    b = models.load_tiny_detector("winclip")
    assert a.random_weights and a.weights_tag == models.RANDOM_INIT and a.model_key == b.model_key
    for (name, x), (_, y) in zip(a.clip.state_dict().items(), b.clip.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    # the global RNG stream is left alone
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    models.load_tiny_detector("winclip")
    assert torch.equal(torch.rand(1), expected)
