"""scripts/install.sh installs on a fresh machine and skips when nothing changed (issue 10, item 11).

Runs the real script against a fake ``.venv`` whose ``python`` records its calls, so no
package is installed and the shared environment is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "{log}"
exit 0
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", root / "scripts" / "install.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON.format(log=tmp_path / "calls.log"))
    python.chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return root


def run_install(root: Path, **env: str) -> tuple[str, list[str], float]:
    log = root.parent / "calls.log"
    log.unlink(missing_ok=True)
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return done.stdout + done.stderr, calls, seconds


def pip_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install")]


def test_install_runs_once_then_skips_until_pyproject_changes(checkout: Path) -> None:
    _, calls, _ = run_install(checkout)
    assert any("-e .[dev,onnx]" in c for c in pip_installs(calls)), calls  # fresh: installs

    out, calls, seconds = run_install(checkout)
    assert pip_installs(calls) == [], calls  # nothing changed: no pip at all
    assert "up to date" in out
    assert seconds < 5

    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# a dependency changed\n")
    _, calls, _ = run_install(checkout)
    assert pip_installs(calls), calls  # changed: installs again

    _, calls, _ = run_install(checkout, ZSI_FORCE_INSTALL="1")
    assert pip_installs(calls), calls


def test_runtime_folders_are_git_ignored() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    runtime = ("data/store/x", "data/demo/store/y", "weights/a.pt", "out/a.overlay.png", ".venv")
    # what docs/evaluation.md's commands write in the checkout: the demo dataset and eval reports
    evaluation = ("demo-data/weave/train/good/000.png", "eval-demo/report.json", "eval-out/cache/ab/c.npz")
    for path in (*runtime, *evaluation, "eval-mvtec-winclip-4shot/report.md"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert done.returncode == 0, f"{path} is not ignored"
