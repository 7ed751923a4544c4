"""Runtime CLI verbs: check-config (plain and --strict), bench JSON, lean imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime.cli import main

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, bundle: Path, **extra: object) -> Path:
    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    doc = {"bundle": str(bundle), "cameras": [{"name": "cam1", "source": {"kind": "folder", "path": str(imgs)}}]}
    doc.update(extra)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_check_config_ok(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(_write(tmp_path, tiny_bundle)), "--strict"]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out and "cam1 (folder, continuous)" in out.out and out.err == ""


def test_check_config_missing_bundle_is_a_warning_unless_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path, tmp_path / "no-bundle")
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "warning:" in out.err and "bundle:" in out.err and "OK" in out.out
    assert main(["check-config", str(cfg), "--strict"]) == 1
    out = capsys.readouterr()
    assert "error:" in out.err and "manifest.json not found" in out.err and "INVALID" in out.out


def test_check_config_unknown_key_prints_path_and_value(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path, tiny_bundle, mqtt={"hots": "broker.local", "port": 99999})
    assert main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "mqtt.hots: Extra inputs are not permitted (got 'broker.local')" in err
    assert "mqtt.port:" in err and "99999" in err


def test_rdedge_console_script_check_config_and_bench(tmp_path: Path, tiny_bundle: Path) -> None:
    script = Path(sys.executable).parent / "rdedge"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "export.cli"]
    bad = _write(tmp_path, tiny_bundle, colour="red")
    res = subprocess.run([*cmd, "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "colour: Extra inputs are not permitted" in res.stderr
    res = subprocess.run([*cmd, "bench", "--bundle", str(tiny_bundle), "--frames", "5", "--warmup", "1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"p50", "p99"} <= set(doc["stages_ms"]["total"]) and doc["fps"] > 0


def test_run_with_bad_config_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("bundle: /x\ncameras: []\n")
    assert main(["run", "--config", str(p)]) == 1
    assert "cameras" in capsys.readouterr().err


def test_service_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import runtime.service, runtime.mqtt, runtime.spool, runtime.health, runtime.cli, runtime.logsetup\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'training', 'export'}"
        " and sys.modules[m] is not None)\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
