"""Spool faults: refused messages kept as dead letters and replayed; a full database reports SQLite's own error and
keeps what it stored; the free-space reserve and the capacity estimate on a real small file system."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.spool import OutMessage, Spool, SpoolFullError


def _verdict(seq: int) -> list[OutMessage]:
    body = json.dumps({"seq": seq, "device": "dev1", "camera": "cam1", "pad": "x" * 280}).encode()
    return [OutMessage("t/dev1/cam1/result", body, qos=1)]


def test_dead_letters_survive_reopen_and_replay_keeps_seq_and_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    for _ in range(4):
        sp.add(_verdict)
    items = sp.pending()
    assert (
        sp.dead_letter([(items[1].id, "Not authorized (reason code 135)"), (items[3].id, "Quota exceeded"), (999, "x")])
        == 2
    )
    assert [i.seq for i in sp.pending()] == [1, 3] and sp.depth == 2 and sp.dead == 2
    sp.close()

    sp = Spool(tmp_path / "s.db")  # dead letters are on disk, not in memory
    assert sp.dead == 2
    assert [(i.seq, reason) for i, _t, reason in sp.dead_letters()] == [
        (2, "Not authorized (reason code 135)"),
        (4, "Quota exceeded"),
    ]
    assert sp.dead_letter_summary()[0][0] == "t/dev1/cam1/result"
    assert sp.replay_dead() == 2
    assert [i.seq for i in sp.pending()] == [1, 3, 2, 4]  # back at the end of the outbox, oldest first
    assert sp.depth == 4 and sp.dead == 0
    assert [i.payload for i in sp.pending()][2:] == [items[1].payload, items[3].payload]
    assert sp.add(_verdict)[0] == 5  # the seq counter is untouched
    sp.close()


def test_replay_from_another_connection_is_counted_by_the_running_spool(tmp_path: Path) -> None:
    running = Spool(tmp_path / "s.db")
    for _ in range(3):
        running.add(_verdict)
    running.dead_letter([(i.id, "Not authorized (reason code 135)") for i in running.pending()])
    assert running.depth == 0
    cli = Spool(tmp_path / "s.db")  # what 'rdedge spool replay-dead' opens while the service runs
    assert cli.replay_dead() == 3
    cli.close()
    rows = running.pending()
    assert [i.seq for i in rows] == [1, 2, 3]
    assert running.ack([i.id for i in rows]) == 3
    assert running.depth == 0 and running.dead == 0  # no negative depth from rows it had not counted
    running.close()


def test_sqlite_full_reports_the_real_error_and_keeps_every_stored_row(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    sp.add(_verdict)
    pages = int(sp._db.execute("PRAGMA page_count").fetchone()[0])
    sp._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # real SQLITE_FULL once the file would grow
    stored = 1
    with pytest.raises(sqlite3.OperationalError) as info:
        for _ in range(1000):
            sp.add(_verdict)
            stored += 1
    assert "database or disk is full" in str(info.value)
    assert "rollback" not in str(info.value)
    assert 1 < stored < 1000
    assert [i.seq for i in sp.pending(limit=2000)] == list(range(1, stored + 1))
    assert sp.depth == stored
    # acknowledgements free pages inside the file: the spool stores again without growing
    sp.ack([i.id for i in sp.pending(limit=10)])
    assert sp.add(_verdict)[0] == stored + 1  # the failed add was rolled back whole: no gap in seq
    sp.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.fixture
def fs8(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (root with CAP_SYS_ADMIN; skips otherwise)."""
    mnt = tmp_path / "fs8"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reserve_stops_writes_and_the_capacity_estimate_is_close(fs8: Path) -> None:
    (fs8 / "filler").write_bytes(b"\0" * int(2.6 * 2**20))
    sp = Spool(fs8 / "s.db", min_free_bytes=2**20)
    estimates: dict[int, int] = {}
    n = 0
    with pytest.raises(SpoolFullError, match="free-space reserve"):
        while n < 100_000:
            if n in (50, 300):
                estimates[n] = sp.capacity().verdicts_fit
            sp.add(_verdict)
            n += 1
    assert n > 300
    for at, fit in estimates.items():
        actual = n - at
        assert abs(fit - actual) <= 0.35 * actual, (at, fit, actual)
    assert sp.capacity().verdicts_fit == 0
    assert [i.seq for i in sp.pending(limit=100_000)] == list(range(1, n + 1))
    sp.close()
    st = __import__("os").statvfs(fs8)
    assert st.f_bavail * st.f_frsize >= 2**20  # the reserve was kept
