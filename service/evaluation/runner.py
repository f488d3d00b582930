"""``anomaly-inspect eval``: run one detector over a dataset, cache per image, compute the metrics.

How a run goes, per category:

1. Split (:func:`split_category`): with ``references = N``, N golden images are drawn
   from the category's train good images by ``numpy.random.default_rng(seed)
   .permutation`` of the sorted file list (seed 0 unless ``--seed``); the next
   ``calibration_images`` of that permutation are the calibration set. Test images are
   never references and never calibration images, and no image is scored against itself.
2. Score every test and calibration image (batches, progress bar with ETA); each
   result (image score + anomaly map resized to ``map_size x map_size``) is written to
   ``OUT/cache/`` under a key of method, model, weights, detector settings, prompt
   digest, reference images, map size and the image file's SHA-256. A run that is
   interrupted resumes: cached images are not scored again.
3. Metrics (``models.metrics``): image AUROC, pixel AUROC and AUPRO@0.3 (maps and
   masks at ``map_size``; masks resized nearest), image F1-max, and the threshold
   calibrated on the calibration scores (``models.calibration``, target false-reject
   rate, conformal bound) with the false-reject rate on the TEST good images and the
   recall on the test defect images at that threshold.

Undefined figures (one class only, no masks, too few calibration images) are ``None``
in ``report.json`` with a reason, "n/a" in ``report.md``; they never stop the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.calibration import CalibrationError, calibrate_threshold, min_good_images
from models.metrics import aupro, f1_max, false_reject_rate, image_auroc, pixel_auroc, recall_at
from service.evaluation.datasets import Category, Sample, read_dataset
from service.imaging import as_stored

if TYPE_CHECKING:
    from models import Detector, ReferenceSet
    from prompts import ProductRecipe

CACHE_VERSION = 1
DEMO_WARNING = "DEMO: tiny random-init model, not a real inspection result"


class EvaluationError(RuntimeError):
    """The run cannot go on: an unreadable image, too few golden images, a bad option."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how (the ``anomaly-inspect eval`` options)."""

    data_dir: Path
    out_dir: Path
    layout: str | None = None
    categories: tuple[str, ...] = ()
    references: int = 0
    seed: int = 0
    target_false_reject_rate: float = 0.01
    calibration_images: int = 100
    map_size: int = 256
    batch_size: int = 4
    aupro_fpr_limit: float = 0.3
    progress: bool = True
    plots: bool = True
    database_url: str | None = None  # layout ``records``: ZSI_DATABASE_URL (None: SQLite under data_dir)


@dataclass(frozen=True)
class Split:
    """Which images of a category play which part (paths; test samples keep labels/masks)."""

    references: tuple[Path, ...]
    calibration: tuple[Path, ...]
    test: tuple[Sample, ...]
    calibration_source: str


