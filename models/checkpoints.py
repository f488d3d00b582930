"""Reading checkpoint files safely and loading them strictly: one reader for every method's weights.

``torch.load(weights_only=True)`` only (no arbitrary unpickling); an OpenAI
TorchScript archive is read with ``torch.jit.load``; a ``.safetensors`` file with
safetensors. Wrappers such as
``{"model": sd}`` / ``{"state_dict": sd}`` and a ``module.`` prefix (DataParallel)
are removed. Every failure is a :class:`models.base.WeightsError` naming the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.base import WeightsError

_WRAPPERS = ("state_dict", "model", "module")
_TORCHSCRIPT_META = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def unwrap_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Remove ``{"model"|"state_dict"|"module": sd}`` wrappers and a common ``module.`` prefix."""
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for wrapper in _WRAPPERS:
            if isinstance(state.get(wrapper), dict):  # a real state dict holds tensors, not dicts
                state, unwrapped = state[wrapper], True
                break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (tensors on CPU): ``torch.save``, TorchScript or safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    try:
        if _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for meta in _TORCHSCRIPT_META:
                state.pop(meta, None)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or unreadable file
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"cannot read weights file {path}: it does not hold a state dict")
    return unwrap_state_dict(state)


def load_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str, *, hint: str = ""
) -> None:
    """Load ``state`` into ``model``: every key present, none extra, same shapes.

    Otherwise a :class:`WeightsError` that says how the file differs (``hint`` is added
    after the architecture, e.g. which file format is expected).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} "
                f"vs model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise WeightsError(
            f"weights file {source} does not fit architecture {arch}{hint}: " + "; ".join(parts)
        )
    model.load_state_dict(dict(state), strict=True)
