"""Train the AnomalyCLIP prompt learner on an auxiliary dataset (METHODS.md section 2).

Only the prompts train; CLIP is frozen and the image side runs without gradients.
Loss (official ``train.py``, ``lam = 4``): ``CE(image logits / 0.07, label) + 4 * sum over
the feature layers of focal(P, gt) + dice(P_abn, gt) + dice(P_norm, 1 - gt)`` with ``P``
the per-patch probabilities upsampled bilinearly to the image size. Feature layers: 24
only, as the official ``train.sh`` since 2025-04-13 (``--features_list 24``); the old
four-layer setting is ``--feature-layers 6 12 18 24``.
Adam, lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, 518x518. Checkpoints
``SAVE_DIR/epoch_N.pth`` in the released format ``{"prompt_learner": state_dict}``.

Usage::

    anomaly-inspect train-anomalyclip --data /data/visa --weights-dir weights --save-dir ckpt
    python -m models.anomalyclip.train --data /data/visa --clip weights/open_clip/ViT-L-14-336px.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.anomalyclip.checkpoint import save_prompt_checkpoint
from models.anomalyclip.data import LAYOUTS, AnomalyDataset, discover_samples
from models.anomalyclip.detector import (
    ARCHS,
    CLIP_WEIGHTS_NAME,
    DEFAULT_BACKBONE,
    load_backbone,
    load_prompts,
)
from models.anomalyclip.losses import PIXEL_LOSS_WEIGHT, pixel_loss
from models.anomalyclip.torch_model import (
    TEMPERATURE,
    DpamVisualEncoder,
    PromptLearner,
    patch_probability_maps,
    text_embeddings,
)
from models.base import RANDOM_INIT, WeightsError
from models.weights import weights_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the reference's)."""

    epochs: int = 15
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = 8
    image_size: int = 518
    feature_layers: tuple[int, ...] = (24,)  # official train.sh: --features_list 24
    seed: int = 111
    save_freq: int = 1
    max_steps: int | None = None  # stop early (smoke tests)
    num_workers: int = 0


@dataclass(frozen=True)
class TrainResult:
    """Per-step total losses, per-epoch means and the checkpoints written."""

    step_losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    checkpoints: tuple[Path, ...] = field(default_factory=tuple)


