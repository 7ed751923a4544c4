"""All-or-nothing bundles: a failed or killed export leaves no BUNDLE_DIR; --force swaps an existing one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.bundle_writer import clean_stale_staging, staging
from export.errors import ExportError, ParityError
from export.pipeline import ExportOptions, export_bundle

REPO = Path(__file__).resolve().parents[2]


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_parity_failure_leaves_no_bundle(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_run
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="parity check failed for teacher"):
        export_bundle(ExportOptions(run=run, out=out, parity_tol=0.0))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_sigkilled_export_leaves_no_bundle(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_run
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-c", "import sys; from export.cli import main; sys.exit(main(sys.argv[1:]))",
           "export", "--run", str(run), "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(tmp_path.glob(".bundle.staging-*")):
            assert proc.poll() is None, "export ended before it could be killed"
            time.sleep(0.05)
        assert any(tmp_path.glob(".bundle.staging-*")), "export never started writing"
        time.sleep(0.5)  # kill it mid-write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert len(_leftovers(tmp_path)) == 1  # the dead process's staging folder, hidden next to BUNDLE_DIR
    clean_stale_staging(out)  # what the next export into this folder does first
    assert _leftovers(tmp_path) == []


def test_existing_bundle_is_refused_without_force(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_bundle(ExportOptions(run=tiny_run[0], out=out))


def test_staging_commits_and_force_swaps(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with staging(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(ExportError), staging(out):
        pass
    with staging(out, force=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    with pytest.raises(RuntimeError), staging(out, force=True) as tmp:
        (tmp / "z").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["y"]  # the old bundle is untouched
    assert _leftovers(tmp_path) == []
