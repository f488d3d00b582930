"""``anomaly-inspect db``: the records database schema (Alembic migrations shipped in the package).

    anomaly-inspect db upgrade     # migrate ZSI_DATABASE_URL (or the SQLite default) to the newest schema
    anomaly-inspect db current     # the schema revision the database is at
    anomaly-inspect db heads       # the newest revision this version of the service needs

The service migrates by itself at start unless ``ZSI_DB_AUTO_MIGRATE=false`` (e.g. when
its database role may not change the schema): then run ``db upgrade`` once per release.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomaly-inspect db", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["upgrade", "current", "heads"])
    parser.add_argument(
        "--url", help="database URL (default: ZSI_DATABASE_URL, else the SQLite file in ZSI_DATA_DIR)"
    )
    parser.add_argument("--revision", default="head", help="target of upgrade (default: head)")
    args = parser.parse_args(argv)

    from sqlalchemy.exc import SQLAlchemyError

    from service.records.db import (
        current_revision,
        default_url,
        head_revision,
        make_engine,
        safe_url,
        upgrade,
    )
    from service.settings import Settings

    if args.action == "heads":
        print(head_revision())
        return 0
    settings = Settings()
    url = args.url or settings.database_url or default_url(settings.data_dir)
    engine = make_engine(url, timeout_s=settings.db_timeout_s)
    try:
        if args.action == "upgrade":
            rev = upgrade(engine, args.revision)
            print(f"{safe_url(url)}: at schema {rev}")
        else:
            print(current_revision(engine) or "none (empty database: run `anomaly-inspect db upgrade`)")
    except SQLAlchemyError as exc:
        print(f"error: {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
