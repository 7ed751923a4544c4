"""The exported bundle: manifest, tensor names, per-part ORT parity on two inputs, hashes, no auxiliary weights."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_parts import PART_IO
from export.parity import PART_TOL, errors, run_session, session
from export.pipeline import _torch_chain, load_images
from runtime.bundle import CHAIN, load_manifest
from runtime.errors import BundleError
from training.backbones import get_spec
from training.build import load_model
from training.scoring import build_scoring


def test_manifest_validates_and_follows_the_contract(exported_bundle: Path) -> None:
    m = load_manifest(exported_bundle, verify=True)
    assert [p.name for p in m.parts] == list(CHAIN)
    for part in [*m.parts, m.fused]:
        assert part is not None
        ins, outs = PART_IO[part.name]
        assert [t.name for t in part.inputs] == list(ins)
        assert [t.name for t in part.outputs] == list(outs)
        assert all(t.shape[0] == -1 and t.dtype == "float32" for t in [*part.inputs, *part.outputs])
    assert m.part("score").outputs[0].shape == [-1, 1, 64, 64]
    assert m.part("score").outputs[1].shape == [-1]
    spec = get_spec("efficientnet_lite0")
    assert m.preprocess.mean == list(spec.mean) and m.preprocess.std == list(spec.std)
    assert (m.preprocess.color, m.preprocess.interpolation, m.input.height) == ("rgb", "linear", 64)
    assert re.fullmatch(r"rd-efficientnet_lite0-[0-9a-f]{8}", m.model_id)
    assert m.threshold.rule.startswith("max-of-both") and "validation" in m.threshold.source
    assert m.threshold.stats["n"] == 4 and m.threshold.value >= m.threshold.stats["median"]
    assert m.threshold.f1_optimal is not None and 0 <= m.threshold.f1_optimal["recall"] <= 1
    for key in ("teacher_max_rel", "score_max_abs", "fused_max_rel", "calib_score_max_rel", "fp16_score_max_rel"):
        assert key in m.parity
    assert {"rdedge", "torch", "onnx", "onnxruntime"} <= set(m.versions)
    assert set(m.files) >= {f"{p}.onnx" for p in CHAIN} | {"model.onnx", "teacher.fp16.onnx"}


def test_identity_projection_is_a_real_graph(exported_bundle: Path) -> None:
    g = onnx.load(str(exported_bundle / "projection.onnx")).graph
    assert [n.op_type for n in g.node] == ["Identity"] * 3
    assert [i.name for i in g.input] == ["f1", "f2", "f3"] and [o.name for o in g.output] == ["p1", "p2", "p3"]


def test_tampered_file_fails_its_hash(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    data = bytearray((bundle / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx: sha256 mismatch"):
        load_manifest(bundle)


def test_ort_parity_per_part_on_two_inputs(exported_bundle: Path, tiny_run: tuple[Path, Path]) -> None:
    """Independent of the export's own check: torch vs each ONNX part on a noise batch of 2 and a real image."""
    run, category = tiny_run
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, (64, 64), cfg.model.sigma)  # the chosen recipe
    real = load_images(sorted((category / "test" / "scratch").glob("*.png"))[:1], (64, 64), spec.mean, spec.std)
    inputs = [np.random.default_rng(7).standard_normal((2, 3, 64, 64)).astype(np.float32), real]
    refs = [_torch_chain(model, scoring, x) for x in inputs]
    assert not np.allclose(refs[0]["f1"][:1], refs[1]["f1"])
    for name in (*CHAIN, "fused"):
        ins, outs = PART_IO[name]
        sess = session(exported_bundle / ("model.onnx" if name == "fused" else f"{name}.onnx"))
        for ref in refs:
            got = run_session(sess, {k: ref[k] for k in ins})
            _, rel = errors([ref[k] for k in outs], got)
            assert rel <= PART_TOL, (name, rel)