def training_loss(
    clip: Any,
    learner: PromptLearner,
    encoder: DpamVisualEncoder,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its parts (``image``, ``pixel``) as floats.

    Args:
        pixels: ``[B, 3, S, S]`` normalised images; masks ``[B, S, S]`` in {0, 1}; labels ``[B]``.
    """
    with torch.no_grad():
        feats = encoder(pixels)
    text = text_embeddings(clip, learner)  # [2, E], differentiable w.r.t. the prompts
    logits = F.normalize(feats.global_embedding.float(), dim=-1) @ text.T / TEMPERATURE  # [B, 2]
    image_loss = F.cross_entropy(logits, labels)
    size = int(pixels.shape[-1])
    pix = sum(
        (
            pixel_loss(patch_probability_maps(p.float(), text, feats.grid_size, size), masks)
            for p in feats.patch_embeddings
        ),
        start=torch.zeros((), device=pixels.device),
    )
    total = PIXEL_LOSS_WEIGHT * pix + image_loss
    return total, {"image": float(image_loss.detach()), "pixel": float(pix.detach())}


def train(
    *,
    clip: Any,
    learner: PromptLearner,
    dataset: AnomalyDataset,
    config: TrainConfig,
    save_dir: str | Path | None,
    dpam_start: int = 6,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Optimise ``learner`` in place; write ``epoch_N.pth`` every ``save_freq`` epochs (and the last)."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    encoder = DpamVisualEncoder(
        visual=clip.visual, feature_layers=config.feature_layers, dpam_start=dpam_start
    )
    clip.eval().requires_grad_(False)
    learner.to(device).train().requires_grad_(True)
    optimiser = torch.optim.Adam(learner.parameters(), lr=config.learning_rate, betas=config.betas)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps: list[float] = []
    epochs: list[float] = []
    saved: list[Path] = []
    done = False
    for epoch in tqdm(range(config.epochs), desc="epochs", disable=not progress, file=sys.stderr):
        epoch_losses: list[float] = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, file=sys.stderr)
        for batch in bar:
            pixels = batch["pixels"].to(device)
            masks = batch["mask"].to(device)
            labels = batch["label"].to(device)
            loss, parts = training_loss(clip, learner, encoder, pixels, masks, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps.append(float(loss.detach()))
            epoch_losses.append(steps[-1])
            bar.set_postfix(loss=f"{steps[-1]:.4f}", image=f"{parts['image']:.4f}")
            if config.max_steps is not None and len(steps) >= config.max_steps:
                done = True
                break
        epochs.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
        log.info("epoch %d/%d loss %.4f", epoch + 1, config.epochs, epochs[-1])
        last = done or epoch + 1 == config.epochs
        if save_dir is not None and ((epoch + 1) % config.save_freq == 0 or last):
            saved.append(save_prompt_checkpoint(learner, Path(save_dir) / f"epoch_{epoch + 1}.pth"))
        if done:
            break
    learner.eval().requires_grad_(False)
    return TrainResult(step_losses=tuple(steps), epoch_losses=tuple(epochs), checkpoints=tuple(saved))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-inspect train-anomalyclip",
        description="Train AnomalyCLIP's object-agnostic prompts on an auxiliary dataset with masks "
        "(MVTec-AD or VisA layout). Writes SAVE_DIR/epoch_N.pth in the released checkpoint format.",
    )
    p.add_argument("--data", type=Path, required=True, help="dataset root (MVTec-AD or VisA layout)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--split", default="test", help="split to train on (reference: test, it holds the masks)")
    p.add_argument("--save-dir", type=Path, default=Path("checkpoints/anomalyclip"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--clip", type=Path, help="CLIP weights file (OpenAI ViT-L-14-336px.pt)")
    src.add_argument(
        "--random-init", action="store_true", help="random CLIP weights (smoke tests only: useless prompts)"
    )
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where to find the CLIP file")
    p.add_argument("--init", type=Path, help="start from this prompt checkpoint instead of random prompts")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(ARCHS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, help="default: the backbone's (518 for ViT-L-14-336)")
    p.add_argument(
        "--feature-layers",
        type=int,
        nargs="+",
        help="default: the top block (24 for ViT-L, as the official train.sh); 6 12 18 24 = the 2024 setting",
    )
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--save-freq", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input or missing weights)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # our progress lines, not every library's INFO
    arch = ARCHS[args.backbone]
    config = TrainConfig(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        image_size=args.image_size or arch.image_size,
        feature_layers=tuple(args.feature_layers or arch.feature_layers),
        seed=args.seed,
        save_freq=max(1, args.save_freq),
        max_steps=args.max_steps,
        num_workers=args.num_workers,
    )
    try:
        samples = discover_samples(args.data, layout=args.layout, split=args.split)
        if args.random_init:
            clip_src: str | Path = RANDOM_INIT
            log.warning("RANDOM CLIP WEIGHTS: the trained prompts are useless for inspection")
        else:
            clip_src = args.clip or weights_path(CLIP_WEIGHTS_NAME, args.weights_dir)
        bb = load_backbone(clip_src, backbone=args.backbone, device=args.device, seed=args.seed)
        learner, _, _ = load_prompts(args.init or RANDOM_INIT, bb, arch, seed=args.seed)
    except (WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_bad = sum(s.label for s in samples)
    log.info("%d training images (%d anomalous) from %s", len(samples), n_bad, args.data)
    result = train(
        clip=bb.model,
        learner=learner,
        dataset=AnomalyDataset(samples, config.image_size),
        config=config,
        save_dir=args.save_dir,
        dpam_start=arch.dpam_start,
        device=args.device,
        progress=not args.no_progress,
    )
    for path in result.checkpoints:
        log.info("saved %s", path)
    if result.step_losses:
        log.info("loss: first step %.4f, last step %.4f", result.step_losses[0], result.step_losses[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
