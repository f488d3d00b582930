"""PostgreSQL for the records tests: a fresh database on the shared server, or a server of our own.

- :func:`pg_url` (fixture): a new, empty database on the server of ``ZSI_TEST_DATABASE_URL``
  (default ``postgresql+psycopg://postgres@127.0.0.1:5432/zsi_test``, made by
  scripts/ensure_postgres.sh), dropped afterwards. Skips with the reason when no server
  answers; fails instead under ``CI=1`` (as the Redis fixture does).
- :class:`OwnPostgres`: a throw-away server (``initdb`` in a temporary folder, a free port)
  that a test may stop and start: the shared server on 5432 is never stopped.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.service.live import free_port

TEST_URL = os.environ.get("ZSI_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/zsi_test")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL needed under CI: {reason}")
    pytest.skip(f"{reason}; run scripts/ensure_postgres.sh (or set ZSI_TEST_DATABASE_URL)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh empty database on the test server (dropped after the test)."""
    base = make_url(TEST_URL)
    admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"zsit_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        _unavailable(
            f"no PostgreSQL at {base.render_as_string(hide_password=True)} ({type(exc).__name__}: {exc})"
        )
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def pg_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for b in reversed(found):
        if (Path(b) / "initdb").is_file() and (Path(b) / "pg_ctl").is_file():
            return Path(b)
    return None


class OwnPostgres:
    """A PostgreSQL server of this test: ``initdb`` into a temporary folder, on a free port.

    As root, PostgreSQL must run as another OS user: the ``postgres`` user (``runuser``).
    """

    def __init__(self) -> None:
        bins = pg_binaries()
        if bins is None:
            _unavailable("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        assert bins is not None
        self.bin = bins
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="zsi-own-pg-"))
        self.data = self.dir / "data"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: like a crash or a pulled cable (no clean shutdown)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def wait_down(self, timeout_s: float = 10.0) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return
            time.sleep(0.1)
        raise AssertionError("PostgreSQL did not stop")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.close()
