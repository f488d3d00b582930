"""Dataset folder layouts for ``anomaly-inspect eval``: MVTec-AD, VisA and plain folders.

A dataset is read into :class:`Category` objects: the good images that may serve as
golden references and for calibration (``train_good``), and the test images with
their label and, where known, their ground-truth mask.

Layouts:

``mvtec``
    ``ROOT/<cat>/train/good/*``, ``ROOT/<cat>/test/<defect>/*`` (``good`` is normal),
    ``ROOT/<cat>/ground_truth/<defect>/<stem>_mask.png``. ``ROOT`` may be one category.
``visa``
    ``ROOT/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``
    (``split`` train/test, ``label`` normal/anomaly, paths relative to ``ROOT``), as
    VisA is distributed. Every defect is of type ``anomaly``.
``folder``
    ``ROOT/good/*``, ``ROOT/defect/*`` (or ``ROOT/defect/<type>/*``), optional
    ``ROOT/ground_truth/`` mirroring ``defect/`` (mask ``<stem>.png`` or ``<stem>_mask.png``),
    optional ``ROOT/golden/*`` (good images used ONLY as references / for calibration).
    Without ``golden/`` the good images are split (see :func:`split_golden`).
    ``ROOT`` may also hold several such folders, one per category.
``records``
    ``ROOT`` is the service's ``ZSI_DATA_DIR``: the inspection records an operator reviewed
    (``PUT /inspections/{id}/review``) whose image was kept (``keep_images``), one category
    per product, ``good`` verdicts normal and ``defect`` verdicts anomalous, no masks. The
    records database is ``ZSI_DATABASE_URL`` (``database_url``), else the SQLite file under
    ``ROOT``. Reviewed records of the same image bytes count once (the latest verdict). The
    good images are split like a folder without ``golden/`` (see :func:`split_golden`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LAYOUTS = ("mvtec", "visa", "folder", "records")
VISA_CSV = Path("split_csv") / "1cls.csv"


class DatasetError(ValueError):
    """The dataset folder does not fit the layout, or a category is unknown."""


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 1 = anomalous; ``mask`` ``None`` = not known (or good)."""

    image: Path
    label: int
    defect: str
    mask: Path | None = None


@dataclass(frozen=True)
class Category:
    """One product category of a dataset.

    ``golden_is_split``: the good images of ``train_good`` were taken out of the test
    good images by :func:`split_golden` (folder layout without ``golden/``).
    """

    name: str
    train_good: tuple[Path, ...]
    test: tuple[Sample, ...]
    golden_is_split: bool = False
    notes: tuple[str, ...] = field(default=())


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(gt_dir: Path, image: Path) -> Path | None:
    for cand in (gt_dir / f"{image.stem}_mask.png", gt_dir / f"{image.stem}.png"):
        if cand.is_file():
            return cand
    return None


def _mvtec_category(cat_dir: Path) -> Category:
    test: list[Sample] = []
    test_dir = cat_dir / "test"
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        good = defect_dir.name == "good"
        for img in _images(defect_dir):
            mask = None if good else _mask_for(cat_dir / "ground_truth" / defect_dir.name, img)
            test.append(Sample(img, 0 if good else 1, defect_dir.name, mask))
    return Category(cat_dir.name, tuple(_images(cat_dir / "train" / "good")), tuple(test))


def _is_mvtec_category(d: Path) -> bool:
    return (d / "test").is_dir() and (d / "train").is_dir()


def _read_mvtec(root: Path) -> list[Category]:
    if _is_mvtec_category(root):
        return [_mvtec_category(root)]
    return [_mvtec_category(d) for d in sorted(root.iterdir()) if d.is_dir() and _is_mvtec_category(d)]


def _read_visa(root: Path) -> list[Category]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        return []
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Sample]] = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {', '.join(sorted(missing))}")
        for row in reader:
            obj, split, label = row["object"], row["split"].strip(), row["label"].strip()
            if label not in ("normal", "anomaly"):
                raise DatasetError(f"{csv_path}: label must be normal or anomaly, got {label!r}")
            image = root / row["image"]
            if split == "train":
                if label == "normal":
                    train.setdefault(obj, []).append(image)
            elif split == "test":
                anomalous = label == "anomaly"
                mask_rel = (row.get("mask") or "").strip()
                mask = root / mask_rel if anomalous and mask_rel else None
                test.setdefault(obj, []).append(Sample(image, int(anomalous), label, mask))
    names = sorted(set(train) | set(test))
    return [Category(n, tuple(sorted(train.get(n, []))), tuple(test.get(n, []))) for n in names]


