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
