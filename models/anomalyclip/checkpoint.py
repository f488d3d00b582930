"""AnomalyCLIP prompt checkpoints in the released format ``{"prompt_learner": state_dict}``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from models.anomalyclip.torch_model import AnomalyClipArch, PromptLearner
from models.base import WeightsError

CHECKPOINT_KEY = "prompt_learner"


def read_prompt_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The prompt learner state dict of a released-format file (``torch.load(weights_only=True)``)."""
    p = Path(path)
    try:
        blob = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read AnomalyCLIP prompt checkpoint {p}: {exc}") from exc
    if not isinstance(blob, dict) or CHECKPOINT_KEY not in blob or not isinstance(blob[CHECKPOINT_KEY], dict):
        raise WeightsError(
            f"{p} is not an AnomalyCLIP prompt checkpoint: expected a dict with key {CHECKPOINT_KEY!r}"
        )
    return dict(blob[CHECKPOINT_KEY])


def load_prompt_learner(
    path: str | Path, *, ctx_dim: int, context_length: int, arch: AnomalyClipArch
) -> PromptLearner:
    """Read ``path`` and load it strictly; :class:`WeightsError` naming the file on any mismatch."""
    state = read_prompt_checkpoint(path)
    try:
        return PromptLearner.from_state_dict(
            state,
            ctx_dim=ctx_dim,
            context_length=context_length,
            n_ctx=arch.n_ctx,
            deep_prompt_depth=arch.deep_prompt_depth,
            deep_prompt_len=arch.deep_prompt_len,
            source=f"prompt checkpoint {path}",
        )
    except ValueError as exc:
        raise WeightsError(str(exc)) from exc


def save_prompt_checkpoint(learner: PromptLearner, path: str | Path) -> Path:
    """Write ``{"prompt_learner": state_dict}`` (the reference's format) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    state = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
    torch.save({CHECKPOINT_KEY: state}, str(tmp))
    tmp.replace(p)
    return p


def learner_digest(learner: PromptLearner) -> str:
    """Content hash of a prompt learner (16 hex chars): key names, shapes and float32/int64 values.

    Independent of the file's serialisation and of fp16/fp32 storage of the same values.
    """
    h = hashlib.sha256()
    for key, value in sorted(learner.state_dict().items()):
        t = value.detach().cpu()
        t = t.to(torch.int64) if not t.is_floating_point() else t.to(torch.float32)
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
