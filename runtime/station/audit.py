"""Audit log: who did what, when, old and new value -- in SQLite (``audit.sqlite3``) and on MQTT.

Each entry is published (spooled, at-least-once, like verdicts) as JSON on ``<prefix>/<device>/audit`` when the
service has a broker.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    """Append-only audit table.

    Args:
        path: SQLite file.
        publish: called with each entry's JSON bytes (e.g. spool it for MQTT); ``None`` without a broker.
    """

    def __init__(self, path: Path, publish: Callable[[bytes], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
            "user TEXT NOT NULL, action TEXT NOT NULL, target TEXT, old TEXT, new TEXT, addr TEXT)"
        )
        self._lock = threading.Lock()
        self.publish = publish

    def record(
        self, user: str, action: str, target: str | None = None, old: Any = None, new: Any = None, addr: str = ""
    ) -> dict[str, Any]:
        """Store one entry (values JSON-encoded) and publish it; returns the entry."""
        entry = {"ts": round(time.time(), 6), "user": user, "action": action, "target": target, "old": old,
                 "new": new, "addr": addr}  # fmt: skip
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO audit (ts, user, action, target, old, new, addr) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry["ts"], user, action, target, json.dumps(old), json.dumps(new), addr),
            )
            entry["id"] = cur.lastrowid
        log.info("audit: %s %s %s: %s -> %s", user, action, target or "", old, new)
        if self.publish is not None:
            try:
                self.publish(json.dumps(entry, separators=(",", ":")).encode())
            except Exception:  # the SQLite row is the record; MQTT is a copy
                log.exception("audit: cannot publish entry %s", entry["id"])
        return entry

    def entries(self, limit: int = 200, action: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        q = "SELECT id, ts, user, action, target, old, new, addr FROM audit"
        args: tuple[Any, ...] = ()
        if action:
            q += " WHERE action = ?"
            args = (action,)
        q += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(q, (*args, limit)).fetchall()
        keys = ("id", "ts", "user", "action", "target", "old", "new", "addr")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["old"], d["new"] = json.loads(d["old"]), json.loads(d["new"])
            out.append(d)
        return out

    def close(self) -> None:
        self._db.close()
