"""The shared checkpoint reader: wrappers, prefixes, TorchScript archives, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import WeightsError
from models.checkpoints import read_state_dict


def _state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2)}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 15},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {"module": sd}},
    ],
)
def test_wrappers_and_prefix_are_removed(tmp_path: Path, wrap) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(_state()), path)
    got = read_state_dict(path)
    assert set(got) == set(_state())
    assert all(torch.equal(got[k], v) for k, v in _state().items())


def test_torchscript_archive_gives_its_state_dict(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    got = read_state_dict(path)
    assert set(got) == {"weight", "bias"} and torch.equal(got["weight"], module.weight.detach())


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match=r"list\.pth.*does not hold a state dict"):
        read_state_dict(path)
