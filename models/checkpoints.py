"""Reading checkpoint files safely: one reader for every method's weights.

``torch.load(weights_only=True)`` only (no arbitrary unpickling); an OpenAI
TorchScript archive is read with ``torch.jit.load``. Wrappers such as
``{"model": sd}`` / ``{"state_dict": sd}`` and a ``module.`` prefix (DataParallel)
are removed. Every failure is a :class:`models.base.WeightsError` naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

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
    """The state dict stored in ``path`` (tensors on CPU)."""
    path = Path(path)
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
