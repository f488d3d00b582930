"""Start the real service (uvicorn subprocess, ZSI_DEMO=true) on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(tmp_path: Path, timeout_s: float = 120.0, **env: str) -> Iterator[str]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZSI_") and k != "REDIS_URL"}
    environ.update(
        {
            "ZSI_DEMO": "true",
            "ZSI_DEVICE": "cpu",
            "ZSI_DATA_DIR": str(tmp_path / "data"),
            "ZSI_WEIGHTS_DIR": str(tmp_path / "weights"),
            "PYTHONPATH": str(REPO),
            **env,
        }
    )
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"uvicorn exited with {proc.returncode}: {(tmp_path / 'uvicorn.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"service not ready in {timeout_s}s: {(tmp_path / 'uvicorn.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
