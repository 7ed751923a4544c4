"""Bad input gives one clear line and exit code 1 from the CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, line = _run(capsys, "export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert code == 1 and line.startswith("rdedge export: error:") and "checkpoint not found" in line


def test_foreign_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    code, line = _run(capsys, "export", "--run", str(tmp_path / "other.pt"), "--out", str(tmp_path / "b"))
    assert code == 1 and "not an rdedge checkpoint" in line
    assert not (tmp_path / "b").exists()


def test_wrong_architecture(capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = torch.load(tiny_run[0] / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["model"]["backbone"] = "resnet18"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    code, line = _run(capsys, "export", "--run", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "b"))
    assert code == 1 and "does not fit the resnet18 architecture" in line


def test_unsupported_opset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, line = _run(capsys, "export", "--run", str(tmp_path), "--out", str(tmp_path / "b"), "--opset", "9")
    assert code == 1 and "--opset 9 is not supported" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_tensorrt_missing(
    capsys: pytest.CaptureFixture[str], tiny_run: tuple[Path, Path], exported_bundle: Path, tmp_path: Path
) -> None:
    code, line = _run(capsys, "export", "--run", str(tiny_run[0]), "--out", str(tmp_path / "b"), "--trt")
    assert code == 1 and "rdedge[trt]" in line and "tensorrt is not installed" in line
    assert not (tmp_path / "b").exists()
    code, line = _run(capsys, "build-engines", str(exported_bundle))
    assert code == 1 and "rdedge[trt]" in line
    code, line = _run(capsys, "build-engines", str(tmp_path / "nobundle"))
    assert code == 1 and "bundle directory not found" in line


def test_onnx_missing_names_the_extra(tmp_path: Path) -> None:
    code = "import sys; sys.modules['onnx'] = None; from export.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "export", "--run", str(tmp_path), "--out", str(tmp_path / "b")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "onnx is not installed" in proc.stderr and "rdedge[export]" in proc.stderr
