"""``rdedge label-tune``: labelled folder checks, the fitted classifier, the classifier part served by the runtime.

Real parts throughout: the tiny trained run and its exported bundle (session fixtures), synthetic labelled images
written as files, scikit-learn fits, onnxruntime sessions, and the runtime's ``AnomalyModel`` loading the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.errors import ExportError
from export.label_tune import LabelTuneOptions, fit_classifier, label_tune, labelled_images
from runtime.bundle import load_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError
from training.data import read_image
from training.demo_data import make_demo_data


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``good/`` (6) and ``defect/`` (8: two of each synthetic defect type) at 64 px, unseen by the tiny run."""
    cat = make_demo_data(tmp_path_factory.mktemp("lab_src"), n_train=0, n_test_good=6, n_test_defect=2, size=64, seed=7)
    out = tmp_path_factory.mktemp("labelled")
    shutil.copytree(cat / "test" / "good", out / "good")
    (out / "defect").mkdir()
    for d in sorted(p for p in (cat / "test").iterdir() if p.name != "good"):
        for f in sorted(d.iterdir()):
            shutil.copy(f, out / "defect" / f"{d.name}_{f.name}")
    return out


@pytest.fixture(scope="module")
def tuned(
    tiny_run: tuple[Path, Path], exported_bundle: Path, labelled: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "bundle"
    label_tune(LabelTuneOptions(run=tiny_run[0], labelled=labelled, out=out, bundle=exported_bundle))
    return out


def test_bundle_gains_a_classifier_part_and_rule(tuned: Path, exported_bundle: Path) -> None:
    m, base = load_manifest(tuned), load_manifest(exported_bundle)
    assert m.classifier is not None and base.classifier is None
    assert m.classifier.part.file in m.files and (tuned / "classifier.onnx").is_file()
    assert [t.name for t in m.classifier.part.inputs] == ["image", "anomaly_map", "score"]
    assert m.classifier.rule == "NG iff probability >= 0.5"
    assert m.classifier.stats["n_good"] == 6 and m.classifier.stats["n_defect"] == 8
    assert m.model_id.startswith(base.model_id + "-clf") and m.parts == base.parts
    assert m.parity["classifier_probability_max_abs"] <= 1e-4


def test_runtime_serves_probability_and_applies_the_rule(tuned: Path, exported_bundle: Path, labelled: Path) -> None:
    frames = [read_image(p) for p in sorted((labelled / "good").iterdir())[:2]]
    frames += [read_image(p) for p in sorted((labelled / "defect").iterdir())[:2]]
    cfg = BackendConfig(kind="onnxruntime", threads=1)
    with AnomalyModel(tuned, cfg) as model, AnomalyModel(exported_bundle, cfg) as plain:
        for f in frames:
            p, q = model.predict(f), plain.predict(f)
            assert p.probability is not None and 0.0 <= p.probability <= 1.0
            assert p.is_ng == (p.probability >= 0.5)  # decision "classifier"
            assert p.score == pytest.approx(q.score, rel=1e-5)  # the chain is untouched
            assert "classifier" in p.timings_ms and q.probability is None


def test_two_different_inputs_give_different_probabilities(tuned: Path, labelled: Path) -> None:
    good, defect = sorted((labelled / "good").iterdir())[0], sorted((labelled / "defect").iterdir())[0]
    with AnomalyModel(tuned, BackendConfig(kind="onnxruntime", threads=1)) as model:
        a, b = model.predict(read_image(good)).probability, model.predict(read_image(defect)).probability
    assert a is not None and b is not None and a != b


def test_either_rule_retune_refused_tampered_classifier_refused(
    tiny_run: tuple[Path, Path], exported_bundle: Path, labelled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "either"
    _, m = label_tune(
        LabelTuneOptions(
            run=tiny_run[0], labelled=labelled, out=out, bundle=exported_bundle, decision="either", classifier="logreg"
        )
    )
    assert m.classifier is not None and "or score >=" in m.classifier.rule and "logistic" in m.classifier.model
    with AnomalyModel(out, BackendConfig(kind="onnxruntime", threads=1), threshold=-1e9) as model:
        assert model.predict(read_image(next((labelled / "good").iterdir()))).is_ng  # the score alone says NG
    assert json.loads((out / "manifest.json").read_text())["classifier"]["decision"] == "either"
    with pytest.raises(ExportError, match="already has a classifier"):
        label_tune(LabelTuneOptions(run=tiny_run[0], labelled=labelled, out=tmp_path / "again", bundle=out))
    shutil.copy(out / "teacher.onnx", out / "classifier.onnx")  # a classifier swapped after export: refused
    with pytest.raises(BundleError, match="classifier.onnx"):
        AnomalyModel(out, BackendConfig(kind="onnxruntime", threads=1))


def test_fit_classifier_separates_and_calibrates() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(0, 1, (10, 8)) + [3, 0, 0, 0, 0, 0, 0, 0]])
    y = np.r_[np.zeros(20), np.ones(10)]
    clf = fit_classifier(x, y, seed=0)
    p = clf.predict_proba(x)
    assert clf.stats["cv_auroc"] > 0.9 and clf.stats["folds"] == 5
    assert p[y == 1].mean() > 0.7 and p[y == 0].mean() < 0.3
    with pytest.raises(ExportError, match="at least 2 of each"):
        fit_classifier(x[:21], y[:21])


