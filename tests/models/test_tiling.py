"""High-resolution tiling: tile layout, stitching, exactness at one tile, small defects, seams."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import AnomalyResult, Detector, ReferenceMismatchError, load_tiny_detector
from models.postprocess import boxes_above
from models.tiling import TiledDetector, TilingConfig, stitch, tile_grid, tile_starts, tiled


class GrayStub(Detector):
    """Test detector whose map is the tile's own grey level (so the true stitched map is known)."""

    method = "stub"

    def __init__(self) -> None:
        self.model_name, self.weights_tag, self.device, self.random_weights = "stub", "none", "cpu", False
        self.batch_sizes: list[int] = []  # test bookkeeping only

    def prompt_digest(self, object_name: str | None = None, product: Any = None) -> str:
        return "stub"

    def predict_batch(
        self, images: Sequence[np.ndarray], *, object_name=None, product=None, references=None
    ) -> list[AnomalyResult]:
        self.batch_sizes.append(len(images))
        out = []
        for img in images:
            m = img.mean(axis=2).astype(np.float32) / 255.0
            out.append(
                AnomalyResult(float(m.max()), m, "stub", "stub", "none", "stub", timings={"encode": 0.001})
            )
        return out


def gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    g = (37 * yy + 11 * xx + (yy * xx) % 97) % 256
    return np.repeat(g[..., None], 3, axis=2).astype(np.uint8)


# ----------------------------------------------------------------------------- config and layout
def test_config_from_the_product_setting() -> None:
    cfg = TilingConfig.from_dict({"tile": 518, "overlap": 64})
    assert cfg == TilingConfig(tile=518, overlap=64, batch=8)
    assert TilingConfig.from_dict(cfg.to_dict()) == cfg and cfg.tag == "tile518-overlap64"
    for off in (None, {}, "off", {"enabled": False, "tile": 518}):
        assert TilingConfig.from_dict(off) is None
    for bad in (
        {"tile": 518, "overlap": 518},
        {"tile": 16},
        {"overlap": 8},
        {"tile": 518, "stride": 4},
        {"tile": True},
        {"tile": 518.5},
        {"tile": 64, "batch": 0},
        "on",
    ):
        with pytest.raises(ValueError):
            TilingConfig.from_dict(bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6000), st.integers(32, 800), st.data())
def test_tile_starts_cover_the_axis_with_the_overlap_and_no_extra_tile(length: int, tile: int, data) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] == length - size  # first at the border, last aligned to it
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert all(a + size - b >= overlap for a, b in itertools.pairwise(starts))
    if len(starts) > 1:  # one tile fewer could not keep the overlap
        assert (len(starts) - 2) * (tile - overlap) < length - tile


def test_tile_grid_clips_to_small_images() -> None:
    cfg = TilingConfig(tile=100, overlap=10)
    assert tile_grid(60, 250, cfg)[0].height == 60
    assert {(t.y0, t.x0) for t in tile_grid(60, 250, cfg)} == {(0, 0), (0, 75), (0, 150)}
    assert len(tile_grid(2048, 2448, TilingConfig(tile=518, overlap=64))) == 5 * 6


# ----------------------------------------------------------------------------- stitching
def test_stitch_places_tiles_exactly_and_blends_convexly() -> None:
    rng = np.random.default_rng(0)
    h, w = 157, 203
    truth = rng.random((h, w)).astype(np.float32)
    tiles = tile_grid(h, w, TilingConfig(tile=64, overlap=20))
    # tile maps that agree on their overlaps reproduce the full map (placement is right)
    same = stitch([truth[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] for t in tiles], tiles, h, w)
    np.testing.assert_allclose(same, truth, rtol=0, atol=1e-6)
    # tile maps that disagree: each pixel stays between the values of the tiles covering it
    maps = [rng.random((t.height, t.width)).astype(np.float32) for t in tiles]
    lo, hi = np.full((h, w), np.inf), np.full((h, w), -np.inf)
    for m, t in zip(maps, tiles, strict=True):
        sl = np.s_[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width]
        lo[sl], hi[sl] = np.minimum(lo[sl], m), np.maximum(hi[sl], m)
    out = stitch(maps, tiles, h, w)
    assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)


def test_feathering_is_continuous_across_a_seam() -> None:
    """Two tiles with different constant maps: a linear cross-fade over the overlap, no step."""
    tiles = tile_grid(50, 120, TilingConfig(tile=70, overlap=20))
    assert [t.x0 for t in tiles] == [0, 50]
    out = stitch([np.zeros((50, 70), np.float32), np.ones((50, 70), np.float32)], tiles, 50, 120)
    row = out[0]
    assert row[:50].max() == 0.0 and row[70:].min() == 1.0
    assert np.all(np.diff(row) >= 0) and np.abs(np.diff(row)).max() <= 1 / 20 + 1e-6