def split_category(cat: Category, references: int, calibration_images: int, seed: int) -> Split:
    """Draw references and calibration images with ``default_rng(seed).permutation`` (see module doc).

    Folder layout without ``golden/``: the good images are permuted the same way; the
    first N are references, then half of the rest (at most ``calibration_images``)
    calibrate, and only the remaining good images are tested.
    """
    rng = np.random.default_rng(seed)
    if cat.golden_is_split:
        goods = sorted(s.image for s in cat.test if s.label == 0)
        perm = [goods[i] for i in rng.permutation(len(goods))]
        if references > len(perm):
            raise EvaluationError(f"{cat.name}: {references} references asked, {len(perm)} good images")
        refs, rest = perm[:references], perm[references:]
        n_cal = min(calibration_images, len(rest) // 2)
        held_out = set(rest[:n_cal]) | set(refs)
        test = tuple(s for s in cat.test if s.label == 1 or s.image not in held_out)
        source = f"{n_cal} of the good/ images (seeded split, seed {seed}); the other good images are tested"
        return Split(tuple(refs), tuple(rest[:n_cal]), test, source)
    pool = list(cat.train_good)
    if references > len(pool):
        raise EvaluationError(
            f"{cat.name}: {references} references asked, only {len(pool)} train good images"
        )
    perm = [pool[i] for i in rng.permutation(len(pool))]
    refs = perm[:references]
    cal = perm[references : references + calibration_images]
    source = f"{len(cal)} train good images not used as references (seed {seed})"
    return Split(tuple(refs), tuple(cal), cat.test, source)


# ------------------------------------------------------------------ per-image cache
class ScoreCache:
    """One ``.npz`` per image under ``root``: ``score`` (float64) and ``map`` (float32 S x S).

    Files are written to a temporary name and renamed, so an interrupted write never
    leaves a half file under a real key. No pickle: ``np.load(allow_pickle=False)``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> tuple[float, np.ndarray] | None:
        p = self._path(key)
        try:
            with np.load(p, allow_pickle=False) as z:
                return float(z["score"]), np.asarray(z["map"], dtype=np.float32)
        except (OSError, KeyError, ValueError):
            return None

    def put(self, key: str, score: float, amap: np.ndarray) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, score=np.float64(score), map=amap.astype(np.float32))
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, p)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:32]


def cache_key(
    detector_identity: dict[str, Any], prompt_digest: str, refs: str, map_size: int, image: str
) -> str:
    """Key of one image result: everything that changes the score or the stored map."""
    doc = {
        "v": CACHE_VERSION,
        "detector": detector_identity,
        "prompt_digest": prompt_digest,
        "references": refs,
        "map_size": map_size,
        "image": image,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def detector_identity(detector: Detector) -> dict[str, Any]:
    """The detector's description without the device (a run may resume on another one)."""
    return {k: v for k, v in detector.describe().items() if k != "device"}


def references_digest(refs: ReferenceSet | None) -> str:
    if refs is None:
        return "none"
    return hashlib.sha256(f"{refs.model_key}|{','.join(refs.image_hashes)}".encode()).hexdigest()[:32]


# ------------------------------------------------------------------ images and maps
def read_rgb(path: Path) -> np.ndarray:
    """``HWC uint8 RGB`` pixels as stored: an EXIF/TIFF orientation tag is never applied (as /inspect)."""
    try:
        # from bytes, as /inspect: Pillow 13 mis-loads a TIFF with an orientation tag from a path
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            return np.asarray(as_stored(im).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise EvaluationError(f"{path}: not a readable image ({exc})") from exc


def read_mask(path: Path | None, size: int) -> np.ndarray:
    """Bool ``(size, size)``: nonzero pixels of the mask file, nearest-resized; all False for None."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            m = as_stored(im).convert("L").resize((size, size), Image.Resampling.NEAREST)
    except (UnidentifiedImageError, OSError) as exc:
        raise EvaluationError(f"{path}: not a readable mask ({exc})") from exc
    return np.asarray(m) > 0


def resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    """``float32 (H, W)`` -> ``float32 (size, size)``, bilinear (Pillow ``F`` mode)."""
    if amap.shape == (size, size):
        return amap.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


# ------------------------------------------------------------------ the run
@dataclass
class _Job:
    """One category ready to score: prompts, references, and each image's cache key."""

    category: Category
    split: Split
    object_name: str | None
    product: ProductRecipe | None
    references: ReferenceSet | None
    keys: dict[Path, str] = field(default_factory=dict)

    @property
    def images(self) -> list[Path]:
        return [s.image for s in self.split.test] + list(self.split.calibration)


def _product_for(category: str) -> tuple[str | None, ProductRecipe | None]:
    """A built-in product recipe when the category is one (MVTec-AD / VisA names), else its name."""
    from prompts import builtin_products

    recipe = builtin_products().get(category)
    if recipe is not None:
        return None, recipe
    return category.replace("_", " ").replace("-", " "), None


def _prepare(cfg: EvalConfig, detector: Detector, cat: Category) -> _Job:
    split = split_category(cat, cfg.references, cfg.calibration_images, cfg.seed)
    object_name, product = _product_for(cat.name)
    refs = None
    if cfg.references == 0 and detector.requires_references:
        raise EvaluationError(
            f"method {detector.method!r} scores parts against golden images only: run with --references N "
            "(e.g. 4), N train good images per category"
        )
    if cfg.references > 0:
        if not detector.supports_references:
            raise EvaluationError(
                f"method {detector.method!r} does not use reference images: run with --references 0"
            )
        refs = detector.encode_references(
            [read_rgb(p) for p in split.references], object_name=object_name, product=product
        )
    job = _Job(cat, split, object_name, product, refs)
    identity = detector_identity(detector)
    digest = detector.prompt_digest(object_name, product)
    rd = references_digest(refs)
    for p in job.images:
        job.keys[p] = cache_key(identity, digest, rd, cfg.map_size, file_digest(p))
    return job


def _score_all(cfg: EvalConfig, detector: Detector, jobs: list[_Job], cache: ScoreCache) -> tuple[int, int]:
    """Score every uncached image; returns ``(scored now, found in cache)``."""
    from tqdm import tqdm

    todo = [(job, p) for job in jobs for p in dict.fromkeys(job.images) if not cache.has(job.keys[p])]
    total = sum(len(dict.fromkeys(job.images)) for job in jobs)
    done = 0
    with tqdm(
        total=len(todo),
        unit="img",
        desc=f"eval {detector.method}",
        disable=not cfg.progress,
        dynamic_ncols=True,
    ) as bar:
        for job in jobs:
            paths = [p for j, p in todo if j is job]
            for i in range(0, len(paths), cfg.batch_size):
                batch = paths[i : i + cfg.batch_size]
                bar.set_postfix_str(job.category.name)
                results = detector.predict_batch(
                    [read_rgb(p) for p in batch],
                    object_name=job.object_name,
                    product=job.product,
                    references=job.references,
                )
                for p, res in zip(batch, results, strict=True):
                    cache.put(job.keys[p], float(res.score), resize_map(res.anomaly_map, cfg.map_size))
                    done += 1
                bar.update(len(batch))
    return done, total - len(todo)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _category_metrics(cfg: EvalConfig, job: _Job, cache: ScoreCache) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of one category, and the raw arrays the plots need."""
    test = job.split.test
    scores = np.empty(len(test), dtype=np.float64)
    maps = np.empty((len(test), cfg.map_size, cfg.map_size), dtype=np.float32)
    for i, s in enumerate(test):
        got = cache.get(job.keys[s.image])
        if got is None:
            raise EvaluationError(f"{s.image}: result missing from the cache after scoring")
        scores[i], maps[i] = got
    labels = np.array([s.label for s in test], dtype=np.int64)
    good, bad = scores[labels == 0], scores[labels == 1]
    notes: list[str] = list(job.category.notes)
    out: dict[str, Any] = {
        "n_test_good": int(good.size),
        "n_test_defect": int(bad.size),
        "n_references": len(job.split.references),
        "object_name": job.product.object_name if job.product else job.object_name,
        "product_recipe": job.product.id if job.product else None,
    }
    if good.size == 0 or bad.size == 0:
        notes.append("image AUROC and F1-max n/a: the test split holds one class only")
    out["image_auroc"] = _num(image_auroc(scores, labels))
    f1, f1_thr = f1_max(scores, labels) if bad.size else (math.nan, math.nan)
    out["image_f1_max"], out["image_f1_threshold"] = _num(f1), _num(f1_thr)

    unmasked = [s for s in test if s.label == 1 and s.mask is None]
    if bad.size == 0:
        out["pixel_auroc"] = out["aupro"] = None
        notes.append("pixel metrics n/a: no defect image")
    elif unmasked:
        out["pixel_auroc"] = out["aupro"] = None
        notes.append(f"pixel metrics n/a: {len(unmasked)} of {bad.size} defect images have no mask")
    else:
        masks = np.stack([read_mask(s.mask, cfg.map_size) for s in test])
        out["pixel_auroc"] = _num(pixel_auroc(maps, masks))
        out["aupro"] = _num(aupro(maps, masks, cfg.aupro_fpr_limit))
        if out["aupro"] is None:
            notes.append("pixel metrics n/a: the masks mark no defective pixel")
    del maps

    cal_scores = np.array(
        [got[0] for p in job.split.calibration if (got := cache.get(job.keys[p])) is not None]
    )
    calibration: dict[str, Any] = {"source": job.split.calibration_source, "n": int(cal_scores.size)}
    threshold = None
    try:
        cal = calibrate_threshold(cal_scores, cfg.target_false_reject_rate)
        threshold = cal.threshold
        calibration.update(cal.as_dict())
    except CalibrationError as exc:
        calibration["error"] = exc.as_dict()
        notes.append(f"false-reject rate n/a: {exc}")
    out["calibration"] = calibration
    out["threshold"] = threshold
    out["false_reject_rate"] = _num(false_reject_rate(good, threshold)) if threshold is not None else None
    out["recall_at_threshold"] = _num(recall_at(bad, threshold)) if threshold is not None else None

    per_defect: dict[str, Any] = {}
    for d in sorted({s.defect for s in test if s.label == 1}):
        sel = np.array([s.label == 0 or s.defect == d for s in test])
        d_scores = scores[sel]
        d_labels = labels[sel]
        per_defect[d] = {
            "n": int(d_labels.sum()),
            "image_auroc": _num(image_auroc(d_scores, d_labels)),
            "recall_at_threshold": _num(recall_at(d_scores[d_labels == 1], threshold))
            if threshold is not None
            else None,
        }
    out["per_defect"] = per_defect
    out["notes"] = notes
    raw = {"scores": scores, "labels": labels, "calibration_scores": cal_scores, "threshold": threshold}
    return out, raw


METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "false_reject_rate",
    "recall_at_threshold",
)


def _mean(categories: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {}
    for k in METRIC_KEYS:
        vals = [c[k] for c in categories.values() if c.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
        mean[f"{k}_categories"] = len(vals)
    return mean


def run_evaluation(
    cfg: EvalConfig,
    detector: Detector,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``detector`` on the dataset; write the report files; return the report dict.

    Raises:
        service.evaluation.datasets.DatasetError: the dataset does not fit the layout.
        EvaluationError: an unreadable image, too few golden images, references asked
            of a method without them.
        KeyboardInterrupt: passed on after the images scored so far are cached.
    """
    from service.evaluation.datasets import detect_layout
    from service.evaluation.report import write_report

    say = log or (lambda _msg: None)
    if cfg.map_size < 8 or cfg.batch_size < 1 or cfg.references < 0 or cfg.calibration_images < 0:
        raise EvaluationError(
            "map size must be >= 8, batch size >= 1, references and calibration images >= 0"
        )
    try:
        min_good_images(cfg.target_false_reject_rate)  # a bad target fails now, not after the scoring
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    t0 = time.perf_counter()
    layout = cfg.layout or detect_layout(cfg.data_dir)
    cats = read_dataset(cfg.data_dir, layout, list(cfg.categories) or None, database_url=cfg.database_url)
    cache = ScoreCache(cfg.out_dir / "cache")
    say(f"{len(cats)} categories ({layout} layout); preparing references and cache keys")
    jobs = [_prepare(cfg, detector, c) for c in cats]
    scored, cached = _score_all(cfg, detector, jobs, cache)
    categories: dict[str, dict[str, Any]] = {}
    raws: dict[str, dict[str, Any]] = {}
    for job in jobs:
        categories[job.category.name], raws[job.category.name] = _category_metrics(cfg, job, cache)
    info = detector.describe()
    report: dict[str, Any] = {
        "demo": bool(detector.random_weights),
        "warning": DEMO_WARNING if detector.random_weights else None,
        "dataset": {"root": str(cfg.data_dir), "layout": layout},
        "method": info["method"],
        "model": info["model"],
        "weights": info["weights"],
        "random_weights": bool(detector.random_weights),
        "detector": info,
        "references": cfg.references,
        "seed": cfg.seed,
        "reference_selection": (
            f"numpy.random.default_rng({cfg.seed}).permutation of the sorted golden pool of each category "
            f"(its train good images; folder layout without golden/: its good images); "
            f"the first {cfg.references} are the references"
        ),
        "calibration": {
            "target_false_reject_rate": cfg.target_false_reject_rate,
            "max_images": cfg.calibration_images,
            "images": "golden-pool images not used as references, next in the same permutation",
            "bound": (
                "threshold just above the k-th smallest calibration score, k = ceil((n + 1)(1 - target)): "
                "P(fresh good image rejected) <= target (distribution-free, exchangeable scores)"
            ),
            "false_reject_rate_measured_on": "the test good images (never used for calibration)",
        },
        "map_size": cfg.map_size,
        "aupro_fpr_limit": cfg.aupro_fpr_limit,
        "categories": categories,
        "mean": _mean(categories),
        "run": {
            "images_scored": scored,
            "images_from_cache": cached,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }
    report["files"] = write_report(report, raws, cfg.out_dir, plots=cfg.plots)
    return report
