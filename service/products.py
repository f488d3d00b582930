"""Product recipes: built-ins from ``prompts/`` plus ones created through the API.

Created recipes live in the shared store (Redis when configured, else JSON files in
``ZSI_DATA_DIR``), so every process sharing that store sees them. A ``PUT`` on a
built-in id stores an *override* (the built-in file is untouched); ``DELETE`` removes
the override and the built-in is back. Built-ins themselves cannot be deleted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from prompts import (
    ProductRecipe,
    PromptFileError,
    ThresholdCalibration,
    builtin_products,
    is_valid_product_id,
    parse_product,
)
from service.cache import BlobCache
from service.errors import ApiError

log = logging.getLogger("service.products")

Source = Literal["builtin", "custom", "override"]


class ProductStore:
    """Created recipes and overrides in ``store``; a corrupt stored recipe reads as absent
    and is counted through ``on_corrupt("product")``."""

    def __init__(
        self, store: BlobCache, *, prefix: str = "zsi:", on_corrupt: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.prefix = f"{prefix}product:"
        self._on_corrupt = on_corrupt

    def _key(self, product_id: str) -> str:
        return self.prefix + product_id

    @staticmethod
    def check_id(product_id: str) -> None:
        if not is_valid_product_id(product_id):
            raise ApiError(
                422,
                "invalid_product_id",
                f"product id {product_id!r} must be 1-64 lowercase letters, digits, '_' or '-'",
            )

    def _stored(self, product_id: str) -> ProductRecipe | None:
        blob = self.store.get(self._key(product_id))
        if blob is None:
            return None
        try:
            return parse_product(json.loads(blob), f"stored product {product_id}")
        except (PromptFileError, ValueError) as exc:
            log.warning("ignoring a corrupt stored product %s: %s", product_id, exc)
            if self._on_corrupt:
                self._on_corrupt("product")
            return None

    def get(self, product_id: str) -> tuple[ProductRecipe, Source]:
        """The recipe and where it comes from; 404 when unknown."""
        stored = self._stored(product_id) if is_valid_product_id(product_id) else None
        builtin = builtin_products().get(product_id)
        if stored is not None:
            return stored, "override" if builtin is not None else "custom"
        if builtin is not None:
            return builtin, "builtin"
        raise ApiError(
            404,
            "unknown_product",
            f"unknown product {product_id!r}; GET /products lists them, PUT /products/{{id}} creates one",
            product=product_id,
        )

    def list(self) -> list[tuple[ProductRecipe, Source]]:
        out: dict[str, tuple[ProductRecipe, Source]] = {
            pid: (recipe, "builtin") for pid, recipe in builtin_products().items()
        }
        for key in self.store.keys(self.prefix):
            pid = key[len(self.prefix) :]
            recipe = self._stored(pid)
            if recipe is not None:
                out[pid] = (recipe, "override" if pid in builtin_products() else "custom")
        return [out[k] for k in sorted(out)]

    def put(
        self, product_id: str, body: dict[str, Any], *, threshold_given: bool | None = None
    ) -> tuple[ProductRecipe, Source, bool]:
        """Create or replace; returns the recipe, its source and whether it was new.

        A calibrated threshold survives a replacement that leaves the threshold alone: when
        the product has a calibration and the body omits ``threshold`` (``threshold_given``
        False) or gives exactly the calibrated value, the calibration and its threshold are
        kept (answers then warn if the new words make it stale). Any other threshold is a
        hand-set one and clears the calibration. ``calibration`` itself cannot be PUT.
        ``threshold_given`` None: whether ``body`` holds a ``threshold``.
        """
        if threshold_given is None:
            threshold_given = body.get("threshold") is not None
        self.check_id(product_id)
        if "id" in body and body["id"] != product_id:
            raise ApiError(422, "invalid_product", f"body id {body['id']!r} differs from the path id")
        if "calibration" in body:
            raise ApiError(
                422,
                "invalid_product",
                "calibration is set by POST /products/{id}/calibrate, not by PUT",
            )
        doc = {k: v for k, v in body.items() if v is not None}
        doc["id"] = product_id
        stored = self._stored(product_id)
        previous = stored if stored is not None else builtin_products().get(product_id)
        cal = previous.calibration if previous is not None else None
        if cal is not None and (not threshold_given or doc.get("threshold") == cal.threshold):
            doc["threshold"] = cal.threshold
            doc["calibration"] = cal.model_dump(mode="json")
        try:
            recipe = parse_product(doc, f"product {product_id}")
        except PromptFileError as exc:
            raise ApiError(422, "invalid_product", str(exc)) from None
        existed = stored is not None or product_id in builtin_products()
        self.store.set(self._key(product_id), recipe.model_dump_json().encode())
        return recipe, "override" if product_id in builtin_products() else "custom", not existed

    def set_calibration(
        self, product_id: str, expected: ProductRecipe, calibration: ThresholdCalibration
    ) -> tuple[ProductRecipe, Source]:
        """Store ``expected`` with the calibrated threshold (an override for a built-in).

        ``expected`` is the recipe the calibration scored with; if the product changed
        meanwhile (a PUT or DELETE while the model was busy), nothing is stored: 409.
        """
        current, _ = self.get(product_id)
        if recipe_without_threshold(current) != recipe_without_threshold(expected):
            raise ApiError(
                409,
                "product_changed",
                f"product {product_id!r} was changed while it was being calibrated; calibrate again",
                product=product_id,
            )
        recipe = expected.model_copy(update={"threshold": calibration.threshold, "calibration": calibration})
        recipe = parse_product(recipe.model_dump(mode="json"), f"product {product_id}")  # validated
        self.store.set(self._key(product_id), recipe.model_dump_json().encode())
        return recipe, "override" if product_id in builtin_products() else "custom"

    def delete(self, product_id: str) -> Source:
        """Delete a created product or an override; 409 for a plain built-in, 404 when unknown."""
        _, source = self.get(product_id)
        if source == "builtin":
            raise ApiError(
                409,
                "builtin_product",
                f"{product_id!r} is a built-in product and cannot be deleted (only overrides can)",
                product=product_id,
            )
        self.store.delete(self._key(product_id))
        return source


def recipe_without_threshold(recipe: ProductRecipe) -> dict[str, Any]:
    """The recipe's fields apart from its threshold and calibration (what a calibration scored with)."""
    return recipe.model_dump(mode="json", exclude={"threshold", "calibration"})


def threshold_source(recipe: ProductRecipe | None) -> str:
    """``generic`` (no product), ``calibrated`` (the recipe's threshold is its calibration's) or ``product``."""
    if recipe is None:
        return "generic"
    cal = recipe.calibration
    return "calibrated" if cal is not None and cal.threshold == recipe.threshold else "product"
