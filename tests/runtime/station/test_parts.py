"""Station parts on their own: config section, archive quota and drops, the live latest-value slot, shifts, the
threshold sidecar, the ``rdedge[ui]`` extra being optional, and the user CLI."""

from __future__ import annotations

import datetime as dt
import io
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.config import StationArchiveConfig, parse_config
from runtime.errors import ConfigError
from runtime.outputs import VerdictEvent
from runtime.station.archive import Archive, ArchiveError
from runtime.station.live import LiveState, next_shift_start, shift_start
from runtime.station.threshold import SidecarError, read_sidecar, write_sidecar

ROOT = Path(__file__).resolve().parents[3]
CAM = {"name": "c", "source": {"kind": "folder", "path": "."}}


def _ev(seq: int, score: float = 2.0, ts: float | None = None, threshold: float = 1.0) -> VerdictEvent:
    rng = np.random.default_rng(seq)
    return VerdictEvent("c", seq, seq, ts or time.time(), ts or time.time(), score, threshold, score >= threshold,
                        "m1", None, {"total": 1.0}, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                        rng.random((16, 16), dtype=np.float32))  # fmt: skip


def test_ui_is_off_by_default_and_binds_loopback() -> None:
    cfg = parse_config({"bundle": "b", "cameras": [CAM]})
    assert cfg.ui.enabled is False and cfg.ui.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("ui", "path"),
    [({"shifts": ["6:00"]}, "ui.shifts"), ({"live_fps": 0}, "ui.live_fps"), ({"archive": {"max_mb": 0}},
     "ui.archive.max_mb"), ({"port": 70000}, "ui.port"), ({"bogus": 1}, "ui.bogus"),
     ({"tls": {"cert_file": "c"}}, "ui.tls.key_file")],
)  # fmt: skip
def test_ui_config_errors_name_the_field(ui: dict, path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_config({"bundle": "b", "cameras": [CAM], "ui": ui})


def test_archive_quota_deletes_oldest_first_and_drops_are_counted(tmp_path: Path) -> None:
    a = Archive(StationArchiveConfig(dir=tmp_path / "a", max_mb=0.05, queue_size=2))
    assert a.offer(_ev(1)) and a.offer(_ev(2))
    assert not a.offer(_ev(3))  # writer not started: the queue is full, nothing blocks
    assert a.dropped == 1
    a.start()
    base = time.time()
    for i in range(4, 30):
        while not a.offer(_ev(i, ts=base + i)):
            time.sleep(0.005)
    assert a.flush(10)
    a.close()
    names = sorted(p.stem for p in (tmp_path / "a").glob("*.json"))
    assert a.deleted > 0 and a.bytes <= a.max_bytes
    assert names[-1].endswith("_c_29")  # the newest stays, the oldest went
    assert all(int(n.rsplit("_", 1)[1]) > 3 for n in names)
    assert sum(p.stat().st_size for p in (tmp_path / "a").iterdir()) == a.bytes
    again = Archive(StationArchiveConfig(dir=tmp_path / "a", max_mb=0.05))  # restart: the quota state is rebuilt
    assert again.bytes == a.bytes and [m["name"] for m in again.entries(limit=1)] == [names[-1]]
    m = json.loads((tmp_path / "a" / f"{names[-1]}.json").read_text())
    assert {"ts", "camera", "seq", "score", "threshold", "model_id", "trigger_id"} <= set(m)


def test_archive_refuses_names_that_are_not_entries(tmp_path: Path) -> None:
    a = Archive(StationArchiveConfig(dir=tmp_path / "a"))
    (tmp_path / "secret.png").write_bytes(b"x")
    for name in ["../secret", "..", "/etc/passwd", "0000000000000_c_1", "0000000000000_c_1/../../secret"]:
        with pytest.raises(ArchiveError):
            a.file(name, "png")
    with pytest.raises(ArchiveError):
        a.file("0000000000000_c_1", "../png")


def test_archive_keeps_ng_and_borderline_only() -> None:
    a = Archive.__new__(Archive)
    a.cfg = StationArchiveConfig(borderline_margin=0.1)
    assert a.wants(_ev(1, score=1.2)) and a.wants(_ev(1, score=0.95)) and not a.wants(_ev(1, score=0.85))


def test_live_slot_encodes_at_most_live_fps_and_ends_on_the_last_frame() -> None:
    live = LiveState(["c"], live_fps=4.0, jpeg_quality=70, history=100, shifts=["06:00"])
    live.start()
    t0 = time.monotonic()
    for i in range(150):  # ~100 verdicts/s for 1.5 s
        live.on_verdict(_ev(i))
        assert len(live._slot) <= 1  # one slot per camera: nothing ever queues
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while (live.cams["c"].jpeg_meta or {}).get("seq") != 149 and time.monotonic() < deadline:
        time.sleep(0.02)
    live.close()
    snap = live.snapshot()["c"]
    assert snap["total"] == {"ok": 0, "ng": 150, "errors": 0}
    assert snap["image_seq"] == 149  # the page ends on the last frame scored
    assert 2 <= snap["frames_encoded"] <= 4.0 * (time.monotonic() - t0) + 1, (snap, elapsed)
    assert len(live.scores()) == 100  # history bounded


def test_shift_boundaries() -> None:
    day = dt.datetime(2026, 3, 10)
    at = lambda h, m=0: (day + dt.timedelta(hours=h, minutes=m)).timestamp()  # noqa: E731
    shifts = ["06:00", "14:00", "22:00"]
    assert shift_start(at(7), shifts) == at(6)
    assert shift_start(at(14), shifts) == at(14)
    assert shift_start(at(3), shifts) == at(-2)  # yesterday 22:00
    assert next_shift_start(at(23), shifts) == at(30)  # tomorrow 06:00
    live = LiveState(["c"], 5, 70, 10, shifts)
    live.on_verdict(_ev(1, ts=time.time()))
    live.on_verdict(_ev(2, ts=live._shift_ends + 1))  # crossing a boundary restarts the shift counters only
    snap = live.snapshot()["c"]
    assert snap["shift"]["ng"] == 1 and snap["total"]["ng"] == 2


def test_sidecar_is_atomic_and_validated(tmp_path: Path) -> None:
    p = tmp_path / "threshold.json"
    assert read_sidecar(p) is None
    write_sidecar(p, 0.25, "erik")
    assert read_sidecar(p)["threshold"] == 0.25 and not list(tmp_path.glob(".*tmp"))
    for bad in ['{"threshold": "x"}', "[1]", "not json", '{"threshold": NaN}']:
        p.write_text(bad)
        with pytest.raises(SidecarError, match="threshold"):
            read_sidecar(p)


def test_ui_extra_is_optional() -> None:
    code = (
        'import sys; sys.modules["fastapi"] = None\n'
        "import runtime.service, runtime.station\n"
        "from runtime.errors import MissingExtraError\n"
        "try:\n"
        "    runtime.station.require_ui()\n"
        "except MissingExtraError as e:\n"
        "    print(e)\n"
        "assert 'uvicorn' not in sys.modules and 'argon2' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "pip install 'rdedge[ui]'" in res.stdout and "fastapi" in res.stdout


def test_user_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"bundle": "b", "cameras": [CAM], "ui": {"state_dir": str(tmp_path / "st")}}))

    def run(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return main(["station", "user", *args, "--config", str(cfg)])

    assert run("add", "ada", "--role", "admin", "--password-stdin", stdin="long-enough-pw\n") == 0
    assert run("add", "bob", "--role", "operator", "--password-stdin", stdin="short\n") == 1
    assert "at least 8" in capsys.readouterr().err
    assert run("list") == 0 and json.loads(capsys.readouterr().out) == [{"name": "ada", "role": "admin"}]
    from runtime.station.auth import UserStore

    users = UserStore(tmp_path / "st" / "users.sqlite3")
    assert users.verify("ada", "long-enough-pw") == "admin" and users.verify("ada", "wrong") is None
    assert (tmp_path / "st" / "users.sqlite3").stat().st_mode & 0o077 == 0
    row = users._db.execute("SELECT hash FROM users").fetchone()[0]
    assert row.startswith("$argon2id$") and "long-enough-pw" not in row
    assert run("delete", "ada") == 0
    capsys.readouterr()
    assert run("list") == 0 and json.loads(capsys.readouterr().out) == []


def test_a_busy_port_stops_the_service_with_a_clear_error(tmp_path: Path, tiny_bundle: Path) -> None:
    import socket

    from runtime.errors import RdedgeError
    from runtime.service import run_service

    frames = tmp_path / "f"
    frames.mkdir()
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(frames / "0.png"), np.zeros((32, 32, 3), np.uint8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = parse_config({"bundle": str(tiny_bundle), "mqtt": None,
                            "cameras": [{"name": "c", "source": {"kind": "folder", "path": str(frames)}}],
                            "ui": {"enabled": True, "port": port, "state_dir": str(tmp_path / "st"),
                                   "archive": {"dir": str(tmp_path / "a")}}})  # fmt: skip
        with pytest.raises(RdedgeError, match=f"ui: cannot serve the station page on 127.0.0.1:{port}"):
            run_service(cfg)


def test_the_station_imports_no_torch() -> None:
    code = (
        'import sys; sys.modules["torch"] = None\n'
        "import runtime.station.output, runtime.station.app, runtime.station.swap, runtime.station.teach\n"
        "bad = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in\n"
        "             {'torch', 'torchvision', 'training', 'export'})\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_https_with_a_certificate(tmp_path: Path, tiny_bundle: Path) -> None:
    import threading

    import httpx

    from runtime.service import run_service
    from runtime.station.auth import UserStore
    from tests.mqtt_broker import free_port, make_certs

    certs = make_certs(tmp_path / "pki")  # server certificate for 127.0.0.1, signed by a test CA
    frames = tmp_path / "f"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "0.png"), np.zeros((32, 32, 3), np.uint8))
    port = free_port()
    cfg = parse_config({"bundle": str(tiny_bundle), "mqtt": None,
                        "cameras": [{"name": "c", "source": {"kind": "folder", "path": str(frames), "loop": True},
                                     "max_fps": 2}],
                        "ui": {"enabled": True, "port": port, "state_dir": str(tmp_path / "st"),
                               "archive": {"dir": str(tmp_path / "a")},
                               "tls": {"cert_file": str(certs.server_cert),
                                       "key_file": str(certs.server_key)}}})  # fmt: skip
    users = UserStore(cfg.ui.state_dir / "users.sqlite3")
    users.add("ada", "admin", "admin-password")
    users.close()
    stop = threading.Event()
    t = threading.Thread(target=run_service, args=(cfg, stop), daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        with httpx.Client(base_url=url, verify=ctx, timeout=5) as c:
            while True:
                try:
                    if c.get("/login").status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            r = c.post("/api/login", json={"user": "ada", "password": "admin-password"})
            assert r.status_code == 200
            cookie = r.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/api/live", timeout=3).raise_for_status()
    finally:
        stop.set()
        t.join(10)
