"""The training verbs through the real ``rdedge`` console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RDEDGE = [sys.executable, "-m", "export.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RDEDGE, *args], capture_output=True, text=True, timeout=600)


def test_make_demo_data_train_evaluate_report(tmp_path: Path) -> None:
    p = _run("make-demo-data", str(tmp_path / "d"), "--n-train", "12", "--size", "64")
    assert p.returncode == 0, p.stderr
    cat = Path(p.stdout.strip())
    assert (cat / "train" / "good").is_dir() and (cat / "ground_truth").is_dir()
    p = _run(
        "train",
        "--data",
        str(cat),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "4",
        "--image-size",
        "64",
        "--batch-size",
        "8",
    )
    assert p.returncode == 0, p.stderr
    assert "step 4/4" in p.stderr
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["steps"] == 4 and selection["chosen"] and selection["candidates"]
    p = _run(
        "evaluate",
        "--run",
        str(tmp_path / "run"),
        "--data",
        str(cat),
        "--report",
        str(tmp_path / "rep"),
        "--no-progress",
    )
    assert p.returncode == 0, p.stderr
    assert "image_auroc" in p.stdout and "overall" in p.stdout and "crack" in p.stdout
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for k in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro", "per_defect", "at_validation_threshold"):
        assert k in m
    assert set(m["per_defect"]) == {"crack", "missing", "scratch", "spot"}
    n_val = int(m["validation_threshold"]["stats"]["n"])
    assert (
        m["validation_threshold"]["rule"] == "max-of-both" and "validation split" in m["validation_threshold"]["source"]
    )
    assert f"{n_val} defect-free images confirm a false-alarm rate of at most" in p.stdout  # 20 or fewer: > 13%
    rep = tmp_path / "rep"
    html = (rep / "index.html").read_text()
    assert "confirm a false-alarm rate of at most" in html
    for f in ("roc.png", "histogram.png"):
        assert (rep / f).stat().st_size > 1000 and f in html
    assert list((rep / "overlays").glob("*.png")) and "overlays/" in html


def test_bad_inputs_give_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    p = _run("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--epochs", "1")
    assert p.returncode == 1 and "data folder not found" in p.stderr and "Traceback" not in p.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 1\n")
    p = _run("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg))
    assert p.returncode == 1 and "optim.lrr" in p.stderr and "Traceback" not in p.stderr
    p = _run("evaluate", "--run", str(tmp_path), "--data", str(tmp_path))
    assert p.returncode == 1 and "no checkpoint_best.pt" in p.stderr


def test_help_explains_verbs() -> None:
    p = _run("--help")
    assert p.returncode == 0
    for verb in ("make-demo-data", "train", "evaluate"):
        assert verb in p.stdout
    p = _run("train", "--help")
    assert "--teacher-weights" in p.stdout and "wide_resnet50_2" in p.stdout
    assert shutil.which("rdedge") or True  # console script installed by pip install -e


def test_aspect_option_parses_auto_square_or_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import train_parser

    base = ["--data", "d", "--out", "run"]
    assert train_parser().parse_args(base).aspect is None  # the config's default (auto) applies
    assert train_parser().parse_args([*base, "--aspect", "square"]).aspect == "square"
    assert train_parser().parse_args([*base, "--aspect", "2.5"]).aspect == 2.5
    with pytest.raises(SystemExit):
        train_parser().parse_args([*base, "--aspect", "tall"])
    assert "auto, square or a height / width number, not 'tall'" in capsys.readouterr().err
