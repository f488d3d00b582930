"""The records database: engine from a URL (SQLite WAL by default, PostgreSQL by URL) and migrations.

The schema is made by Alembic (``service/migrations``, shipped inside the package), on
SQLite too. :func:`upgrade` runs them programmatically; on PostgreSQL under a
transaction-level advisory lock, on SQLite under a file lock, so several workers
starting at once migrate once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url

log = logging.getLogger("service.records")

#: Arbitrary constant key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK = 0x5A5349_0001
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


def default_url(data_dir: str | Path) -> str:
    """The embedded default: a SQLite file under ``ZSI_DATA_DIR/records``."""
    path = Path(data_dir).resolve() / "records" / "inspections.db"
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3 (the driver this project installs)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def backend_name(url: str) -> str:
    """``sqlite`` or ``postgresql`` (or another SQLAlchemy backend name)."""
    return make_url(normalize_url(url)).get_backend_name()


def safe_url(url: str) -> str:
    """The URL with its password hidden (for logs, /ready and errors)."""
    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def make_engine(url: str, *, timeout_s: float = 3.0, durable: bool = True) -> Engine:
    """An engine for ``url``. SQLite: WAL journal, ``synchronous=FULL`` when ``durable`` (else NORMAL),
    a busy timeout, and the parent directory created. PostgreSQL: connect timeout, pre-ping."""
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": max(timeout_s, 5.0), "check_same_thread": False})
        sync = "FULL" if durable else "NORMAL"

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, round(timeout_s))
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4, connect_args=connect_args)


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Any:
    """An Alembic ``Config`` for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database to ``revision``; returns the revision reached."""
    from alembic import command

    with _sqlite_file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), revision)
    return current_revision(engine)


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Several worker processes starting at once on one SQLite file migrate one after the other."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    fd = os.open(f"{database}.migrate.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "backend_name",
    "current_revision",
    "default_url",
    "head_revision",
    "make_engine",
    "normalize_url",
    "safe_url",
    "upgrade",
]
