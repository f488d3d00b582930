"""Detector registry: method name -> builder, with the weights each method needs.

Method modules register themselves on import; :func:`load_detector` imports the
built-in ones lazily so that ``import models`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import Detector, WeightsError
from models.weights import fetch_hint, missing_weights

_BUILTIN_MODULES = {
    "winclip": "models.winclip",
    "anomalyclip": "models.anomalyclip",
    "saa_plus": "models.saa",
    "anomalydino": "models.anomalydino",
    "musc": "models.musc",
}


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method.

    ``build(weights=..., device=..., **kwargs)`` builds a detector; ``weights`` is a
    path, ``None`` (official source) or :data:`models.base.RANDOM_INIT`.
    ``required_weights(**kwargs)`` lists the manifest names the default configuration
    needs; ``weights_from_dir(dir, **kwargs)`` turns a weights directory into the
    ``weights`` argument of ``build``.
    """

    name: str
    build: Callable[..., Detector]
    required_weights: Callable[..., tuple[str, ...]]
    weights_from_dir: Callable[..., Any]
    description: str = ""
    #: keyword arguments that select the tiny random-init test/demo configuration
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_detectors() -> list[str]:
    """Names of all known methods (built-in ones included, even if not imported yet)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def method_spec(method: str) -> MethodSpec:
    if method not in _REGISTRY and method in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[method])
    try:
        return _REGISTRY[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(list_detectors())}") from None


def load_detector(method: str, weights: Any = None, device: str = "cpu", **kwargs: Any) -> Detector:
    """Build a detector.

    Args:
        method: ``winclip``, ``anomalyclip``, ``saa_plus`` or ``musc``.
        weights: ``None`` for the official pretrained source (needs a network the first
            time), a local checkpoint path, or ``models.RANDOM_INIT`` for random weights
            (tests and the labelled demo mode only).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        **kwargs: method options (backbone, precision, cache, ...).
    """
    return method_spec(method).build(weights=weights, device=device, **kwargs)


def load_tiny_detector(method: str, device: str = "cpu", **kwargs: Any) -> Detector:
    """The method on its tiny random-init configuration (tests, labelled demo mode)."""
    from models.base import RANDOM_INIT

    spec = method_spec(method)
    return spec.build(weights=RANDOM_INIT, device=device, **{**spec.tiny_kwargs, **kwargs})


def load_detector_from_dir(
    method: str, weights_dir: str | Path, device: str = "cpu", **kwargs: Any
) -> Detector:
    """Build a detector from the files in ``weights_dir``; a clear error if any is missing."""
    spec = method_spec(method)
    needed = spec.required_weights(**kwargs)
    missing = missing_weights(needed, weights_dir)
    if missing:
        raise WeightsError(
            f"method {method!r} needs weights that are not in {weights_dir}: {', '.join(missing)}. "
            f"Fetch them where a network exists with: {fetch_hint(missing, weights_dir)}"
        )
    return spec.build(weights=spec.weights_from_dir(Path(weights_dir), **kwargs), device=device, **kwargs)
