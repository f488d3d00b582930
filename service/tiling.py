"""High-resolution tiling in the service: a product's ``tiling`` setting and its limits.

A product recipe may carry ``tiling: {"tile": 518, "overlap": 64}`` (pixels of the input
image, :class:`prompts.TilingSpec`). Its inspections then run the method through
:class:`models.tiling.TiledDetector` on the method's worker (the queue keeps one wrapper
per tiling, :meth:`service.queue.InferenceQueue.detector_for`), and its golden images are
encoded tiled the same way (the reference set's model key ends with the tiling, so a
changed tiling never meets a bank made under another one).

``ZSI_TILE_BATCH`` sets the tiles per model call (it does not change results, so it is
not part of the recipe); ``ZSI_MAX_TILES`` bounds the tiles of one image: an image that
would need more is refused with 413 ``too_many_tiles`` before any model work.
"""

from __future__ import annotations

from models.tiling import TilingConfig, tile_starts
from prompts import ProductRecipe
from service.errors import ApiError
from service.settings import Settings


def tiling_config(recipe: ProductRecipe | None, settings: Settings) -> TilingConfig | None:
    """The recipe's tiling as a :class:`TilingConfig` (``batch`` = ZSI_TILE_BATCH); None when off."""
    if recipe is None or recipe.tiling is None:
        return None
    return TilingConfig(tile=recipe.tiling.tile, overlap=recipe.tiling.overlap, batch=settings.tile_batch)


def tiling_tag(recipe: ProductRecipe | None) -> str | None:
    """The recipe's tiling as it shapes scores (tile and overlap, e.g. ``tile518-overlap64``); None when off."""
    if recipe is None or recipe.tiling is None:
        return None
    return TilingConfig(tile=recipe.tiling.tile, overlap=recipe.tiling.overlap).tag


def tile_count(height: int, width: int, config: TilingConfig) -> int:
    """How many tiles an ``height x width`` image is cut into (as :func:`models.tiling.tile_grid`)."""
    return len(tile_starts(height, config.tile, config.overlap)) * len(
        tile_starts(width, config.tile, config.overlap)
    )


def check_tiles(
    height: int, width: int, config: TilingConfig | None, max_tiles: int, what: str = "the image"
) -> int:
    """The tile count of one image; 413 ``too_many_tiles`` when it is over ``max_tiles``."""
    if config is None:
        return 1
    n = tile_count(height, width, config)
    if n > max_tiles:
        raise ApiError(
            413,
            "too_many_tiles",
            f"{what} ({width}x{height}) needs {n} tiles of {config.tile} px (overlap {config.overlap}); "
            f"at most {max_tiles} (ZSI_MAX_TILES): send a smaller image, or give the product a larger "
            "tile or a smaller overlap",
            tiles=n,
            max_tiles=max_tiles,
            tiling={"tile": config.tile, "overlap": config.overlap},
        )
    return n


__all__ = ["check_tiles", "tile_count", "tiling_config"]
