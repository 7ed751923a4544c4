"""Logging for the service: plain text or one JSON object per line (journald, log shippers)."""

from __future__ import annotations

import json
import logging
import sys

from runtime.config import LoggingConfig


class JsonLineFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"[, "exc"]}`` per record, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(cfg: LoggingConfig, verbose: bool = False) -> None:
    """Point the root logger at stderr with the configured level and format (replaces earlier handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if cfg.json_lines:
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, cfg.level))
