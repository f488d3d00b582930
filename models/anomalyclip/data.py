"""Auxiliary training data for AnomalyCLIP: MVTec-AD and VisA folder layouts.

The reference trains on the TEST split of the auxiliary dataset (its ``Dataset``
reads ``meta.json['test']``): that split holds the anomalous images and masks.
Layouts recognised (``layout="auto"`` picks the first that fits):

- ``visa-csv``: ``ROOT/split_csv/1cls.csv`` with columns object, split, label, image, mask;
- ``visa``: raw VisA, ``ROOT/<cat>/Data/Images/{Normal,Anomaly}`` + ``Data/Masks/Anomaly``
  (no split: every image is used);
- ``mvtec``: ``ROOT/<cat>/<split>/<defect>/*`` + ``ROOT/<cat>/ground_truth/<defect>/<stem>_mask.png``
  (or ``<stem>.png``); ``good`` is normal. ``ROOT`` may also be a single category.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.clip_backbone import OPENAI_MEAN, OPENAI_STD, pil_resize, preprocess_pil

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
LAYOUTS = ("auto", "mvtec", "visa", "visa-csv")


@dataclass(frozen=True)
class Sample:
    """One training image: path, mask path (``None`` = all normal), label 0/1, category."""

    image: Path
    mask: Path | None
    label: int
    category: str


def _images(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )


def _mvtec_category(cat_dir: Path, split: str) -> list[Sample]:
    out: list[Sample] = []
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        return out
    for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        normal = defect_dir.name == "good"
        for img in _images(defect_dir):
            mask = None
            if not normal:
                gt = cat_dir / "ground_truth" / defect_dir.name
                for cand in (gt / f"{img.stem}_mask.png", gt / f"{img.stem}.png"):
                    if cand.is_file():
                        mask = cand
                        break
            out.append(Sample(img, mask, 0 if normal else 1, cat_dir.name))
    return out


def discover_samples(root: str | Path, *, layout: str = "auto", split: str = "test") -> list[Sample]:
    """All samples of a dataset folder; a clear ``FileNotFoundError`` when none is found."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    csv_path = root / "split_csv" / "1cls.csv"
    samples: list[Sample] = []
    if layout in ("auto", "visa-csv") and csv_path.is_file():
        with csv_path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] != split:
                    continue
                anomalous = row["label"] == "anomaly"
                mask = root / row["mask"] if anomalous and row.get("mask") else None
                samples.append(Sample(root / row["image"], mask, int(anomalous), row["object"]))
    elif layout in ("auto", "visa") and any((d / "Data" / "Images").is_dir() for d in root.iterdir()):
        for cat in sorted(d for d in root.iterdir() if (d / "Data" / "Images").is_dir()):
            for img in _images(cat / "Data" / "Images" / "Normal"):
                samples.append(Sample(img, None, 0, cat.name))
            for img in _images(cat / "Data" / "Images" / "Anomaly"):
                mask = cat / "Data" / "Masks" / "Anomaly" / f"{img.stem}.png"
                samples.append(Sample(img, mask if mask.is_file() else None, 1, cat.name))
    elif layout in ("auto", "mvtec"):
        cats = [root] if (root / split).is_dir() else sorted(d for d in root.iterdir() if d.is_dir())
        for cat in cats:
            samples.extend(_mvtec_category(cat, split))
    if not samples:
        raise FileNotFoundError(
            f"no {split!r} images found under {root} (layout {layout!r}); see docs/anomalyclip.md"
        )
    return samples


class AnomalyDataset(torch.utils.data.Dataset):
    """Images and masks at the training resolution.

    As the reference's ``get_transform`` + ``Dataset``: ``pixels`` float32 ``[3, S, S]``
    (PIL bicubic resize of the uint8 image, ``/ 255``, OpenAI mean/std: the detector's
    :func:`models.clip_backbone.preprocess_pil`); ``mask`` float32 ``[S, S]`` in {0, 1}
    (the 0/255 mask, PIL bilinear resize, ``/ 255``, ``> 0.5``); ``label`` int64
    (0 normal, 1 anomalous).
    """

    def __init__(self, samples: list[Sample], image_size: int) -> None:
        self.samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        img = np.asarray(Image.open(s.image).convert("RGB"))
        pixels = preprocess_pil([img], self.image_size, OPENAI_MEAN, OPENAI_STD)[0]  # [3, S, S]
        if s.label and s.mask is not None:
            m = (np.asarray(Image.open(s.mask).convert("L")) > 0).astype(np.uint8) * 255  # [H, W] 0/255
            m = pil_resize(m, self.image_size, self.image_size, "bilinear")  # [S, S] uint8
            mask = (torch.tensor(m, dtype=torch.float32) / 255.0 > 0.5).float()
        else:
            mask = torch.zeros(self.image_size, self.image_size)
        return {"pixels": pixels, "mask": mask, "label": torch.tensor(s.label, dtype=torch.long)}