# ----------------------------------------------------------------------------- the wrapper
def test_stub_flat_image_has_no_seams_and_gradients_are_reproduced() -> None:
    stub = GrayStub()
    det = TiledDetector(stub, TilingConfig(tile=64, overlap=16, batch=5))
    flat = np.full((300, 410, 3), 77, np.uint8)
    m = det.predict(flat).anomaly_map
    assert float(np.abs(m - np.median(m)).max()) < 1e-6  # no seams at all
    img = gradient_image(300, 410)
    res = det.predict(img)
    np.testing.assert_allclose(res.anomaly_map, GrayStub().predict(img).anomaly_map, rtol=0, atol=1e-6)
    n_tiles = len(tile_grid(300, 410, det.config))
    assert res.details["tiling"]["tiles"] == n_tiles and res.details["tiling"]["batches"] == -(-n_tiles // 5)
    assert max(stub.batch_sizes) <= 5
    assert res.score == pytest.approx(max(res.details["tiling"]["tile_scores"]), abs=1e-6)
    assert {"split", "stitch", "tile_batch_0", "tiles.encode"} <= set(res.timings)


def test_all_tiles_of_a_request_are_batched_together() -> None:
    stub = GrayStub()
    det = TiledDetector(stub, TilingConfig(tile=64, overlap=0, batch=7))
    det.predict_batch([gradient_image(128, 128), gradient_image(64, 192)])  # 4 + 3 tiles
    assert stub.batch_sizes == [7]


@pytest.fixture(scope="module")
def dino():
    return load_tiny_detector("anomalydino", image_size=56)


def test_one_tile_reproduces_the_untiled_result_exactly(dino) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    golden = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    plain = dino.predict(img, references=dino.encode_references([golden]))
    for tile in (150, 400):  # equal to the image, and larger
        t = tiled(dino, {"tile": tile, "overlap": 16})
        res = t.predict(img, references=t.encode_references([golden]))
        assert res.score == plain.score
        assert np.array_equal(res.anomaly_map, plain.anomaly_map)
        assert res.details["raw_score"] == plain.details["raw_score"]
    winclip = load_tiny_detector("winclip")
    t = tiled(winclip, {"tile": 150, "overlap": 0})
    a, b = winclip.predict(img, object_name="part"), t.predict(img, object_name="part")
    assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_tiled_golden_images_make_a_tiled_bank(dino) -> None:
    rng = np.random.default_rng(1)
    golden = rng.integers(0, 256, (112, 168, 3), dtype=np.uint8)
    t = tiled(dino, {"tile": 56, "overlap": 0})
    refs = t.encode_references([golden])
    assert refs.model_key == t.model_key != dino.model_key and refs.count == 1
    assert refs.arrays["bank"].shape[0] == 6 * 16  # 2x3 tiles of 4x4 patches
    with pytest.raises(ReferenceMismatchError, match="tiled"):
        t.predict(golden, references=dino.encode_references([golden]))
    with pytest.raises(ReferenceMismatchError):
        dino.predict(golden, references=refs)
    assert t.predict(golden, references=refs).score < 1e-5  # every tile finds itself


def test_a_defect_smaller_than_a_fiftieth_of_the_width_is_found_only_with_tiling(dino) -> None:
    """A 7 px bright spot on a 400 px wide noisy part (1/57 of the width).

    Untiled, the model sees the image at 56 px and the spot is 1 px; tiled at its native
    56 px per tile, the spot covers most of a patch. Threshold: halfway between the
    median and the maximum of the tiled map.
    """
    h, w, (y, x, s) = 300, 400, (201, 297, 7)
    golden = np.clip(120 + np.random.default_rng(1).normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    test = np.clip(120 + np.random.default_rng(2).normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    test[y : y + s, x : x + s] = 255
    assert s < w / 50
    det = tiled(dino, {"tile": 56, "overlap": 8, "batch": 32})
    res = det.predict(test, references=det.encode_references([golden]))
    plain = dino.predict(test, references=dino.encode_references([golden]))
    thr = 0.5 * (float(res.anomaly_map.max()) + float(np.median(res.anomaly_map)))

    def hits(box) -> bool:
        return box.x0 <= x + s - 1 and x <= box.x1 and box.y0 <= y + s - 1 and y <= box.y1

    tiled_boxes = boxes_above(res.anomaly_map, thr)
    assert tiled_boxes and hits(tiled_boxes[0])  # the strongest region is the defect
    assert all(hits(b) for b in tiled_boxes)  # and nothing else is flagged
    assert not any(hits(b) for b in boxes_above(plain.anomaly_map, thr))
    assert res.score > 2 * plain.score


def test_flat_image_through_the_real_model_has_no_visible_seams(dino) -> None:
    """Flat grey part vs a flat golden image of another grey: the stitched map stays flat.

    A single 56 px tile's own map varies by ~0.02 (position embeddings); the stitched
    300x260 map must not vary more than 0.03 anywhere (a seam would add a step).
    """
    flat = np.full((300, 260, 3), 128, np.uint8)
    golden = np.full((300, 260, 3), 100, np.uint8)
    det = tiled(dino, {"tile": 56, "overlap": 16})
    m = det.predict(flat, references=det.encode_references([golden])).anomaly_map
    assert m.shape == (300, 260)
    assert float(np.abs(m - np.median(m)).max()) < 0.03
