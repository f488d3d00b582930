"""Every benchmark script imports against the current code (the scripts are run by hand, not in CI).

A renamed or moved function used to break ``benchmarks/anomalydino_latency.py`` at its
first line without any test noticing; importing each script (its ``main`` is not run:
real-size models, minutes each) catches that class of breakage cheaply.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

#: the scripts; ``_*.py`` are helpers they share (imported by the scripts, so checked with them)
BENCHMARKS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if not p.name.startswith("_")
)


def test_there_are_benchmarks() -> None:
    assert any(p.name == "anomalydino_latency.py" for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_script_imports_and_has_a_main(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"_benchmark_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: the scripts guard main() with __name__
    assert callable(getattr(module, "main", None))
