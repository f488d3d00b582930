"""Logging set-up of the service: timestamps on every line, third-party chatter kept out.

Our loggers (``service``, ``models``, ``prompts``) log at ``level``; everything else,
including the root logger that open_clip writes its ``INFO:root`` lines to, at WARNING.
uvicorn's own loggers get the same timestamped format through :func:`uvicorn_log_config`.
"""

from __future__ import annotations

import copy
import logging
from typing import IO, Any

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"
OUR_LOGGERS = ("service", "models", "prompts")
_MARK = "_zsi_handler"


def configure_logging(level: str | int = "INFO", *, stream: IO[str] | None = None) -> None:
    """Idempotent: adds one timestamped handler to the root logger if it has none yet.

    A root logger that already has handlers (set up by the host application, or by
    pytest) keeps them; only the levels are set.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    our_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(our_level)


def uvicorn_log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's default logging config with timestamps (``uvicorn.run(log_config=...)``)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    formatters = config["formatters"]
    formatters["default"]["fmt"] = "%(asctime)s.%(msecs)03d %(levelprefix)s %(message)s"
    formatters["access"]["fmt"] = (
        '%(asctime)s.%(msecs)03d %(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    )
    for f in ("default", "access"):
        formatters[f]["datefmt"] = DATEFMT
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        if name in config.get("loggers", {}):
            config["loggers"][name]["level"] = level.upper()
    return config


__all__ = ["DATEFMT", "FORMAT", "configure_logging", "uvicorn_log_config"]
