"""``rdedge check-config --strict`` loads and verifies the bundle exactly as ``rdedge run`` does: a truncated
manifest, a tampered ONNX part or an unparsable part fail with the file named."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime.cli import main


def _config(tmp_path: Path, bundle: Path) -> Path:
    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    doc = {"bundle": str(bundle), "cameras": [{"name": "cam1", "source": {"kind": "folder", "path": str(imgs)}}]}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_truncated_manifest_fails_strict_naming_the_file(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = bundle / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    cfg = _config(tmp_path, bundle)
    assert main(["check-config", str(cfg), "--strict"]) == 1
    out = capsys.readouterr()
    assert str(manifest) in out.err and "corrupt JSON" in out.err and "INVALID" in out.out
    # a real process, as the systemd unit's ExecStartPre runs it
    script = Path(sys.executable).parent / "rdedge"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "export.cli"]
    res = subprocess.run([*cmd, "check-config", "--strict", str(cfg)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and str(manifest) in res.stderr


def test_tampered_onnx_fails_strict_naming_the_file(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    part = bundle / "decoder.onnx"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["check-config", str(_config(tmp_path, bundle)), "--strict"]) == 1
    err = capsys.readouterr().err
    assert str(part) in err and "sha256 mismatch" in err


def test_unparsable_onnx_with_matching_hash_fails_strict_at_backend_creation(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    part = bundle / "decoder.onnx"
    part.write_bytes(part.read_bytes()[:200])  # truncated protobuf ...
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = hashlib.sha256(part.read_bytes()).hexdigest()  # ... with its hash updated
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check-config", str(_config(tmp_path, bundle)), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "bundle:" in err and "decoder.onnx" in err


def test_intact_bundle_still_passes_strict_and_plain_mode_does_not_load_it(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tiny_bundle)
    assert main(["check-config", str(cfg), "--strict"]) == 0
    assert "OK" in capsys.readouterr().out
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "manifest.json").write_text("{")
    assert main(["check-config", str(_config(tmp_path, bundle))]) == 0  # build machine: schema only
