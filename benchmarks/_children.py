"""Shared by the ``*_vs_*`` comparison scripts: run one timed side in a child process.

Each side (this project, or the reference in its own virtualenv or checkout) runs in a
fresh ``python -c CODE ARGS...`` process that prints one JSON line; this module holds
the runner and the environment that limits torch's libraries to AVX2.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

#: oneDNN, ATen and MKL limited to AVX2: the closest an AVX-512 machine comes to an AVX2-only CPU
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_child(python: str, code: str, args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``python -c code *args`` with ``env`` added to this environment; its last JSON line."""
    out = subprocess.run(
        [python, "-c", code, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{python} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    return result
