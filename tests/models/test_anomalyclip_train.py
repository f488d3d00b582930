"""AnomalyCLIP training: synthetic datasets, dataset discovery, loss falls, CLI, checkpoint format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.anomalyclip.checkpoint import load_prompt_learner
from models.anomalyclip.data import AnomalyDataset, discover_samples
from models.anomalyclip.detector import load_prompts
from models.anomalyclip.synthetic import make_synthetic_dataset
from models.anomalyclip.train import TrainConfig, main, train
from models.base import RANDOM_INIT
from tests.models._anomalyclip_helpers import TINY_ARCH, one_thread, tiny_backbone


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_synthetic_dataset_layouts_are_discovered(tmp_path: Path, layout: str) -> None:
    # given a synthetic dataset in either layout
    root = make_synthetic_dataset(
        tmp_path / layout, layout=layout, categories=("a", "b"), n_test_good=2, n_test_bad=3, size=32
    )
    # when discovered (test split, as the reference trains on it)
    samples = discover_samples(root)
    # then every image is found with its label and its mask marks the defect
    assert len(samples) == 2 * (2 + 3)
    assert {s.category for s in samples} == {"a", "b"}
    bad = [s for s in samples if s.label == 1]
    assert len(bad) == 6 and all(s.mask is not None for s in bad)
    assert all(s.mask is None for s in samples if s.label == 0)
    for s in bad:
        mask = np.asarray(Image.open(s.mask)) > 0
        assert 0 < mask.mean() < 0.5
        img = np.asarray(Image.open(s.image).convert("RGB")).astype(float)
        inside, outside = img[mask].mean(axis=0), img[~mask].mean(axis=0)
        assert np.abs(inside - outside).max() > 30  # the defect is visible where the mask says
    item = AnomalyDataset(samples, 28)[samples.index(bad[0])]
    assert item["pixels"].shape == (3, 28, 28) and item["mask"].shape == (28, 28)
    assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    assert int(item["label"]) == 1


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no 'test' images"):
        discover_samples(tmp_path)


def test_training_loss_falls_and_checkpoint_loads_strictly(tmp_path: Path) -> None:
    # given the tiny random model, fresh prompts and a synthetic dataset
    root = make_synthetic_dataset(tmp_path / "data", n_test_good=4, n_test_bad=8, size=48, seed=1)
    bb = tiny_backbone()
    learner, _, _ = load_prompts(RANDOM_INIT, bb, TINY_ARCH, seed=0)
    frozen_before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    config = TrainConfig(epochs=4, batch_size=4, image_size=70, feature_layers=(6, 7), seed=0)
    # when trained with the reference's loss, optimiser and settings (Adam 1e-3, betas 0.5/0.999)
    result = train(
        clip=bb.model,
        learner=learner,
        dataset=AnomalyDataset(discover_samples(root), 70),
        config=config,
        save_dir=tmp_path / "ck",
        progress=False,
    )
    # then the loss falls
    assert len(result.step_losses) == 12
    assert result.epoch_losses[-1] < 0.9 * result.epoch_losses[0]
    assert np.mean(result.step_losses[-3:]) < np.mean(result.step_losses[:3])
    # only the prompts changed
    after = bb.model.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    # and each epoch wrote a released-format checkpoint that loads strictly
    assert [p.name for p in result.checkpoints] == [f"epoch_{i}.pth" for i in range(1, 5)]
    loaded = load_prompt_learner(result.checkpoints[-1], ctx_dim=48, context_length=77, arch=TINY_ARCH)
    assert torch.equal(loaded.ctx_neg, learner.ctx_neg.detach())


def test_cli_trains_and_saves(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", layout="visa", n_test_good=2, n_test_bad=2, size=32)
    argv = [
        "--data",
        str(root),
        "--random-init",
        "--backbone",
        "tiny-vitl-test",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--save-dir",
        str(tmp_path / "ck"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch_1.pth", "epoch_2.pth"]
    blob = torch.load(str(tmp_path / "ck" / "epoch_2.pth"), weights_only=True)
    assert list(blob) == ["prompt_learner"]


def test_cli_reports_missing_clip_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_synthetic_dataset(tmp_path / "data", n_test_good=1, n_test_bad=1, size=32)
    code = main(["--data", str(root), "--weights-dir", str(tmp_path / "w"), "--backbone", "tiny-vitl-test"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ViT-L-14-336px.pt" in err and "anomaly-inspect weights fetch openclip-vit-l-14-336-openai" in err
