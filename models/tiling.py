"""High-resolution tiling for every method: cut, batch, stitch.

Line cameras take 2-12 MP images while the models look at 240-672 px: a 0.3 mm
scratch on a 2448x2048 image shrinks below one patch. :class:`TiledDetector` wraps
any :class:`models.base.Detector` and inspects each image as overlapping tiles:

- **Tiles**: ``tile x tile`` input pixels (clipped to the image where it is smaller),
  at least ``overlap`` pixels shared by neighbours. Per axis the number of tiles is the
  smallest that achieves the overlap, ``n = ceil((L - tile) / (tile - overlap)) + 1``,
  and their starts are spread evenly from 0 to ``L - tile``: the first tile touches
  the top/left border, the last is aligned to the bottom/right border, and every
  overlap is the same size (>= ``overlap``).
- **Batches**: all tiles of all images of a request go through the wrapped
  detector's ``predict_batch`` in batches of at most ``batch`` tiles.
- **Stitching**: the tile maps are blended at the input resolution with a separable
  linear feathering weight ``w(y, x) = wy(y) * wx(x)``. Along an axis a tile's weight
  rises linearly from ~0 at its edge to 1 across the overlap it shares with the
  neighbour on that side (pixel centres: ``(d + 0.5) / overlap`` at distance ``d``)
  and is 1 elsewhere and along the image border. Two neighbours' weights sum to 1 in
  their overlap (a linear cross-fade), and the stitched map is ``sum(w * map) /
  sum(w)``: a convex combination of the tile maps covering each pixel, so it stays in
  [0, 1], reproduces a constant map exactly (a flat input has no seams) and fades
  each tile out towards its edges, where the models see the least context.
- **Image score**: the MAXIMUM of the tile scores. Each tile is scored by the
  method's own rule as an image of its own (AnomalyDINO: mean of the tile's top 1 %
  patch distances; WinCLIP: its class + window scores), so a defect confined to one
  tile scores as it would in a close-up, instead of being diluted by the other tiles
  (AnomalyDINO's top 1 % over a whole 30-tile image would average a 5-patch defect
  with ~400 normal patches). With one tile (tile >= image) the result is EXACTLY the
  untiled one.
- **Golden images** are tiled the same way; the wrapped detector encodes all their
  tiles into one reference set, whose ``model_key`` names the tiling (a bank of tiles
  never meets an untiled detector, nor the reverse).

Timings: per-key sums of the wrapped detector's timings over the batches
(``tiles.<key>``), one entry per batch (``tile_batch_<i>``), ``split`` and ``stitch``;
``details["tiling"]`` gives the tile and batch counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.base import (
    AnomalyResult,
    Detector,
    ReferenceMismatchError,
    ReferenceSet,
    check_image,
    image_hash,
)

if TYPE_CHECKING:
    from prompts import ProductRecipe

DEFAULT_BATCH = 8  # tiles per predict_batch call: bounds memory, keeps GEMMs large


@dataclass(frozen=True)
class TilingConfig:
    """How to tile: ``tile`` and ``overlap`` in input pixels, ``batch`` tiles per model call.

    Parse the product setting with :meth:`from_dict` (``{"tile": 518, "overlap": 64}``;
    ``None``, ``{}``, ``"off"`` or ``{"enabled": false}`` mean no tiling).
    """

    tile: int
    overlap: int = 0
    batch: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        for name in ("tile", "overlap", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"tiling {name} must be an integer, got {value!r}")
        if self.tile < 32:
            raise ValueError(f"tiling tile must be at least 32 px, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tiling overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")
        if self.batch < 1:
            raise ValueError(f"tiling batch must be >= 1, got {self.batch}")

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | str | None) -> TilingConfig | None:
        """``{"tile": 518, "overlap": 64, "batch": 8}`` -> config; off -> ``None``; else ``ValueError``."""
        if value is None or (isinstance(value, str) and value.lower() in ("off", "none", "")):
            return None
        if not isinstance(value, Mapping):
            raise ValueError(
                f'tiling must be an object like {{"tile": 518, "overlap": 64}} or "off", got {value!r}'
            )
        if not value or value.get("enabled", True) is False:
            return None
        unknown = set(value) - {"tile", "overlap", "batch", "enabled"}
        if unknown:
            raise ValueError(f"unknown tiling setting(s): {', '.join(sorted(unknown))}")
        if "tile" not in value:
            raise ValueError('tiling needs "tile" (tile side in input pixels)')
        return cls(
            tile=value["tile"], overlap=value.get("overlap", 0), batch=value.get("batch", DEFAULT_BATCH)
        )

    def to_dict(self) -> dict[str, int]:
        return {"tile": self.tile, "overlap": self.overlap, "batch": self.batch}

    @property
    def tag(self) -> str:
        """Names the tiling in model keys (``batch`` does not change results, so it is left out)."""
        return f"tile{self.tile}-overlap{self.overlap}"


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles along one axis of ``length`` pixels (see the module docstring)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Tile:
    """One tile: ``image[y0 : y0 + height, x0 : x0 + width]``."""

    y0: int
    x0: int
    height: int
    width: int


def _crop(image: np.ndarray, t: Tile) -> np.ndarray:
    """The tile's pixels as a C-contiguous array (some preprocessors need contiguous input)."""
    return np.ascontiguousarray(image[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width])


