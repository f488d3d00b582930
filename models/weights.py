"""Weights manifest: which official checkpoint files exist, where they live, how to get them.

The manifest is data (``weights_manifest.json``). The service reads weights only
from one weights directory; this module maps manifest names to paths there and
says which are missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MANIFEST_PATH = Path(__file__).resolve().parent / "weights_manifest.json"
FETCH_COMMAND = "anomaly-inspect weights fetch"


@dataclass(frozen=True)
class WeightSpec:
    name: str
    file: str
    url: str
    licence: str
    used_by: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    is_dir: bool = False


@lru_cache(maxsize=1)
def manifest() -> dict[str, WeightSpec]:
    doc = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    out: dict[str, WeightSpec] = {}
    for name, e in doc["weights"].items():
        out[name] = WeightSpec(
            name=name,
            file=e["file"],
            url=e["url"],
            licence=e.get("licence", ""),
            used_by=tuple(e.get("used_by", ())),
            size=e.get("size"),
            sha256=e.get("sha256"),
            sha256_prefix=e.get("sha256_prefix"),
            is_dir=bool(e.get("is_dir", False)),
        )
    return out


def weights_path(name: str, weights_dir: str | Path) -> Path:
    try:
        spec = manifest()[name]
    except KeyError:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(sorted(manifest()))}") from None
    return Path(weights_dir) / spec.file


def fetch_hint(names: list[str] | tuple[str, ...], weights_dir: str | Path) -> str:
    """The exact command that downloads ``names`` into ``weights_dir``."""
    return f"{FETCH_COMMAND} {' '.join(names)} --dir {weights_dir}"


def missing_weights(names: list[str] | tuple[str, ...], weights_dir: str | Path) -> list[str]:
    return [n for n in names if not weights_path(n, weights_dir).exists()]