def _onnx_tensors(bundle: Path) -> list[np.ndarray]:
    out = []
    for f in bundle.glob("*.onnx"):
        out += [onnx.numpy_helper.to_array(t) for t in onnx.load(str(f)).graph.initializer]
    return out


def test_bundle_holds_no_auxiliary_weight(
    tiny_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose ``aux`` holds weights (shaped like real layers) exports without any of them."""
    import logging

    from export.pipeline import ExportOptions, export_bundle

    caplog.set_level(logging.WARNING, logger="export.pipeline")

    run, category = tiny_run
    ckpt = torch.load(run / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(3)
    stem = ckpt["model"]["teacher.conv_stem.weight"]
    ckpt["aux"] = {
        "backbone": {"conv_stem.weight": torch.randn(stem.shape, generator=gen), "fc.weight": torch.randn(64, 32)},
        "head": {"0.weight": torch.randn(128, 112, generator=gen)},
    }
    aux_run = tmp_path / "aux_run"
    aux_run.mkdir()
    torch.save(ckpt, aux_run / "checkpoint_best.pt")
    out, _ = export_bundle(
        ExportOptions(run=aux_run, out=tmp_path / "bundle", precision="fp32", calib_data=category / "test" / "good")
    )
    tensors = _onnx_tensors(out)
    for aux in (ckpt["aux"]["backbone"]["conv_stem.weight"], ckpt["aux"]["head"]["0.weight"]):
        a = aux.numpy()
        assert not any(t.shape == a.shape and np.array_equal(t, a) for t in tensors)
        # nor a reshaped copy: a copy would match all 256 sampled values; chance matches among ~9M floats are rare
        values = np.concatenate([t.ravel() for t in tensors if t.dtype == np.float32])
        assert np.isin(a.ravel()[:256], values).mean() < 0.1
    m = load_manifest(out)
    assert m.threshold.source.startswith("defect-free folder") and m.threshold.stats["n"] == 4
    # 4 images allow a false-alarm rate up to 53%: export says so and how many images a 1% target needs
    assert m.threshold.stats["val_far_upper_95"] > 0.5
    assert "rests on 4 defect-free images" in caplog.text and "at least 299" in caplog.text


def test_check_no_aux_refuses_shared_keys() -> None:
    from export.errors import ExportError
    from export.pipeline import check_no_aux

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    sd = model.state_dict()
    check_no_aux(model, {"model": sd, "aux": {"other.weight": torch.zeros(1)}})
    with pytest.raises(ExportError, match="auxiliary"):
        check_no_aux(model, {"model": sd, "aux": {"0": {"weight": torch.zeros(1)}}})
    with pytest.raises(ExportError, match="not in the checkpoint"):
        check_no_aux(model, {"model": {}, "aux": None})


def test_threshold_images_are_the_validation_split_then_the_images_max_images_left_out(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The default calibration set: ``split.val`` and ``split.unused`` of the checkpoint; a missing one is named."""
    from export.errors import ExportError
    from export.pipeline import calibration_set
    from training.config import load_train_config

    run, category = tiny_run
    ckpt = torch.load(run / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    cfg = load_train_config(None, {})
    val = [Path(p) for p in ckpt["split"]["val"]]
    unused = sorted((category / "test" / "good").iterdir())  # stand-ins: real defect-free files the run never saw
    ckpt["split"]["unused"] = [str(p) for p in unused]
    calib = calibration_set(ckpt, cfg, None)
    assert calib.good == [*val, *unused]
    assert f"n={len(val)}" in calib.source and f"left out (max_images, n={len(unused)})" in calib.source
    ckpt["split"]["unused"].append(str(tmp_path / "gone.png"))
    with pytest.raises(ExportError, match="gone.png"):
        calibration_set(ckpt, cfg, None)
    del ckpt["split"]["unused"]  # checkpoints from before 2026-12-03: the validation split alone
    assert calibration_set(ckpt, cfg, None).good == val
