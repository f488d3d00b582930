"""``anomaly-inspect make-demo-dataset`` and ``anomaly-inspect eval`` on the tiny random-init model."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from PIL import Image

import models
from models.metrics import image_auroc
from service.cli import main
from service.evaluation import (
    DatasetError,
    EvalConfig,
    EvaluationError,
    make_demo_dataset,
    read_dataset,
    run_evaluation,
    split_category,
)

CATEGORY_KEYS = {
    "n_test_good",
    "n_test_defect",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "image_f1_threshold",
    "threshold",
    "false_reject_rate",
    "recall_at_threshold",
    "calibration",
    "per_defect",
    "notes",
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, categories=("weave", "washer"), train=12, test_good=4, test_defect=4, size=64)
    return root


@pytest.fixture(scope="module")
def tiny() -> models.Detector:
    return models.load_tiny_detector("winclip")


def _cfg(root: Path, out: Path, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = {
        "data_dir": root,
        "out_dir": out,
        "target_false_reject_rate": 0.1,
        "map_size": 32,
        "batch_size": 8,
        "progress": False,
        "plots": False,
    }
    return EvalConfig(**{**base, **kw})


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ the demo dataset


def test_make_demo_dataset_writes_mvtec_layout_with_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    args = [
        "make-demo-dataset",
        str(root),
        "--train",
        "3",
        "--test-good",
        "2",
        "--test-defect",
        "4",
        "--size",
        "48",
    ]
    assert main(args) == 0
    assert "weave, marble, washer" in capsys.readouterr().out
    for cat in ("weave", "marble", "washer"):
        assert len(list((root / cat / "train" / "good").glob("*.png"))) == 3
        assert len(list((root / cat / "test" / "good").glob("*.png"))) == 2
        defects = sorted((root / cat / "test").glob("*/*.png"))
        assert len(defects) == 2 + 4
        for img in (p for p in defects if p.parent.name != "good"):
            mask = root / cat / "ground_truth" / img.parent.name / f"{img.stem}_mask.png"
            m = np.asarray(Image.open(mask))
            assert m.shape == (48, 48) and set(np.unique(m)) == {0, 255}
            assert Image.open(img).size == (48, 48)
    # seeded: the same arguments write the same pixels, another seed others
    again = tmp_path / "again"
    assert main([*args[:1], str(again), *args[2:]]) == 0
    assert _tree_digest(root) == _tree_digest(again)
    other = tmp_path / "other"
    assert main([*args[:1], str(other), *args[2:], "--seed", "1"]) == 0
    assert _tree_digest(root) != _tree_digest(other)


def test_painted_defect_is_where_the_mask_says(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, categories=("marble",), train=1, test_good=1, test_defect=4, size=64)
    good = np.asarray(Image.open(tmp_path / "marble" / "test" / "good" / "000.png")).astype(float)
    for img in (tmp_path / "marble" / "test").glob("hole/*.png"):
        pixels = np.asarray(Image.open(img)).astype(float)
        mask = (
            np.asarray(Image.open(tmp_path / "marble" / "ground_truth" / "hole" / f"{img.stem}_mask.png")) > 0
        )
        assert pixels[mask].mean() < 20  # black hole
        assert good.mean() > 150 and pixels[~mask].mean() > 150


# ------------------------------------------------------------------ layouts


def test_read_mvtec_layout(demo_root: Path) -> None:
    cats = read_dataset(demo_root)
    assert [c.name for c in cats] == ["washer", "weave"]
    weave = cats[1]
    assert len(weave.train_good) == 12
    assert sum(s.label for s in weave.test) == 4 and len(weave.test) == 8
    assert all(s.mask is not None for s in weave.test if s.label == 1)
    assert read_dataset(demo_root / "weave")[0].name == "weave"  # a single category as root
    with pytest.raises(DatasetError, match="unknown category nope"):
        read_dataset(demo_root, categories=["nope"])


def test_read_visa_split_csv(demo_root: Path, tmp_path: Path) -> None:
    # VisA as distributed: ROOT/split_csv/1cls.csv with object,split,label,image,mask
    (tmp_path / "split_csv").mkdir()
    src = demo_root / "weave"
    shutil.copytree(src, tmp_path / "weave")
    rows = [["object", "split", "label", "image", "mask"]]
    for p in sorted((tmp_path / "weave" / "train" / "good").glob("*.png")):
        rows.append(["weave", "train", "normal", str(p.relative_to(tmp_path)), ""])
    for p in sorted((tmp_path / "weave" / "test").glob("*/*.png")):
        if p.parent.name == "good":
            rows.append(["weave", "test", "normal", str(p.relative_to(tmp_path)), ""])
        else:
            m = tmp_path / "weave" / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            rows.append(
                ["weave", "test", "anomaly", str(p.relative_to(tmp_path)), str(m.relative_to(tmp_path))]
            )
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    (cat,) = read_dataset(tmp_path)  # detected: visa
    assert cat.name == "weave" and len(cat.train_good) == 12
    assert sorted(s.label for s in cat.test) == [0] * 4 + [1] * 4
    assert all(s.mask is not None and s.mask.is_file() for s in cat.test if s.label)


def _folder_dataset(root: Path, demo_root: Path, *, masks: bool = True, defects: bool = True) -> Path:
    cat = root / "bracket"
    (cat / "good").mkdir(parents=True)
    for i, p in enumerate(sorted((demo_root / "washer" / "train" / "good").glob("*.png"))):
        shutil.copy(p, cat / "good" / f"g{i}.png")
    if defects:
        (cat / "defect").mkdir()
        (cat / "ground_truth").mkdir()
        for p in sorted((demo_root / "washer" / "test").glob("*/*.png")):
            if p.parent.name != "good":
                shutil.copy(p, cat / "defect" / p.name)
                if masks:
                    m = demo_root / "washer" / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
                    shutil.copy(m, cat / "ground_truth" / f"{p.stem}.png")
    return cat


def test_folder_layout_splits_good_images_without_overlap(demo_root: Path, tmp_path: Path) -> None:
    cat_dir = _folder_dataset(tmp_path, demo_root)
    (cat,) = read_dataset(cat_dir)
    assert cat.golden_is_split
    split = split_category(cat, references=2, calibration_images=100, seed=0)
    refs, cal = set(split.references), set(split.calibration)
    test_good = {s.image for s in split.test if s.label == 0}
    assert len(refs) == 2 and len(cal) == 5 and len(test_good) == 5  # 12 good: 2 + 10 // 2 + rest
    assert not (refs & cal) and not (refs & test_good) and not (cal & test_good)
    assert split_category(cat, 2, 100, seed=0) == split  # the seed fixes the draw
    assert split_category(cat, 2, 100, seed=1).references != split.references


# ------------------------------------------------------------------ eval end to end


def test_eval_cli_demo_writes_report_files(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["eval", str(demo_root), "--demo", "--out", str(out), "--references", "1"]
    argv += ["--target-frr", "0.1", "--map-size", "32", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "DEMO" in captured.out and "DEMO" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["demo"] is True and report["random_weights"] is True and "random" in report["warning"]
    assert report["method"] == "winclip" and report["weights"] == "random-init"
    assert report["references"] == 1 and report["seed"] == 0
    assert set(report["categories"]) == {"washer", "weave"}
    for c in report["categories"].values():
        assert set(c) >= CATEGORY_KEYS
        assert 0.0 <= c["image_auroc"] <= 1.0 and 0.0 <= c["pixel_auroc"] <= 1.0 and 0.0 <= c["aupro"] <= 1.0
        assert c["calibration"]["n"] == 11  # 12 train good - 1 reference
        assert c["threshold"] == c["calibration"]["threshold"] and c["false_reject_rate"] is not None
    assert set(report["mean"]) >= {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "false_reject_rate"}
    assert report["run"]["images_scored"] == 2 * (8 + 11)
    md = (out / "report.md").read_text()
    assert "DEMO" in md and "| **mean** |" in md and "AUPRO@0.3" in md
    for files in report["files"]["plots"].values():
        for f in files:
            assert Image.open(out / f).format == "PNG"


def test_interrupted_run_resumes_with_only_the_rest(
    demo_root: Path, tmp_path: Path, tiny: models.Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(demo_root, tmp_path / "out", categories=("weave",))
    one_by_one = _cfg(demo_root, tmp_path / "out", categories=("weave",), batch_size=1)
    total = 8 + 12  # test images + calibration images (no references)
    original = tiny.predict_batch
    seen: list[int] = []

    def interrupted(images: Any, **kw: Any) -> Any:
        if len(seen) >= 5:
            raise KeyboardInterrupt
        seen.append(len(images))
        return original(images, **kw)

    monkeypatch.setattr(tiny, "predict_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(one_by_one, tiny)
    assert not (tmp_path / "out" / "report.json").exists()
    monkeypatch.undo()

    calls: list[int] = []

    def counting(images: Any, **kw: Any) -> Any:
        calls.append(len(images))
        return original(images, **kw)

    monkeypatch.setattr(tiny, "predict_batch", counting)
    report = run_evaluation(cfg, tiny)
    assert sum(calls) == total - 5
    assert report["run"] == {**report["run"], "images_scored": total - 5, "images_from_cache": 5}
    # and a run from scratch agrees with the resumed one (up to the float noise of batch 1 vs 8)
    fresh = run_evaluation(_cfg(demo_root, tmp_path / "fresh", categories=("weave",)), tiny)
    for key in ("image_auroc", "pixel_auroc", "aupro", "threshold", "false_reject_rate"):
        assert fresh["categories"]["weave"][key] == pytest.approx(
            report["categories"]["weave"][key], abs=1e-4
        )
    # other references, other results: nothing is reused
    calls.clear()
    run_evaluation(_cfg(demo_root, tmp_path / "out", categories=("weave",), references=2), tiny)
    assert sum(calls) == 8 + 10


def test_one_class_and_missing_masks_give_na_not_a_crash(
    demo_root: Path, tmp_path: Path, tiny: models.Detector
) -> None:
    goods_only = _folder_dataset(tmp_path / "a", demo_root, defects=False)
    report = run_evaluation(_cfg(goods_only, tmp_path / "out_a"), tiny)
    c = report["categories"]["bracket"]
    assert c["image_auroc"] is None and c["pixel_auroc"] is None and c["aupro"] is None
    assert c["image_f1_max"] is None and c["n_test_defect"] == 0
    assert any("one class" in n for n in c["notes"])
    assert "n/a" in (tmp_path / "out_a" / "report.md").read_text()

    no_masks = _folder_dataset(tmp_path / "b", demo_root, masks=False)
    c = run_evaluation(_cfg(no_masks, tmp_path / "out_b"), tiny)["categories"]["bracket"]
    assert c["image_auroc"] is not None
    assert c["pixel_auroc"] is None and any("no mask" in n for n in c["notes"])


def test_too_few_calibration_images_is_reported(
    demo_root: Path, tmp_path: Path, tiny: models.Detector
) -> None:
    report = run_evaluation(
        _cfg(demo_root, tmp_path / "out", categories=("weave",), target_false_reject_rate=0.01), tiny
    )
    c = report["categories"]["weave"]
    assert c["false_reject_rate"] is None and c["threshold"] is None
    assert c["calibration"]["error"]["n_required"] == 99
    assert c["image_auroc"] is not None


def test_references_with_a_method_without_them_is_an_error(demo_root: Path, tmp_path: Path) -> None:
    det = models.load_tiny_detector("anomalyclip")
    with pytest.raises(EvaluationError, match="--references 0"):
        run_evaluation(_cfg(demo_root, tmp_path / "out", references=1), det)


def test_eval_cli_bad_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert (
        main(["eval", str(tmp_path / "empty"), "--demo", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    )
    assert "no category" in capsys.readouterr().err


# ------------------------------------------------------------ reviewed records as a labelled set


def test_eval_on_reviewed_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--layout records``: the reviewed records with kept images of each product, labelled by
    the operators' verdicts (the latest for repeated bytes); unreviewed, refused and
    image-less records left out."""
    import io
    from datetime import datetime, timedelta, timezone

    from prometheus_client import CollectorRegistry

    from service.records import RecordService
    from service.records.draft import RecordDraft
    from service.records.query import review_record

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            buf, format="PNG"
        )
        return buf.getvalue()

    data = tmp_path / "data"
    records = RecordService(data, registry=CollectorRegistry())
    records.start()
    amap = np.zeros((40, 48), np.float32)
    t0 = datetime.now(timezone.utc)
    verdicts: list[tuple[str, Literal["good", "defect"]]] = []

    def add(
        product: str, seed: int | None, verdict: Literal["good", "defect"] | None, status: int = 200
    ) -> str:
        d = RecordDraft(product=product, method="winclip", score=0.3, decision="normal", status=status)
        image = png(seed) if seed is not None else None
        d.image_sha256 = hashlib.sha256(image).hexdigest() if image is not None else None
        records.persist(d.as_record(), image=image, image_format="PNG" if image else None, anomaly_map=amap)
        if verdict is not None:
            verdicts.append((d.id, verdict))
        return d.id

    for i in range(6):
        add("bottle", i, "good")
    for i in range(10, 13):
        add("bottle", i, "defect")
    add("bottle", None, "good")  # no kept image: skipped, with a note
    add("bottle", 0, "defect")  # the same bytes as good image 0, judged defect later: defect wins
    add("bottle", 20, None)  # not reviewed
    add("cable", 30, None)  # a product without any review: no category
    assert records.flush(10)
    assert records.engine is not None
    for k, (rid, verdict) in enumerate(verdicts):
        review_record(
            records.engine, rid, verdict=verdict, note=None, reviewer="ann", at=t0 + timedelta(seconds=k)
        )
    records.stop()

    out = tmp_path / "out"
    argv = ["eval", str(data), "--layout", "records", "--demo", "--out", str(out), "--references", "1"]
    argv += ["--target-frr", "0.5", "--map-size", "32", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["layout"] == "records" and set(report["categories"]) == {"bottle"}
    c = report["categories"]["bottle"]
    # 5 good images (1 reference, 2 calibrate, 2 tested) and 4 defect images
    assert (c["n_references"], c["calibration"]["n"], c["n_test_good"], c["n_test_defect"]) == (1, 2, 2, 4)
    assert report["run"]["images_scored"] == 2 + 2 + 4
    assert any("1 reviewed records skipped" in n for n in c["notes"])
    assert any("1 repeated images counted once" in n for n in c["notes"])

    # a data dir without records is a clear error
    argv = ["eval", str(tmp_path / "nothing"), "--layout", "records", "--demo", "--out", str(out)]
    (tmp_path / "nothing").mkdir()
    assert main([*argv, "--no-progress"]) == 2
    assert "no records database" in capsys.readouterr().err


def test_eval_anomalydino_few_shot_and_without_references(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AnomalyDINO (few-shot only) runs with --references N, scored against those seeded references;
    without references the CLI refuses with a clear error saying what to pass."""
    out = tmp_path / "out"
    argv = ["eval", str(demo_root), "--demo", "--method", "anomalydino", "--categories", "weave"]
    argv += ["--references", "2", "--target-frr", "0.1", "--map-size", "32", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "anomalydino" and report["references"] == 2
    weave = report["categories"]["weave"]
    assert weave["n_references"] == 2 and weave["calibration"]["n"] == 10 and weave["threshold"] is not None
    # the report's figures are those of the detector's own answers against the two seeded references
    det = models.load_tiny_detector("anomalydino")
    (cat,) = read_dataset(demo_root, categories=["weave"])
    split = split_category(cat, 2, 100, seed=0)

    def rgb(p: Path) -> np.ndarray:
        return np.asarray(Image.open(p).convert("RGB"))

    refs = det.encode_references([rgb(p) for p in split.references], object_name="weave")
    scores = [det.predict(rgb(s.image), object_name="weave", references=refs).score for s in split.test]
    labels = [s.label for s in split.test]
    assert weave["image_auroc"] == pytest.approx(image_auroc(scores, labels), abs=1e-9)

    capsys.readouterr()
    zero = ["eval", str(demo_root), "--demo", "--method", "anomalydino", "--no-progress"]
    assert main([*zero, "--out", str(tmp_path / "zero")]) == 2
    err = capsys.readouterr().err
    assert "anomalydino" in err and "--references N" in err


def test_a_bad_target_is_refused_before_any_image_is_scored(
    demo_root: Path, tmp_path: Path, tiny: models.Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("scored an image before checking the options")

    monkeypatch.setattr(tiny, "predict_batch", never)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(EvaluationError, match="target false-reject rate"):
            run_evaluation(_cfg(demo_root, tmp_path / "out", target_false_reject_rate=bad), tiny)


def test_report_links_plots_of_a_category_named_with_spaces(
    demo_root: Path, tmp_path: Path, tiny: models.Detector
) -> None:
    root = _folder_dataset(tmp_path / "data", demo_root).rename(tmp_path / "data" / "brake disc")
    report = run_evaluation(_cfg(root.parent, tmp_path / "out", plots=True), tiny)
    md = (tmp_path / "out" / "report.md").read_text()
    for f in report["files"]["plots"]["brake disc"]:
        assert (tmp_path / "out" / f).is_file()
        assert f"]({f.replace(' ', '%20')})" in md  # a Markdown link may not hold a bare space


@pytest.mark.parametrize("orientation", [6, 8])
def test_evaluation_reads_pixels_as_stored_as_the_service_does(tmp_path: Path, orientation: int) -> None:
    """Issue 10, item 8, one rule for every reader: Pillow rotates a TIFF by its orientation tag on
    load, so the evaluation (its own file reader) scored a rotated image and mask where /inspect
    scores the pixels as stored."""
    from service.evaluation.runner import read_mask, read_rgb
    from service.imaging import decode_image

    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:8, :16] = 255  # top-left block, as the sensor sent it
    image, mask = tmp_path / "part.tif", tmp_path / "part_mask.tif"
    for path, pixels in ((image, stored), (mask, stored[..., 0])):
        im = Image.fromarray(pixels)
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(path, format="TIFF", exif=exif)
    got = read_rgb(image)
    assert got.shape == stored.shape and np.array_equal(got, stored)
    assert np.array_equal(got, decode_image(image.read_bytes(), max_pixels=10**6, max_bytes=10**6))
    m = read_mask(mask, 64)
    assert np.array_equal(
        m, np.asarray(Image.fromarray(stored[..., 0]).resize((64, 64), Image.Resampling.NEAREST)) > 0
    )