def test_fit_classifier_prefers_the_simplest_feature_set_within_one_se() -> None:
    """A noisy 40-dim block next to an informative score: the score set wins; a signal only the block carries
    (the score is noise): the richer set wins. The weight is zero outside the chosen columns."""
    from export.label_tune import feature_sets

    rng = np.random.default_rng(1)
    n_good, n_def = 16, 8
    y = np.r_[np.zeros(n_good), np.ones(n_def)]
    dims = 40 + 5
    x = rng.normal(0, 1, (len(y), dims))
    x[:, 40] += 2.5 * y  # column 40 = the anomaly score (first of the map statistics)
    sets = feature_sets(dims)
    assert [name for name, _ in sets] == ["anomaly score", "anomaly-map statistics", "embedding + map statistics"]
    clf = fit_classifier(x, y, seed=0, sets=sets)
    assert clf.feature_set == "anomaly score"
    assert np.count_nonzero(clf.weight) == 1 and clf.weight[40] > 0
    assert clf.stats["cv_auroc[anomaly score]"] > 0.8 and "cv_auroc_se" in clf.stats
    p = clf.predict_proba(x)
    assert p[y == 1].mean() > p[y == 0].mean()

    x2 = rng.normal(0, 1, (len(y), dims))
    x2[:, :10] += 2.0 * y[:, None]  # only the embedding block separates
    clf2 = fit_classifier(x2, y, seed=0, sets=sets)
    assert clf2.feature_set == "embedding + map statistics"
    assert clf2.stats["cv_auroc[embedding + map statistics]"] > clf2.stats["cv_auroc[anomaly score]"]
    with pytest.raises(ExportError, match="outside the 45 features"):
        fit_classifier(x, y, sets=[("bad", [45])])


def test_fit_classifier_falls_back_to_the_threshold_rule_when_labels_carry_no_signal() -> None:
    """Scores ranked the wrong way round on the labelled images: no classifier is trusted; the result is the
    bundle's rule (NG iff score >= threshold at probability 0.5), said so in the description and stats."""
    from export.label_tune import feature_sets

    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(8), np.ones(4)]
    x = rng.normal(0, 1, (12, 15))
    x[:, 10] = np.r_[np.linspace(2.0, 3.0, 8), np.linspace(0.0, 1.0, 4)]  # column 10 = score, defects lowest
    clf = fit_classifier(x, y, seed=0, sets=feature_sets(15), fallback=(10, 1.5))
    assert clf.stats["fallback"] == 1.0 and "threshold rule" in clf.description
    probe = np.zeros((3, 15))
    probe[:, 10] = [1.0, 1.5, 2.0]
    p = clf.predict_proba(probe)
    assert p[0] < 0.5 and p[1] == pytest.approx(0.5) and p[2] > 0.5


def _write(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((32, 32, 3), 40 * i, np.uint8))


def test_labelled_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="folder not found"):
        labelled_images(tmp_path / "nope")
    _write(tmp_path / "a" / "good", 3)
    with pytest.raises(ExportError, match=r"defect is missing"):
        labelled_images(tmp_path / "a")
    (tmp_path / "a" / "defect").mkdir()
    with pytest.raises(ExportError, match="holds no images.*only one class"):
        labelled_images(tmp_path / "a")
    _write(tmp_path / "a" / "defect", 1)
    with pytest.raises(ExportError, match="at least 2 per class"):
        labelled_images(tmp_path / "a")
    _write(tmp_path / "a" / "defect", 3)
    (tmp_path / "a" / "defect" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ExportError, match=r"1 unreadable image file\(s\): .*broken\.png"):
        labelled_images(tmp_path / "a")
    (tmp_path / "a" / "defect" / "broken.png").unlink()
    items = labelled_images(tmp_path / "a")
    assert [lab for _, lab in items] == [0, 0, 0, 1, 1, 1]


def test_cli_refuses_one_class_before_any_work(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    _write(tmp_path / "lab" / "good", 3)
    (tmp_path / "lab" / "defect").mkdir()
    rc = main(
        ["label-tune", "--run", str(tiny_run[0]), "--labelled", str(tmp_path / "lab"), "--out", str(tmp_path / "b")]
    )
    assert rc != 0 and "only one class" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_exports_the_run_first_without_bundle(
    tiny_run: tuple[Path, Path], labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    out = tmp_path / "new" / "bundle"
    argv = ["label-tune", "--run", str(tiny_run[0]), "--labelled", str(labelled), "--out", str(out)]
    assert main([*argv, "--classifier", "svm"]) == 0
    printed = capsys.readouterr().out
    assert "linear SVM" in printed and "NG iff probability >= 0.5" in printed and str(out) in printed
    m = load_manifest(out)
    assert m.classifier is not None and [p.name for p in m.parts][0] == "teacher"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch or staging left behind
