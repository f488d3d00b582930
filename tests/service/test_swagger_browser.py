"""Swagger UI in headless Chromium: Try it out on POST /inspect with an uploaded image (scripts/swagger_check.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.service.live import REPO, live_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

sys.path.insert(0, str(REPO / "scripts"))
from swagger_check import find_binaries  # noqa: E402

_browser, _driver = find_binaries()


@pytest.mark.skipif(
    _browser is None or _driver is None,
    reason="chromium + chromedriver not installed (scripts/ensure_chromium.sh installs Debian's)",
)
@pytest.mark.skipif(
    importlib.util.find_spec("selenium") is None, reason="selenium not installed (pip install selenium)"
)
def test_swagger_try_it_out_inspect(tmp_path):
    shot = tmp_path / "swagger.png"
    with live_server(tmp_path) as url:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "swagger_check.py"),
                "--url",
                url,
                "--screenshot",
                str(shot),
                "--timeout",
                "90",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["status"] == 200 and out["product"] == "bottle" and out["demo"] is True
    assert shot.stat().st_size > 10_000
