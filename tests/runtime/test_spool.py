"""Spool: ordering, seq persistence, bounds (count and age), reopen after a crash, threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from runtime.spool import OutMessage, Spool


def _msg(seq: int, topic: str = "t/result") -> list[OutMessage]:
    return [OutMessage(topic, f'{{"seq": {seq}}}'.encode(), qos=1)]


def test_seq_is_monotonic_and_items_come_back_in_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    seqs = [sp.add(_msg)[0] for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    items = sp.pending()
    assert [i.seq for i in items] == seqs
    assert [i.payload for i in items] == [f'{{"seq": {s}}}'.encode() for s in seqs]
    assert sp.depth == 5
    assert [i.seq for i in sp.pending(after_id=items[1].id, limit=2)] == [3, 4]
    sp.close()


def test_ack_deletes_and_unknown_ids_are_ignored(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    for _ in range(4):
        sp.add(_msg)
    items = sp.pending()
    assert sp.ack([items[0].id, items[2].id, 999]) == 2
    assert [i.seq for i in sp.pending()] == [2, 4]
    assert sp.depth == 2
    sp.close()


def test_seq_and_backlog_persist_across_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    for _ in range(3):
        sp.add(_msg)
    sp.ack([sp.pending()[0].id])
    # no close(): simulate a killed process (the WAL holds the commits)
    sp2 = Spool(tmp_path / "s.db")
    assert [i.seq for i in sp2.pending()] == [2, 3]
    assert sp2.depth == 2
    assert sp2.add(_msg)[0] == 4
    sp2.ack([i.id for i in sp2.pending()])
    sp2.close()
    sp3 = Spool(tmp_path / "s.db")
    assert sp3.depth == 0 and sp3.add(_msg)[0] == 5
    sp3.close()


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_messages=3)
    for _ in range(7):
        sp.add(_msg)
    assert [i.seq for i in sp.pending()] == [5, 6, 7]
    assert sp.depth == 3
    assert sp.dropped == 4
    sp.close()
    sp2 = Spool(tmp_path / "s.db", max_messages=3)
    assert sp2.dropped == 0 and sp2.dropped_total == 4
    sp2.close()


def test_age_bound(tmp_path: Path) -> None:
    now = [1000.0]
    sp = Spool(tmp_path / "s.db", max_age_s=10.0, clock=lambda: now[0])
    sp.add(_msg)
    sp.add(_msg)
    now[0] += 11.0
    sp.add(_msg)  # the age check runs on write (at most once a second) ...
    assert [i.seq for i in sp.pending()] == [3]
    now[0] += 11.0
    sp.expire()  # ... and on demand
    assert sp.pending() == [] and sp.depth == 0 and sp.dropped == 3
    sp.close()


def test_messages_keep_topic_qos_retain_and_correlation(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    seq, items = sp.add(
        lambda s: [
            OutMessage("a/result", b"r", qos=1),
            OutMessage("plc/reply", b"x", qos=0, retain=True, correlation=b"\x00\x01"),
        ]
    )
    (err,) = sp.put([OutMessage("a/error", b"e", qos=2)])
    got = sp.pending()
    assert [(i.topic, i.qos, i.retain, i.correlation, i.seq) for i in got] == [
        ("a/result", 1, False, None, seq),
        ("plc/reply", 0, True, b"\x00\x01", seq),
        ("a/error", 2, False, None, None),
    ]
    assert err.id == got[-1].id
    sp.close()


def test_build_failure_rolls_back_and_seq_is_not_consumed(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")

    def bad(seq: int) -> list[OutMessage]:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sp.add(bad)
    assert sp.add(_msg)[0] == 1 and sp.depth == 1
    sp.close()


def test_concurrent_writers_and_acker(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    seqs: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(50):
            s, _items = sp.add(_msg)
            with lock:
                seqs.append(s)

    def acker() -> None:
        for _ in range(50):
            sp.ack(i.id for i in sp.pending(limit=10))

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=acker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 151))
    left = sp.pending(limit=1000)
    assert sp.depth == len(left)
    sp.close()


def test_database_uses_wal_and_full_sync_for_new_messages(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    sp.add(_msg)
    sp.ack([sp.pending()[0].id])  # acks commit with NORMAL, then FULL is restored for the next verdict
    assert sp._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    sp.close()
    assert sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
