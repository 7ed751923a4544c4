"""Export side of bundle integrity: calibration frames in the bundle, ``rdedge export --sign KEY``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.cli import main
from runtime.bundle import MANIFEST_NAME, load_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError

pytest.importorskip("nacl")


def test_bundle_ships_calibration_frames_spread_over_the_threshold_scores(exported_bundle: Path) -> None:
    m = load_manifest(exported_bundle)
    cal = m.calibration
    assert cal is not None and cal.file in m.files
    frames = np.load(exported_bundle / cal.file, allow_pickle=False)
    assert frames.dtype == np.uint8 and frames.shape == (4, m.input.height, m.input.width, 3)
    assert len(set(map(bytes, frames))) == 4  # four different images
    # The validation images are already 64 px, so the stored frames are them, unchanged: the lowest and highest
    # frame scores are the threshold statistics' min and max (same ORT chain, same preprocessing).
    assert min(cal.scores) == pytest.approx(m.threshold.stats["min"], rel=1e-5)
    assert max(cal.scores) == pytest.approx(m.threshold.stats["max"], rel=1e-5)
    for fused in (False, True):
        with AnomalyModel(exported_bundle, BackendConfig(threads=2, fused=fused)) as model:
            assert model.calibration is not None
            assert model.calibration.max_abs_diff <= 1e-4 * max(abs(s) for s in cal.scores)


def test_changed_preprocessing_is_refused_by_the_calibration_check(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    doc = json.loads((bundle / MANIFEST_NAME).read_text())
    doc["preprocess"]["color"] = "bgr"  # swapped channels: every hash still matches
    (bundle / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="calibration scores moved"):
        AnomalyModel(bundle, BackendConfig(threads=2))


def test_export_sign_writes_a_signature_the_runtime_trusts(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = tiny_run
    key = tmp_path / "line-key"
    assert main(["keygen", "--out", str(key)]) == 0
    out = tmp_path / "signed"
    assert main(["export", "--run", str(run), "--out", str(out), "--precision", "fp32", "--sign", str(key)]) == 0
    assert "signed with" in capsys.readouterr().out
    m = load_manifest(out)
    assert (out / "manifest.sig").is_file() and "manifest.sig" not in m.files
    with AnomalyModel(out, BackendConfig(threads=2), trusted_keys=[Path(f"{key}.pub")]) as model:
        assert model.calibration is not None and model.calibration.frames == 4
    assert main(["verify", str(out), "--trusted-key", f"{key}.pub"]) == 0
    assert "signature: ok, signed by trusted key" in capsys.readouterr().out


def test_export_sign_with_a_bad_key_fails_before_exporting(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = tiny_run
    (tmp_path / "bad").write_text("nope\n")
    code = main(["export", "--run", str(run), "--out", str(tmp_path / "b"), "--sign", str(tmp_path / "bad")])
    assert code == 1 and "not an rdedge ed25519 private key" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
