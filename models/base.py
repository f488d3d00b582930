"""The detector interface shared by every method, and its small value types.

Public edge: numpy. Images are ``HWC uint8 RGB`` arrays, values in [0, 255].
Anomaly maps are ``float32 (H, W)`` arrays at the INPUT resolution, values in [0, 1].
Torch stays inside the detectors.

This module knows nothing about HTTP or Redis: caching goes through the tiny
:class:`ArrayCache` protocol, which the service implements on Redis.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from models.serialization import SerializationError, pack_arrays, unpack_arrays

if TYPE_CHECKING:
    from prompts import ProductRecipe

#: Pass as ``weights=`` to build a model on random weights (tests, demo mode only).
RANDOM_INIT = "random-init"


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the architecture.

    The message always says which file and what to do (usually the fetch command).
    """


class ImageError(ValueError):
    """An input array is not an ``HWC uint8 RGB`` image."""


class ReferenceMismatchError(ValueError):
    """References were encoded by another method, model or weights than the detector's."""


class ReferencesRequiredError(ValueError):
    """The method scores against golden images (e.g. AnomalyDINO) and none were given.

    The service answers it with a 4xx saying to upload golden images for the product.
    """


@dataclass(frozen=True)
class AnomalyResult:
    """What a detector says about one image.

    Attributes:
        score: image anomaly score in [0, 1].
        anomaly_map: ``float32 (H, W)`` at the input resolution, values in [0, 1], read-only.
        method: detector name (``winclip``, ``anomalyclip``, ``saa_plus``).
        model: architecture name.
        weights: weights tag, file name, or ``random-init``.
        prompt_digest: hash of the exact prompt set used.
        used_references: whether few-shot reference features took part.
        random_weights: True when the model runs on random weights (demo/tests):
            such output is NOT a real inspection result.
        timings: seconds per stage.
        details: method-specific extras (e.g. SAA+ boxes), JSON-serialisable.
    """

    score: float
    anomaly_map: np.ndarray
    method: str
    model: str
    weights: str
    prompt_digest: str
    used_references: bool = False
    random_weights: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceSet:
    """Immutable few-shot reference features (WinCLIP+ memory), reusable across calls.

    ``arrays`` hold float32 numpy arrays (read-only). ``model_key`` names the
    method, architecture and weights that produced them, so references cannot be
    used with another model by mistake.
    """

    method: str
    model_key: str
    image_hashes: tuple[str, ...]
    arrays: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        frozen = {}
        for name, arr in self.arrays.items():
            a = np.array(arr, copy=True)
            a.setflags(write=False)
            frozen[name] = a
        object.__setattr__(self, "arrays", MappingProxyType(frozen))

    @property
    def count(self) -> int:
        return len(self.image_hashes)

    def to_bytes(self) -> bytes:
        meta = {"method": self.method, "model_key": self.model_key, "image_hashes": list(self.image_hashes)}
        return pack_arrays(dict(self.arrays), meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> ReferenceSet:
        """Decode :meth:`to_bytes` output; any malformed blob raises :class:`SerializationError`."""
        arrays, meta = unpack_arrays(blob)
        method, model_key, hashes = meta.get("method"), meta.get("model_key"), meta.get("image_hashes")
        if not isinstance(method, str) or not isinstance(model_key, str):
            raise SerializationError("corrupt reference blob: method and model_key must be strings")
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            raise SerializationError("corrupt reference blob: image_hashes must be a list of strings")
        return cls(method=method, model_key=model_key, image_hashes=tuple(hashes), arrays=arrays)


@runtime_checkable
class ArrayCache(Protocol):
    """Where detectors keep expensive, content-addressed arrays (text prototypes).

    Keys are computed by the detector from model, weights and prompt content.
    Implementations must never raise on a backend failure: return ``None`` / drop.
    """

    def get_array(self, key: str) -> np.ndarray | None: ...

    def set_array(self, key: str, value: np.ndarray) -> None: ...


class LocalArrayCache:
    """Thread-safe in-process LRU :class:`ArrayCache` (the embedded default)."""

    def __init__(self, max_items: int = 256) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.max_items = max_items

    def get_array(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def set_array(self, key: str, value: np.ndarray) -> None:
        v = np.array(value, copy=True)
        v.setflags(write=False)
        with self._lock:
            self._items[key] = v
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


def usable_cached(value: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``value`` read from an :class:`ArrayCache` if it is a finite float32 array of ``shape``, else
    ``None``: the caller recomputes and stores a good value over it (keys are content hashes,
    so a value of another shape is corrupt, never an older version)."""
    if value is None or value.dtype != np.float32 or tuple(value.shape) != shape:
        return None
    return value if bool(np.isfinite(value).all()) else None


def image_hash(image: np.ndarray) -> str:
    """Content hash of an image array (shape + pixels), 16 hex chars."""
    h = hashlib.sha256()
    h.update(str(tuple(image.shape)).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:16]


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """Validate an ``HWC uint8 RGB`` array and return it (no copy)."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name} must have shape (H, W, 3) RGB, got {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name} must be uint8, got {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageError(f"{name} is too small: {image.shape[1]}x{image.shape[0]}")
    return image


def leave_one_out_indices(images: Sequence[np.ndarray]) -> list[list[int]]:
    """For each image ``i``, the indices of the images it may be scored against.

    Every image except ``i`` and the images pixel-identical to it (same
    :func:`image_hash`). Raises ``ValueError`` when one of them is left with none.
    """
    hashes = [image_hash(img) for img in images]
    out = []
    for i, h in enumerate(hashes):
        others = [j for j, g in enumerate(hashes) if g != h]
        if not others:
            raise ValueError(
                f"leave-one-out needs at least 2 distinct images: image {i} has no other image to "
                f"be scored against ({len(images)} given)"
            )
        out.append(others)
    return out


class Detector(ABC):
    """One anomaly detection method on one loaded model.

    Detectors hold the model and caches of request-independent data only (text
    prototypes); they keep no per-request state, so ``predict`` may be called from
    several threads at once.
    """

    method: ClassVar[str]
    supports_references: ClassVar[bool] = False
    #: True for a method with no zero-shot mode (AnomalyDINO): ``predict`` needs references
    requires_references: ClassVar[bool] = False

    model_name: str
    weights_tag: str
    device: str
    random_weights: bool

    def count(self, name: str, n: int = 1) -> None:
        """Increment a work counter (e.g. ``text_prototypes_computed``); thread-safe."""
        lock = self.__dict__.setdefault("_counter_lock", threading.Lock())
        with lock:
            counters = self.__dict__.setdefault("_counters", {})
            counters[name] = counters.get(name, 0) + n

    def counters(self) -> dict[str, int]:
        """Work done so far, e.g. ``{"text_prototypes_computed": 2, "references_encoded": 1}``."""
        lock = self.__dict__.setdefault("_counter_lock", threading.Lock())
        with lock:
            return dict(self.__dict__.get("_counters", {}))

    @property
    def model_key(self) -> str:
        """``method/model/weights`` identity used in every cache key."""
        return f"{self.method}/{self.model_name}/{self.weights_tag}"

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model_name,
            "weights": self.weights_tag,
            "device": str(self.device),
            "random_weights": self.random_weights,
            "supports_references": self.supports_references,
            "requires_references": self.requires_references,
        }

    @abstractmethod
    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        """Hash of the exact prompt set a call with these arguments would use."""

    @abstractmethod
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Score a batch of ``HWC uint8 RGB`` images of one product."""

    def predict(
        self,
        image: np.ndarray,
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> AnomalyResult:
        """Score one ``HWC uint8 RGB`` image. ``object_name`` defaults to the product's."""
        return self.predict_batch([image], object_name=object_name, product=product, references=references)[0]

    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        """Encode normal ("golden") images into an immutable :class:`ReferenceSet`."""
        raise NotImplementedError(f"method {self.method!r} does not use reference images")

    def leave_one_out(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> list[AnomalyResult]:
        """Score each golden image as a fresh part would be: never against itself.

        Result ``i`` scores ``images[i]`` against references encoded from all the OTHER
        images (every image pixel-identical to ``images[i]`` is left out too, so a
        duplicated golden image is not its own neighbour). These scores are what
        threshold calibration needs (:mod:`models.calibration`): a golden image scored
        against a set holding itself would look far more normal than a new part.

        A method without references (``supports_references`` False) has nothing to
        leave out: the images are scored with :meth:`predict_batch`.

        This generic version encodes ``K - 1`` references ``K`` times (``O(K^2)`` image
        encodings); detectors override it with a faster path giving the same numbers.

        Args:
            images: ``K`` ``HWC uint8 RGB`` normal images of one product (sizes may differ).

        Returns:
            ``K`` :class:`AnomalyResult`, in order; ``used_references`` is True for
            reference methods and ``details["reference_count"]`` is the number of
            images result ``i`` was scored against.

        Raises:
            ValueError: a reference method got an image with no other (distinct) image
                to be scored against (fewer than 2 distinct images).
        """
        if not self.supports_references:
            return self.predict_batch(images, object_name=object_name, product=product)
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        results: list[AnomalyResult] = []
        for i, others in enumerate(leave_one_out_indices(images)):
            refs = self.encode_references(
                [images[j] for j in others], object_name=object_name, product=product
            )
            res = self.predict(images[i], object_name=object_name, product=product, references=refs)
            details = {**res.details, "reference_count": len(others), "leave_one_out": True}
            results.append(replace(res, details=details))
        return results

    def check_references(self, references: ReferenceSet | None) -> None:
        if references is None:
            return
        if not self.supports_references:
            raise ReferenceMismatchError(f"method {self.method!r} does not use reference images")
        if references.model_key != self.model_key:
            raise ReferenceMismatchError(
                f"references were encoded by {references.model_key}, this detector is {self.model_key}"
            )
