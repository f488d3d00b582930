"""A straightforward WinCLIP / WinCLIP+ written from METHODS.md section 1, for parity tests.

Deliberately naive: prompts built by loops, the full 77-token text encoder,
open_clip's own image forward for the CLS and patch tokens, each window cropped
by token selection and run ALONE (for all images of a batch at once), aggregation
by Python loops in float64.
Shares no code with models/winclip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

PROMPTS = json.loads((Path(__file__).resolve().parents[2] / "prompts" / "winclip.json").read_text())
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    out = []
    for img in images:
        t = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        out.append(F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    return (torch.cat(out) - MEAN) / STD


@torch.no_grad()
def text_prototypes(clip, model_name: str, object_name: str) -> torch.Tensor:
    tok = open_clip.get_tokenizer(model_name)
    protos = []
    for states in (PROMPTS["normal_states"], PROMPTS["anomalous_states"]):
        prompts = []
        for state in states:
            for template in PROMPTS["templates"]:
                prompts.append(template.format(state.format(object_name)))
        protos.append(clip.encode_text(tok(prompts)).mean(dim=0))
    return torch.stack(protos)


def score(f: torch.Tensor, protos: torch.Tensor) -> float:
    f = f.double()
    cos = [float(F.cosine_similarity(f, protos[i].double(), dim=0)) for i in range(2)]
    e = [np.exp(c / 0.07) for c in cos]
    return e[1] / (e[0] + e[1])


def windows(grid: int, k: int) -> list[list[int]]:
    return [
        [(r + i) * grid + (c + j) for i in range(k) for j in range(k)]
        for r in range(grid - k + 1)
        for c in range(grid - k + 1)
    ]


@torch.no_grad()
def encode(clip, x: torch.Tensor, scales=(2, 3)):
    v = clip.visual
    v.output_tokens = True
    cls_emb, patch_tokens = v(x)  # open_clip's own forward
    v.output_tokens = False
    grid = v.grid_size[0]
    t = v.conv1(x).reshape(x.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
    t = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), t], dim=1) + v.positional_embedding
    win = {}
    # Hundreds of tiny passes: on one thread. With several, OpenMP threads spin at every
    # small op and a shared, loaded machine makes that loop 5x slower in CPU and wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in scales:
            embs = []
            for patches in windows(grid, k):
                seq = t[:, [0] + [p + 1 for p in patches]]  # this window alone, all images: [B, 1+k*k, D]
                h = v.ln_post(v.transformer(v.ln_pre(seq)))
                embs.append(h[:, 0] @ v.proj)
            win[k] = torch.stack(embs, dim=1)  # [B, W, E]
    finally:
        torch.set_num_threads(threads)
    return cls_emb, patch_tokens, win


def harmonic(scores: list[float], grid: int, k: int) -> np.ndarray:
    wins = windows(grid, k)
    out = np.zeros(grid * grid)
    for p in range(grid * grid):
        vals = [scores[w] for w, ps in enumerate(wins) if p in ps]
        out[p] = 0.0 if min(vals) == 0 else len(vals) / sum(1.0 / s for s in vals)
    return out.reshape(grid, grid)


def va(x: torch.Tensor, memory: torch.Tensor) -> float:
    cos = F.cosine_similarity(x.double()[None], memory.double(), dim=1)
    return float(((1 - cos) / 2).min())


@torch.no_grad()
def predict_encoded(
    protos: torch.Tensor,
    encoded,
    index: int,
    out_shape: tuple[int, int],
    grid: int,
    memory: list[int] | None = None,
):
    """(score, map of size ``out_shape``) for image ``index`` of an :func:`encode` batch.

    ``memory``: indices, in the same batch, of the normal images of the few-shot memory
    (``None``: zero-shot). Lets one encoding serve several checks.
    """
    cls_emb, patches, win = encoded
    s_img = score(cls_emb[index], protos)
    inv = np.full((grid, grid), 1.0 / s_img)
    for k in (2, 3):
        m = harmonic([score(win[k][index, w], protos) for w in range(win[k].shape[1])], grid, k)
        inv = inv + np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.inf)
    m0 = 3.0 / inv
    final_map, final_score = m0, s_img
    if memory:
        mem_p = patches[memory].reshape(-1, patches.shape[-1])
        fs = [np.array([va(patches[index, p], mem_p) for p in range(grid * grid)]).reshape(grid, grid)]
        for k in (2, 3):
            mem = win[k][memory].reshape(-1, win[k].shape[-1])
            fs.append(harmonic([va(win[k][index, w], mem) for w in range(win[k].shape[1])], grid, k))
        m_fs = np.mean(fs, axis=0)
        final_map = (m0 + m_fs) / 2
        final_score = (s_img + m_fs.max()) / 2
    up = F.interpolate(
        torch.tensor(final_map, dtype=torch.float32)[None, None],
        size=out_shape,
        mode="bilinear",
        align_corners=False,
    )
    return final_score, up[0, 0].numpy()


def image_size(clip) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, tuple) else size)


@torch.no_grad()
def predict(
    clip, model_name: str, image: np.ndarray, object_name: str, references: list[np.ndarray] | None = None
):
    """Return (score, map at input resolution) per METHODS.md."""
    protos = text_prototypes(clip, model_name, object_name)
    images = [image, *(references or [])]
    encoded = encode(clip, pixels(images, image_size(clip)))
    memory = list(range(1, len(images))) or None
    return predict_encoded(protos, encoded, 0, image.shape[:2], clip.visual.grid_size[0], memory)
