"""The density head as a bundle part: exported, checked against torch, chained by the runtime without torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import CHAIN_WITH_DENSITY, load_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError


def test_density_bundle_has_the_part_and_its_recipe(density_bundle: Path) -> None:
    m = load_manifest(density_bundle)
    assert [p.name for p in m.parts] == list(CHAIN_WITH_DENSITY)
    score = m.part("score")
    assert [t.name for t in score.inputs] == ["f1", "f2", "f3", "d1", "d2", "d3", "density_map"]
    dens = m.part("density")
    assert dens.outputs[0].name == "density_map" and dens.outputs[0].shape[1:] == [1, 8, 8]  # 64 px / 8
    assert m.extra["scoring.recipe"] == "s[0,0,1] raw top1% dens0.5"
    assert m.parity["density_max_rel"] < 1e-4 and m.parity["calib_score_max_rel"] < 1e-4
    assert "density.fp16.onnx" not in m.files  # distances stay FP32
    # The centring choice made in training is stated (off here: the recipe name has no "ctr").
    assert m.extra["scoring.centre"] == "off" and "standard error" in m.extra["scoring.centre_rule"]
    assert "se " in m.extra["scoring.centre_gain"]


def test_runtime_chain_matches_torch_scoring(density_bundle: Path, tmp_path: Path) -> None:
    import torch

    from export.pipeline import load_images
    from training.backbones import get_spec
    from training.build import load_model
    from training.data import read_image
    from training.scoring import build_scoring

    run = density_bundle.parents[1] / "tiny_run_density"
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    size = (cfg.data.image_size, cfg.data.image_size)
    scoring = build_scoring(ckpt["scoring"], spec.channels, size, cfg.model.sigma)
    imgs = sorted((density_bundle.parents[1] / "tiny_data" / "synthetic" / "test").rglob("*.png"))[:3]
    x = load_images(imgs, size, spec.mean, spec.std)
    with torch.no_grad():
        feats, recon = model(torch.from_numpy(x))
        _, ref = scoring(feats, recon)
    for fused in (False, True):
        with AnomalyModel(density_bundle, BackendConfig(kind="onnxruntime", threads=2, fused=fused)) as am:
            got = np.array([am.predict(read_image(p)).score for p in imgs])
            if not fused:
                assert "density" in am.predict(read_image(imgs[0])).timings_ms
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4)


def test_density_part_in_the_wrong_place_is_refused(density_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(density_bundle, b)
    data = json.loads((b / "manifest.json").read_text())
    parts = data["parts"]
    data["parts"] = [parts[0], parts[4], *parts[1:4], parts[5]]  # density right after the teacher
    (b / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="density"):
        load_manifest(b, verify=False)


def test_export_at_another_size_refuses_a_density_recipe(density_bundle: Path, tmp_path: Path) -> None:
    from export.errors import ExportError
    from export.pipeline import ExportOptions, export_bundle

    run = density_bundle.parents[1] / "tiny_run_density"
    with pytest.raises(ExportError, match="density head fitted at 64 x 64 px"):
        export_bundle(ExportOptions(run=run, out=tmp_path / "x", image_size=96))
