"""A label-tuned bundle served by ``rdedge run`` against a real mosquitto: verdicts carry the probability, and the
verdict follows the manifest's decision rule (``manifest.classifier``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.bundle import load_manifest
from tests.export.conftest import build_tiny_bundle, build_tiny_run
from tests.integration.conftest import Runtime, results, write_config
from tests.mqtt_broker import Broker, Collector


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(bundle, frames folder)``: the tiny run label-tuned on synthetic good/defect images."""
    from export.label_tune import LabelTuneOptions, label_tune
    from training.demo_data import make_demo_data

    base = tmp_path_factory.getbasetemp()
    run, _ = build_tiny_run(base)
    plain = build_tiny_bundle(base)
    work = tmp_path_factory.mktemp("lt_service")
    cat = make_demo_data(work / "src", n_train=0, n_test_good=4, n_test_defect=1, size=64, seed=11)
    lab = work / "labelled"
    shutil.copytree(cat / "test" / "good", lab / "good")
    (lab / "defect").mkdir()
    frames = work / "frames"
    frames.mkdir()
    for d in sorted(p for p in (cat / "test").iterdir() if p.name != "good"):
        for f in d.iterdir():
            shutil.copy(f, lab / "defect" / f"{d.name}_{f.name}")
            shutil.copy(f, frames / f"{d.name}_{f.name}")
    for f in sorted((cat / "test" / "good").iterdir())[:2]:
        shutil.copy(f, frames / f"good_{f.name}")
    out = work / "bundle"
    label_tune(LabelTuneOptions(run=run, labelled=lab, out=out, bundle=plain))
    return out, frames


def test_verdicts_carry_probability_and_follow_the_rule(
    tmp_path: Path, tuned_bundle: tuple[Path, Path], broker: Broker, runtimes: list[Runtime]
) -> None:
    bundle, frames = tuned_bundle
    manifest = load_manifest(bundle)
    assert manifest.classifier is not None
    col = Collector(broker, ["t/#"])
    cfg = write_config(tmp_path / "c.yaml", bundle, broker, tmp_path / "spool.db",
                       [{"name": "cam1", "source": {"kind": "folder", "path": str(frames)}}])  # fmt: skip
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    n = len(list(frames.iterdir()))
    assert rt.wait(60) == 0, rt.log()
    assert col.wait_for(lambda: len(results(col)) >= n, 10)
    docs = results(col)
    assert len(docs) == n and all(d["model_id"] == manifest.model_id for d in docs)
    for d in docs:
        assert 0.0 <= d["probability"] <= 1.0
        assert d["verdict"] == ("NG" if d["probability"] >= manifest.classifier.probability_threshold else "OK")
        assert "classifier" in d["latency_ms"]
    alerts = [json.loads(p) for p in col.on("/cam1/alert")]
    assert all("probability" in a for a in alerts) and len(alerts) == sum(d["verdict"] == "NG" for d in docs)
    col.close()