def _folder_category(d: Path) -> Category:
    test: list[Sample] = [Sample(p, 0, "good") for p in _images(d / "good")]
    defect_root = d / "defect"
    gt_root = d / "ground_truth"
    for img in _images(defect_root):
        test.append(Sample(img, 1, "defect", _mask_for(gt_root, img)))
    for sub in sorted(s for s in defect_root.iterdir() if s.is_dir()) if defect_root.is_dir() else []:
        for img in _images(sub):
            test.append(Sample(img, 1, sub.name, _mask_for(gt_root / sub.name, img)))
    golden = _images(d / "golden")
    return Category(d.name, tuple(golden), tuple(test), golden_is_split=not golden)


def _is_folder_category(d: Path) -> bool:
    return (d / "good").is_dir() or (d / "defect").is_dir()


def _read_folder(root: Path) -> list[Category]:
    if _is_folder_category(root):
        return [_folder_category(root)]
    return [_folder_category(d) for d in sorted(root.iterdir()) if d.is_dir() and _is_folder_category(d)]


def _read_records(root: Path, database_url: str | None) -> list[Category]:
    from sqlalchemy.exc import SQLAlchemyError

    from service.records.db import default_url, make_engine, safe_url
    from service.records.labelled import LabelledRecord, reviewed_products, reviewed_records

    if database_url is None and not (root / "records" / "inspections.db").is_file():
        raise DatasetError(
            f"no records database under {root} (records/inspections.db): give the service's ZSI_DATA_DIR, "
            "or its ZSI_DATABASE_URL with --database-url"
        )
    url = database_url or default_url(root)
    engine = make_engine(url)
    cats: list[Category] = []
    try:
        for product in reviewed_products(engine):
            latest: dict[str, LabelledRecord] = {}
            missing = 0
            recs = reviewed_records(product, data_dir=root, engine=engine)
            for r in sorted(recs, key=lambda r: (r.reviewed_at or r.created_at, r.id)):
                if r.image_path is None:
                    missing += 1
                    continue
                latest[r.image_sha256 or str(r.image_path)] = r  # the same bytes: the latest verdict
            if not latest:
                continue
            notes = [f"{len(latest)} reviewed records with a kept image (records layout)"]
            if missing:
                notes.append(f"{missing} reviewed records skipped: their image was not kept or was removed")
            if len(recs) - missing > len(latest):
                notes.append(
                    f"{len(recs) - missing - len(latest)} repeated images counted once (latest verdict)"
                )
            test = tuple(
                Sample(r.image_path, r.label, r.verdict)
                for r in sorted(latest.values(), key=lambda r: r.id)
                if r.image_path is not None
            )
            cats.append(Category(product, (), test, golden_is_split=True, notes=tuple(notes)))
    except SQLAlchemyError as exc:
        raise DatasetError(
            f"records database {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        engine.dispose()
    return cats


def detect_layout(root: str | Path) -> str:
    """``visa`` when ``split_csv/1cls.csv`` exists, ``mvtec`` when ``train/`` + ``test/`` do
    (in ROOT or its sub-folders), else ``folder``."""
    r = Path(root)
    if (r / VISA_CSV).is_file():
        return "visa"
    if _is_mvtec_category(r) or any(d.is_dir() and _is_mvtec_category(d) for d in r.iterdir()):
        return "mvtec"
    return "folder"


def read_dataset(
    root: str | Path,
    layout: str | None = None,
    categories: list[str] | None = None,
    *,
    database_url: str | None = None,
) -> list[Category]:
    """The categories of a dataset folder (all, or those named), in name order.

    ``database_url``: the records database of the ``records`` layout (None: the SQLite
    file under ``root``).

    Raises:
        DatasetError: unknown layout, no category found, an unknown category name, or a
            category without any test image.
    """
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"dataset folder not found: {r}")
    layout = layout or detect_layout(r)
    if layout not in LAYOUTS:
        raise DatasetError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "records":
        found = _read_records(r, database_url)
    else:
        found = {"mvtec": _read_mvtec, "visa": _read_visa, "folder": _read_folder}[layout](r)
    if not found:
        raise DatasetError(f"no category in the {layout} layout found under {r}; see docs/evaluation.md")
    if categories:
        by_name = {c.name: c for c in found}
        unknown = [c for c in categories if c not in by_name]
        if unknown:
            raise DatasetError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                f"found: {', '.join(sorted(by_name))}"
            )
        found = [by_name[c] for c in categories]
    for c in found:
        if not c.test:
            raise DatasetError(f"category {c.name!r} has no test image under {r}")
    return found
