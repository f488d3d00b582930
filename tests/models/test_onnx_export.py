"""ONNX export of the WinCLIP visual tower: parity with PyTorch on the tiny model (<= 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.winclip.encoder import VisualTower

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from models.onnx_export import (
    ExportableTower,
    OnnxVisualTower,
    export_visual_tower,
    onnx_fingerprint,
    onnx_tower_for,
    tower_fingerprint,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_tower() -> VisualTower:
    torch.manual_seed(0)
    det = models.load_tiny_detector("winclip")
    return VisualTower(det.clip.visual).eval()


@pytest.fixture(scope="module")
def exported(tiny_tower: VisualTower, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_visual_tower(tiny_tower, tmp_path_factory.mktemp("onnx") / "tower.onnx")


# (N, L) as WinCLIP uses them on the tiny model (80 px, patch 16: 5x5 grid): full images
# (1 + 25 tokens), all k=2 windows of 2 images (2 x 16 windows of 1 + 4), k=3 (2 x 9 of 1 + 9)
SHAPES = [(2, 26), (32, 5), (18, 10), (1, 2), (3, 26)]


def test_exportable_tower_is_the_same_function(tiny_tower: VisualTower) -> None:
    x = torch.randn(4, 10, tiny_tower.ln_pre.weight.shape[0])
    with torch.no_grad():
        a, b = tiny_tower(x)
        c, d = ExportableTower(tiny_tower)(x)
    assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, d, atol=1e-5)


def test_onnx_matches_pytorch_for_every_sequence_shape(tiny_tower: VisualTower, exported: Path) -> None:
    """Given the tiny tower exported once, when run on any N and L, then ONNX == PyTorch within 1e-4."""
    onnx_tower = OnnxVisualTower(exported, device="cpu")
    width = tiny_tower.ln_pre.weight.shape[0]
    gen = torch.Generator().manual_seed(1)
    for n, length in SHAPES:
        x = torch.randn(n, length, width, generator=gen)
        with torch.no_grad():
            ref_pooled, ref_tokens = tiny_tower(x)
        pooled, tokens = onnx_tower(x)
        assert pooled.shape == ref_pooled.shape and tokens.shape == ref_tokens.shape
        assert pooled.dtype == torch.float32 and tokens.device == x.device
        diff = max((pooled - ref_pooled).abs().max().item(), (tokens - ref_tokens).abs().max().item())
        assert diff <= TOL, f"N={n} L={length}: max abs diff {diff:.2e}"


def test_export_records_the_weights_fingerprint(tiny_tower: VisualTower, exported: Path) -> None:
    assert onnx_fingerprint(exported) == tower_fingerprint(tiny_tower)


def test_detector_with_onnx_backend_matches_torch(tmp_path: Path) -> None:
    """The WinCLIP detector on the ONNX tower gives the torch detector's scores and maps."""
    img = np.random.default_rng(3).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    ref_img = np.random.default_rng(4).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    torch.manual_seed(11)
    det_torch = models.load_tiny_detector("winclip")
    torch.manual_seed(11)
    det_onnx = models.load_tiny_detector("winclip", tower_backend="onnx", onnx_path=tmp_path / "t.onnx")
    assert (tmp_path / "t.onnx").is_file()
    assert det_onnx.describe()["backend"] == "onnx"
    for refs in (None, "few-shot"):
        r_t = det_torch.encode_references([ref_img]) if refs else None
        r_o = det_onnx.encode_references([ref_img]) if refs else None
        a = det_torch.predict(img, object_name="bottle", references=r_t)
        b = det_onnx.predict(img, object_name="bottle", references=r_o)
        assert abs(a.score - b.score) <= TOL
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= TOL


def test_stale_export_is_replaced(tiny_tower: VisualTower, tmp_path: Path) -> None:
    path = tmp_path / "t.onnx"
    other = VisualTower(models.load_tiny_detector("winclip").clip.visual).eval()
    with torch.no_grad():  # random-init models are seeded: make this one differ
        other.ln_post.weight.add_(0.5)
    export_visual_tower(other, path)
    assert onnx_fingerprint(path) != tower_fingerprint(tiny_tower)
    onnx_tower_for(tiny_tower, None, device="cpu", onnx_path=path)
    assert onnx_fingerprint(path) == tower_fingerprint(tiny_tower)


def test_default_location_is_a_cache_keyed_by_weights(
    tiny_tower: VisualTower, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    t = onnx_tower_for(tiny_tower, None, device="cpu")
    assert t.path.parent == tmp_path / "zeroshot-inspect" / "onnx"
    assert tower_fingerprint(tiny_tower) in t.path.name
    assert t.providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_cuda_provider_parity(tiny_tower: VisualTower, exported: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = OnnxVisualTower(exported, device="cuda")
    if "CUDAExecutionProvider" not in t.providers:
        pytest.skip("onnxruntime-gpu not installed")
    x = torch.randn(8, 26, tiny_tower.ln_pre.weight.shape[0])
    with torch.no_grad():
        ref, _ = tiny_tower(x)
    got, _ = t(x.cuda())
    assert got.device.type == "cuda"
    assert (got.cpu() - ref).abs().max().item() <= TOL
