"""The anomaly-inspect command line: inspect files, demo labelling, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def _write_image(path: Path, seed: int = 0, size: tuple[int, int] = (90, 70)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_inspect_demo_writes_overlay_and_labels_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "part.png")
    out = tmp_path / "out"
    assert main(["inspect", str(img), "--demo", "--product", "bottle", "--out", str(out), "--save-map"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["demo"] is True and "random" in record["warning"]
    assert 0.0 <= record["score"] <= 1.0
    assert record["decision"] in {"normal", "anomalous"}
    assert record["threshold"] == 0.5
    overlay = Image.open(record["overlay"])
    assert overlay.size[0] >= 90 and overlay.size[1] > 70  # a small image: legend strip below it
    assert Image.open(record["map"]).mode == "L"


def test_inspect_with_references_uses_few_shot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _write_image(tmp_path / "part.png", seed=1)
    golden = tmp_path / "golden"
    golden.mkdir()
    _write_image(golden / "g1.png", seed=2)
    _write_image(golden / "g2.png", seed=3)
    assert (
        main(["inspect", str(img), "--demo", "--references", str(golden), "--out", str(tmp_path / "o")]) == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["used_references"] is True


def test_inspect_without_weights_says_how_to_fetch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "part.png")
    assert main(["inspect", str(img), "--weights-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "anomaly-inspect weights fetch openclip-vit-b-16-plus-240-laion400m_e31" in err


def test_inspect_unknown_product(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _write_image(tmp_path / "part.png")
    assert main(["inspect", str(img), "--demo", "--product", "no-such-part"]) == 2
    assert "unknown product" in capsys.readouterr().err


def test_inspect_not_an_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(SystemExit, match="not a readable image"):
        main(["inspect", str(bad), "--demo", "--out", str(tmp_path / "o")])


def _goldens_and_part(tmp_path: Path) -> tuple[Path, Path, Path]:
    return (
        _write_image(tmp_path / "a.png", seed=2),
        _write_image(tmp_path / "b.png", seed=3),
        _write_image(tmp_path / "part.png", seed=1),
    )


def test_reference_option_is_repeatable_and_keeps_the_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10, item 11: ``--references a.png b.png part.png`` swallowed the image."""
    a, b, part = _goldens_and_part(tmp_path)
    out = str(tmp_path / "o")
    argv = ["inspect", "--demo", "--reference", str(a), "--reference", str(b), str(part), "--out", out]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["file"] for r in records] == [str(part)]
    assert records[0]["used_references"] is True and records[0]["reference_count"] == 2


def test_references_list_ends_with_a_double_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, part = _goldens_and_part(tmp_path)
    out = str(tmp_path / "o")
    assert main(["inspect", "--demo", "--out", out, "--references", str(a), str(b), "--", str(part)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["file"] for r in records] == [str(part)] and records[0]["reference_count"] == 2


def test_swallowed_image_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, part = _goldens_and_part(tmp_path)
    assert main(["inspect", "--demo", "--references", str(a), str(b), str(part)]) == 2
    err = capsys.readouterr().err
    assert "no image to inspect" in err and "--reference" in err and "--" in err


def test_inspect_logs_no_third_party_info_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers = []  # as in a fresh process
    try:
        part = _write_image(tmp_path / "part.png")
        assert main(["inspect", str(part), "--demo", "--out", str(tmp_path / "o")]) == 0
    finally:
        for h in root.handlers:
            root.removeHandler(h)
        root.handlers, root.level = saved
    err = capfd.readouterr().err
    assert "INFO" not in err and "Loaded built-in" not in err, err


def test_inspect_with_anomalydino_and_golden_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "part.png", seed=1)
    golden = _write_image(tmp_path / "g1.png", seed=2)
    out = str(tmp_path / "o")
    args = ["inspect", "--method", "anomalydino", "--demo", "--reference", str(golden)]
    assert main([*args, str(img), str(golden), "--out", out]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["method"] for r in lines] == ["anomalydino", "anomalydino"]
    assert lines[0]["used_references"] is True and lines[0]["reference_count"] == 1
    assert lines[1]["score"] < 1e-4  # the golden image is its own nearest neighbour


def test_anomalydino_without_golden_images_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "part.png")
    assert main(["inspect", "--method", "anomalydino", "--demo", str(img), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "golden" in err and "--reference" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    data = tmp_path / "data"
    assert main(["make-demo-dataset", str(data)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(data), "--method", "anomalydino", "--demo", "--out", str(tmp_path / "e")])
    assert rc == 2 and "--references" in capsys.readouterr().err
