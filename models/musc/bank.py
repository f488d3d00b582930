"""The MuSc reference bank: pure functions on immutable :class:`models.base.ReferenceSet` s.

A bank holds, per image (oldest first), the arrays that MuSc needs to score a new image
against it:

- ``tokens``: ``[M, n_blocks, L, C]`` float32 (or float16, as the service stores them): each image's patch tokens of
  the feature blocks, already LayerNormed over the image (first half of LNAMD), so the
  bank needs no backbone pass and no per-image statistics at scoring time;
- ``embedding``: ``[M, E]`` image embeddings (same dtype) (RsCIN's, also a drift signal);
- ``added_at``: ``[M]`` float64, seconds since the epoch when the entry was encoded.

``ReferenceSet.to_bytes`` / ``from_bytes`` serialise a bank without pickle (a JSON header
with dtype and shape, then raw little-endian data). The functions here never mutate a
bank: they return a new one, so the service stores bytes and does read-modify-write
under its own lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.base import ReferenceMismatchError, ReferenceSet

BANK_ARRAYS: tuple[str, ...] = ("tokens", "embedding", "added_at")


def check_bank(bank: ReferenceSet) -> None:
    """Raise ``ValueError`` unless ``bank`` has the MuSc arrays with one row per image hash."""
    if bank.method != "musc":
        raise ReferenceMismatchError(f"not a MuSc bank: method {bank.method!r}")
    missing = [k for k in BANK_ARRAYS if k not in bank.arrays]
    if missing:
        raise ValueError(f"MuSc bank lacks arrays {missing}")
    tokens = bank.arrays["tokens"]
    if tokens.ndim != 4:
        raise ValueError(f"bank tokens must be [M, n_blocks, L, C], got shape {tokens.shape}")
    for k in BANK_ARRAYS:
        if bank.arrays[k].shape[0] != bank.count:
            raise ValueError(f"bank array {k!r} has {bank.arrays[k].shape[0]} rows for {bank.count} images")


def bank_concat(sets: Sequence[ReferenceSet]) -> ReferenceSet:
    """Concatenate banks (or one-image entries) in the given order, oldest first.

    All must come from the same detector configuration (same ``model_key``) and have the
    same per-image shapes and dtypes.
    """
    if not sets:
        raise ValueError("nothing to concatenate")
    first = sets[0]
    for s in sets:
        check_bank(s)
        if s.model_key != first.model_key:
            raise ReferenceMismatchError(
                f"bank entries come from different models: {first.model_key} vs {s.model_key}"
            )
        for k in BANK_ARRAYS:
            a, b = first.arrays[k], s.arrays[k]
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise ValueError(
                    f"bank array {k!r}: {b.dtype}{list(b.shape[1:])} does not fit {a.dtype}{list(a.shape[1:])}"
                )
    if len(sets) == 1:
        return first
    arrays = {k: np.concatenate([s.arrays[k] for s in sets], axis=0) for k in BANK_ARRAYS}
    hashes = tuple(h for s in sets for h in s.image_hashes)
    return ReferenceSet(method=first.method, model_key=first.model_key, image_hashes=hashes, arrays=arrays)


def bank_evict(bank: ReferenceSet, max_images: int) -> ReferenceSet:
    """The newest ``max_images`` images of ``bank`` (the oldest are dropped)."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    check_bank(bank)
    if bank.count <= max_images:
        return bank
    start = bank.count - max_images
    return ReferenceSet(
        method=bank.method,
        model_key=bank.model_key,
        image_hashes=bank.image_hashes[start:],
        arrays={k: bank.arrays[k][start:] for k in BANK_ARRAYS},
    )


def bank_append(bank: ReferenceSet | None, entry: ReferenceSet, *, max_images: int) -> ReferenceSet:
    """``bank`` + ``entry`` (newest last), then the oldest evicted beyond ``max_images``.

    ``bank=None`` starts a new bank. ``entry`` is what
    :meth:`models.musc.MuscDetector.encode_references` (or ``predict_stream``) returned
    for the image(s) to add.
    """
    merged = entry if bank is None else bank_concat([bank, entry])
    return bank_evict(merged, max_images)


def bank_split(bank: ReferenceSet) -> list[ReferenceSet]:
    """One single-image entry per bank image, oldest first (for one-key-per-image storage)."""
    check_bank(bank)
    return [
        ReferenceSet(
            method=bank.method,
            model_key=bank.model_key,
            image_hashes=(h,),
            arrays={k: bank.arrays[k][i : i + 1] for k in BANK_ARRAYS},
        )
        for i, h in enumerate(bank.image_hashes)
    ]


def bank_bytes_per_image(bank: ReferenceSet) -> int:
    """Bytes of array data per image (the ``to_bytes`` blob adds a header of ~100 bytes + 20 per image)."""
    check_bank(bank)
    return int(sum(bank.arrays[k][0:1].nbytes for k in BANK_ARRAYS)) if bank.count else 0


def bank_summary(bank: ReferenceSet) -> dict[str, Any]:
    """JSON-ready description: size, oldest/newest time, image hashes, bytes."""
    check_bank(bank)
    added = bank.arrays["added_at"]
    return {
        "size": bank.count,
        "oldest_added_at": float(added.min()) if bank.count else None,
        "newest_added_at": float(added.max()) if bank.count else None,
        "image_hashes": list(bank.image_hashes),
        "bytes_per_image": bank_bytes_per_image(bank),
        "bytes": int(sum(bank.arrays[k].nbytes for k in BANK_ARRAYS)),
        "dtype": str(bank.arrays["tokens"].dtype),
        "model_key": bank.model_key,
    }
