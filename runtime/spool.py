"""On-disk outbox (SQLite, stdlib) behind at-least-once delivery of verdicts.

Every result (and alert, and trigger error reply) is committed here *before* it is handed to the MQTT client and
deleted only when the broker acknowledges it (PUBACK/PUBCOMP; QoS 0: once written to the socket). After a broker
outage or a process restart the backlog is published again in ``id`` order, so consumers see every message at least
once and dedupe by ``(device, seq)``.

Durability choice: ``journal_mode=WAL`` with ``synchronous=FULL``. WAL with ``NORMAL`` already survives a process
crash (SIGKILL, OOM kill, systemd watchdog abort), but a power cut -- the usual way a line PC dies -- may roll back
the last transactions, i.e. lose verdicts for parts that already left the station. ``FULL`` fsyncs the WAL on every
commit of new messages: one fsync per inspected frame (measured ~4 ms p50 on this repo's CI VM disk, 0.06 ms
with ``NORMAL``; small next to inference). Deletes on PUBACK run with ``NORMAL`` (and are batched by the publisher):
losing one to a power cut only re-sends a message, which at-least-once consumers already dedupe.

Bounds: at most ``max_messages`` rows and nothing older than ``max_age_s``; overflow deletes the *oldest* rows and
counts them (``dropped``, reported in stats; ``dropped_total`` persists across restarts).

The result sequence number (``seq``) is a per-device counter kept in the same database, so it keeps increasing across
restarts; it is allocated in the same transaction that stores the messages carrying it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    correlation BLOB,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created);
"""
_AGE_CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class OutMessage:
    """A message to store: MQTT topic, payload bytes, QoS, retain flag, MQTT v5 correlation data (or ``None``)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None


@dataclass(frozen=True)
class SpoolItem:
    """A stored message; ``id`` orders delivery, ``seq`` is the result sequence it belongs to (``None``: no seq)."""

    id: int
    seq: int | None
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None
    created: float


class Spool:
    """Thread-safe SQLite outbox. One connection, one lock: writes are tiny and serialised anyway.

    Args:
        path: database file; parent folders are created.
        max_messages: row bound; adding beyond it drops the oldest rows.
        max_age_s: rows older than this (seconds, wall clock) are dropped.
        clock: wall-clock source (seconds since the epoch), replaceable in tests.
    """

    def __init__(
        self,
        path: str | Path,
        max_messages: int = 100_000,
        max_age_s: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.dropped = 0  # dropped by the bounds since this process opened the spool
        self._last_age_check = 0.0
        with self._lock:
            self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            self._enforce_bounds(force_age=True)
        log.info("spool %s opened: %d message(s) pending, next seq %d", self.path, self._depth, self.peek_seq())

    # -- writing ---------------------------------------------------------------------------------------------------

    def add(self, build: Callable[[int], Sequence[OutMessage]]) -> tuple[int, list[SpoolItem]]:
        """Allocate the next ``seq``, build the messages that carry it and store them, all in one transaction.

        Args:
            build: called with the new seq (under the spool lock: keep it cheap, no I/O) and returns the messages.

        Returns:
            ``(seq, stored items)``.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
                seq = int(row[0]) if row else 1
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (seq + 1,),
                )
                items = self._insert(build(seq), seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += len(items)
            self._enforce_bounds()
        return seq, items

    def put(self, messages: Sequence[OutMessage], seq: int | None = None) -> list[SpoolItem]:
        """Store messages without allocating a seq (e.g. trigger error replies)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                items = self._insert(messages, seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += len(items)
            self._enforce_bounds()
        return items

    def _insert(self, messages: Sequence[OutMessage], seq: int | None) -> list[SpoolItem]:
        now = self._clock()
        items = []
        for m in messages:
            cur = self._db.execute(
                "INSERT INTO outbox (seq, topic, payload, qos, retain, correlation, created) VALUES (?,?,?,?,?,?,?)",
                (seq, m.topic, m.payload, m.qos, int(m.retain), m.correlation, now),
            )
            assert cur.lastrowid is not None
            items.append(SpoolItem(cur.lastrowid, seq, m.topic, m.payload, m.qos, m.retain, m.correlation, now))
        return items

    def _enforce_bounds(self, force_age: bool = False) -> None:
        """Drop the oldest rows beyond ``max_messages`` and rows older than ``max_age_s``. Caller holds the lock."""
        dropped = 0
        now = self._clock()
        if force_age or now - self._last_age_check >= _AGE_CHECK_EVERY_S:
            self._last_age_check = now
            cur = self._db.execute("DELETE FROM outbox WHERE created < ?", (now - self.max_age_s,))
            dropped += max(cur.rowcount, 0)
        if self._depth - dropped > self.max_messages:
            excess = self._depth - dropped - self.max_messages
            cur = self._db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)
            )
            dropped += max(cur.rowcount, 0)
        if dropped:
            self._depth -= dropped
            self.dropped += dropped
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('dropped_total', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=value+excluded.value",
                (dropped,),
            )
            log.warning("spool bound reached: dropped %d oldest message(s) (%d since start)", dropped, self.dropped)

    # -- reading / acknowledging -----------------------------------------------------------------------------------

    def pending(self, after_id: int = 0, limit: int = 100) -> list[SpoolItem]:
        """Stored messages with ``id > after_id`` in delivery order, at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, seq, topic, payload, qos, retain, correlation, created FROM outbox "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [SpoolItem(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6], r[7]) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered messages (unknown ids are ignored: they may have been dropped by the bounds)."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            # A delete lost to a power cut only means a duplicate later (at-least-once), so acks skip the fsync.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            n = max(cur.rowcount, 0)
            self._depth -= n
        return n

    def expire(self) -> None:
        """Apply the age bound now (called periodically so an idle spool also ages out)."""
        with self._lock:
            self._enforce_bounds(force_age=True)

    @property
    def depth(self) -> int:
        """Messages waiting for an acknowledgement."""
        return self._depth

    @property
    def dropped_total(self) -> int:
        """Messages dropped by the bounds over the spool's whole life (persists across restarts)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='dropped_total'").fetchone()
        return int(row[0]) if row else 0

    def peek_seq(self) -> int:
        """The seq the next :meth:`add` will allocate."""
        row = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        return int(row[0]) if row else 1

    def close(self) -> None:
        """Checkpoint and close the database."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):  # best effort
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
