"""Logging setup shared by every service: one line per event, the logger name and level on each."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("PDMESH_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=getattr(logging, level_name, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
