"""Zero-shot anomaly detection models: WinCLIP/WinCLIP+, AnomalyCLIP, SAA+.

Typical use::

    from models import load_detector
    det = load_detector("winclip", weights=None, device="cpu")
    refs = det.encode_references([img1, img2], object_name="bottle")
    res = det.predict(img, object_name="bottle", references=refs)

No HTTP, no Redis here: see ``service/`` for those.
"""

from models.base import (
    RANDOM_INIT,
    AnomalyResult,
    ArrayCache,
    Detector,
    ImageError,
    LocalArrayCache,
    ReferenceMismatchError,
    ReferenceSet,
    ReferencesRequiredError,
    WeightsError,
)
from models.registry import (
    list_detectors,
    load_detector,
    load_detector_from_dir,
    load_tiny_detector,
    method_spec,
)

__all__ = [
    "RANDOM_INIT",
    "AnomalyResult",
    "ArrayCache",
    "Detector",
    "ImageError",
    "LocalArrayCache",
    "ReferenceMismatchError",
    "ReferenceSet",
    "ReferencesRequiredError",
    "WeightsError",
    "list_detectors",
    "load_detector",
    "load_detector_from_dir",
    "load_tiny_detector",
    "method_spec",
]