def tile_grid(height: int, width: int, config: TilingConfig) -> list[Tile]:
    """The tiles of an ``height x width`` image, row-major."""
    th, tw = min(config.tile, height), min(config.tile, width)
    ys = tile_starts(height, config.tile, config.overlap)
    xs = tile_starts(width, config.tile, config.overlap)
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def _axis_weights(starts: list[int], size: int) -> list[np.ndarray]:
    """Per tile along one axis: float32 ``[size]`` feathering weights (linear ramps over overlaps)."""
    out = []
    d = np.arange(size, dtype=np.float64) + 0.5  # pixel centres from the tile's start
    for i, s in enumerate(starts):
        w = np.ones(size, dtype=np.float64)
        if i > 0:
            ov = starts[i - 1] + size - s  # overlap with the previous tile
            if ov > 0:
                w = np.minimum(w, d / ov)
        if i < len(starts) - 1:
            ov = s + size - starts[i + 1]  # overlap with the next tile
            if ov > 0:
                w = np.minimum(w, (size - d) / ov)
        out.append(w.astype(np.float32))
    return out


def stitch(maps: Sequence[np.ndarray], tiles: Sequence[Tile], height: int, width: int) -> np.ndarray:
    """Blend tile maps into one ``float32 (height, width)`` map (module docstring: feathering).

    ``maps[i]`` is ``(tiles[i].height, tiles[i].width)``; the tiles must come from
    :func:`tile_grid` (a full grid). One tile covering the image returns its map unchanged.
    """
    if len(tiles) == 1 and (tiles[0].height, tiles[0].width) == (height, width):
        return np.array(maps[0], dtype=np.float32, copy=True)
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    th, tw = tiles[0].height, tiles[0].width
    wy = dict(zip(ys, _axis_weights(ys, th), strict=True))
    wx = dict(zip(xs, _axis_weights(xs, tw), strict=True))
    acc = np.zeros((height, width), dtype=np.float32)
    wsum = np.zeros((height, width), dtype=np.float32)
    for m, t in zip(maps, tiles, strict=True):
        w = np.outer(wy[t.y0], wx[t.x0])  # [th, tw]
        acc[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += w * m
        wsum[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += w
    return acc / wsum


class TiledDetector(Detector):
    """Any detector, applied to overlapping tiles of each image (see the module docstring).

    Args:
        inner: the detector that scores tiles (any method).
        config: the tiling.
    """

    supports_references: bool  # type: ignore[misc]  # follows the wrapped detector
    requires_references: bool  # type: ignore[misc]  # follows the wrapped detector

    def __init__(self, inner: Detector, config: TilingConfig) -> None:
        if isinstance(inner, TiledDetector):
            raise ValueError("the detector is already tiled")
        self.inner = inner
        self.config = config
        self.model_name = inner.model_name
        self.weights_tag = inner.weights_tag
        self.device = inner.device
        self.random_weights = inner.random_weights
        self.supports_references = inner.supports_references
        self.requires_references = inner.requires_references

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.inner.method

    @property
    def model_key(self) -> str:
        """The wrapped detector's key plus the tiling (tile and overlap shape the reference banks)."""
        return f"{self.inner.model_key}/{self.config.tag}"

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        return self.inner.prompt_digest(object_name, product)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "tiling": self.config.to_dict()}

    def counters(self) -> dict[str, int]:
        """The wrapped detector's counters plus ``reference_tiles_encoded``."""
        return {**self.inner.counters(), **super().counters()}

    def tiles(self, image: np.ndarray) -> list[Tile]:
        return tile_grid(int(image.shape[0]), int(image.shape[1]), self.config)

    # --------------------------------------------------------------- references
    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        """Tile the golden images as inspected images are tiled; encode all tiles as one set."""
        if len(images) == 0:
            raise ValueError("at least one reference image is needed")
        crops: list[np.ndarray] = []
        for i, img in enumerate(images):
            check_image(img, f"reference image {i}")
            crops += [_crop(img, t) for t in self.tiles(img)]
        inner_refs = self.inner.encode_references(crops, object_name=object_name, product=product)
        self.count("reference_tiles_encoded", len(crops))
        return ReferenceSet(
            method=inner_refs.method,
            model_key=self.model_key,
            image_hashes=tuple(image_hash(img) for img in images),
            arrays=inner_refs.arrays,
        )

    def check_references(self, references: ReferenceSet | None) -> None:
        try:
            super().check_references(references)
        except ReferenceMismatchError as exc:
            if references is None or references.model_key == self.model_key:
                raise
            raise ReferenceMismatchError(
                f"{exc} (golden images must be tiled as the inspected images are)"
            ) from None

    def _inner_references(self, references: ReferenceSet | None) -> ReferenceSet | None:
        if references is None:
            return None
        return ReferenceSet(
            method=references.method,
            model_key=self.inner.model_key,
            image_hashes=references.image_hashes,
            arrays=references.arrays,
        )

    # ---------------------------------------------------------------- inference
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Tile every image, score all tiles in batches, stitch maps, score = max over tiles."""
        self.check_references(references)
        if len(images) == 0:
            return []
        t0 = time.perf_counter()
        per_image: list[list[Tile]] = []
        crops: list[np.ndarray] = []
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
            tiles = self.tiles(img)
            per_image.append(tiles)
            crops += [_crop(img, t) for t in tiles]
        inner_refs = self._inner_references(references)
        t1 = time.perf_counter()
        tile_results: list[AnomalyResult] = []
        timings: dict[str, float] = {"split": t1 - t0}
        n_batches = 0
        for start in range(0, len(crops), self.config.batch):
            tb = time.perf_counter()
            out = self.inner.predict_batch(
                crops[start : start + self.config.batch],
                object_name=object_name,
                product=product,
                references=inner_refs,
            )
            timings[f"tile_batch_{n_batches}"] = time.perf_counter() - tb
            for key, value in out[0].timings.items():  # the inner timings are per batch
                timings[f"tiles.{key}"] = timings.get(f"tiles.{key}", 0.0) + float(value)
            tile_results += out
            n_batches += 1
        t2 = time.perf_counter()
        stitched = []
        pos = 0
        for img, tiles in zip(images, per_image, strict=True):
            res = tile_results[pos : pos + len(tiles)]
            pos += len(tiles)
            m = stitch([r.anomaly_map for r in res], tiles, int(img.shape[0]), int(img.shape[1]))
            m.setflags(write=False)
            stitched.append((m, res, tiles))
        timings["stitch"] = time.perf_counter() - t2
        results = []
        for m, res, tiles in stitched:
            best = max(range(len(res)), key=lambda j: res[j].score)
            top = res[best]
            tb_ = tiles[best]
            tiling = {
                **self.config.to_dict(),
                "tiles": len(tiles),
                "batches": n_batches,
                "tiles_in_request": len(crops),
                "grid": [len({t.y0 for t in tiles}), len({t.x0 for t in tiles})],
                "max_tile": [tb_.y0, tb_.x0, tb_.height, tb_.width],
                "tile_scores": [round(float(r.score), 6) for r in res],
            }
            results.append(
                AnomalyResult(
                    score=float(top.score),
                    anomaly_map=m,
                    method=top.method,
                    model=top.model,
                    weights=top.weights,
                    prompt_digest=top.prompt_digest,
                    used_references=top.used_references,
                    random_weights=top.random_weights,
                    timings=dict(timings),
                    details={**dict(top.details), "tiling": tiling},
                )
            )
        return results


def tiled(detector: Detector, tiling: TilingConfig | Mapping[str, Any] | str | None) -> Detector:
    """``detector`` wrapped for ``tiling`` (a config or the product-setting dict); unchanged when off."""
    config = tiling if isinstance(tiling, TilingConfig) else TilingConfig.from_dict(tiling)
    return detector if config is None else TiledDetector(detector, config)


__all__ = [
    "DEFAULT_BATCH",
    "Tile",
    "TiledDetector",
    "TilingConfig",
    "stitch",
    "tile_grid",
    "tile_starts",
    "tiled",
]
