"""``rdedge label-tune``: a few labelled good / defect images -> a calibrated classifier part in the bundle (seed 002).

An operator sets aside a handful of real defects (``DIR/defect/``) and good parts (``DIR/good/``). Each image is
described by frozen features: the teacher's embedding (global average of its three feature maps, concatenated and
L2-normalised) and statistics of the bundle's own anomaly map (score, mean, std, max, top-1% mean). A linear model
(logistic regression or a linear SVM, class-balanced, ``C`` and the model chosen by stratified cross-validation on
the labelled images) is fitted on the standardised features and calibrated by Platt scaling on its cross-validated
decision values. Standardisation, the linear model and the Platt sigmoid fold into one ``MatMul + Add + Sigmoid``,
exported with the teacher as ``classifier.onnx`` (image, anomaly_map, score -> probability), so the runtime needs
nothing new: it runs the part on onnxruntime after the chain (:mod:`runtime.engine`) and the verdict carries both
the anomaly score and the probability. The decision rule is written into ``manifest.classifier``.

Steps: read and check ``DIR`` -> the base bundle (``--bundle``, or the run exported with default options) -> every
labelled frame through the runtime's own :class:`~runtime.engine.AnomalyModel` (anomaly map, score) and the run's
teacher (embedding) -> fit -> export and check the ONNX graph against torch -> new bundle written atomically
(:mod:`export.bundle_writer`), loaded back through the runtime and checked once more.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from export.errors import ExportError, require

if TYPE_CHECKING:
    from torch import Tensor, nn

    from runtime.bundle import Manifest

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.onnx"
CLASSIFIER_INPUTS = ("image", "anomaly_map", "score")
CLASSIFIER_OUTPUTS = ("probability",)
#: Anomaly-map statistics appended to the embedding, in this order.
MAP_STATS = ("score", "map_mean", "map_std", "map_max", "map_top1pct")
#: Regularisation grid searched by cross-validation (inverse strength, sklearn's ``C``).
LOGREG_C = (0.01, 0.1, 1.0, 10.0)
SVM_C = (0.001, 0.01, 0.1, 1.0)
#: Probability parity between the exported graph and torch (absolute, probability units).
PROBABILITY_TOL = 1e-4
MIN_PER_CLASS = 2

Kind = Literal["auto", "logreg", "svm"]
Decision = Literal["classifier", "either"]


@dataclass
class LabelTuneOptions:
    """Options of ``rdedge label-tune`` (see ``rdedge label-tune --help``)."""

    run: Path
    labelled: Path
    out: Path
    bundle: Path | None = None
    classifier: Kind = "auto"
    decision: Decision = "classifier"
    probability_threshold: float = 0.5
    seed: int = 0
    force: bool = False
    sign: Path | None = None


@dataclass
class LinearClassifier:
    """A fitted, calibrated linear classifier on raw (unstandardised) features.

    ``probability = sigmoid(x @ weight + bias)``; standardisation and the Platt sigmoid are already folded in.

    Attributes:
        weight: ``(D,)`` float64.
        bias: scalar.
        description: what was fitted, in words.
        stats: cross-validated figures on the labelled images (``cv_auroc``, ``cv_f1``, ``folds``, counts).
    """

    weight: np.ndarray
    bias: float
    description: str
    stats: dict[str, float] = field(default_factory=dict)
    feature_set: str = "all features"

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, D)`` features -> ``(N,)`` defect probability."""
        z = np.asarray(x, np.float64) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------------------------------------- data


def labelled_images(folder: Path) -> list[tuple[Path, int]]:
    """``[(path, label)]`` from ``folder/good`` (0) and ``folder/defect`` (1), every file decoded once to check it.

    Raises:
        ExportError: ``folder`` or a class folder missing, a class folder with no images (only one class), fewer
            than :data:`MIN_PER_CLASS` images in a class, or unreadable files (each named).
    """
    from training.data import IMAGE_SUFFIXES, read_image
    from training.errors import DataError

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--labelled {folder}: folder not found (it must hold good/ and defect/)")
    out: list[tuple[Path, int]] = []
    for name, label in (("good", 0), ("defect", 1)):
        sub = folder / name
        if not sub.is_dir():
            raise ExportError(f"--labelled {folder}: {sub} is missing (the folder must hold good/ and defect/)")
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(
                f"--labelled {folder}: {sub} holds no images ({sorted(IMAGE_SUFFIXES)}): only one class; "
                "label-tune needs good and defect examples"
            )
        if len(files) < MIN_PER_CLASS:
            raise ExportError(
                f"--labelled {folder}: {sub} holds {len(files)} image; at least {MIN_PER_CLASS} per class are "
                "needed to cross-validate and calibrate the classifier"
            )
        out += [(p, label) for p in files]
    bad = []
    for p, _ in out:
        try:
            read_image(p)
        except DataError:
            bad.append(p)
    if bad:
        raise ExportError(
            f"--labelled {folder}: {len(bad)} unreadable image file(s): {', '.join(map(str, bad[:5]))}"
            + (" ..." if len(bad) > 5 else "")
        )
    return out


# ------------------------------------------------------------------------------------------------------- features


def _classifier_module(teacher: nn.Module, map_hw: tuple[int, int]) -> nn.Module:
    """The part as a torch module: ``image (B,3,H,W), anomaly_map (B,1,H,W), score (B,) -> (probability (B,),)``.

    ``features`` gives the raw ``(B, D)`` features; the head (``weight``, ``bias`` buffers) starts at zero and is
    set by :func:`set_head` after fitting.
    """
    import torch
    from torch import nn

    k = max(1, (map_hw[0] * map_hw[1]) // 100)  # static top-1% count: a constant TopK in the graph

    class ClassifierPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = teacher
            self.register_buffer("weight", torch.zeros(1))
            self.register_buffer("bias", torch.zeros(1))

        def features(self, image: Tensor, anomaly_map: Tensor, score: Tensor) -> Tensor:
            f = self.teacher(image)
            emb = torch.cat([t.mean(dim=(2, 3)) for t in f], dim=1)  # (B, C1 + C2 + C3)
            emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            m = anomaly_map.flatten(1)  # (B, H * W)
            mean = m.mean(dim=1)
            std = ((m - mean[:, None]) ** 2).mean(dim=1).sqrt()
            top = torch.topk(m, k, dim=1).values.mean(dim=1)
            stats = torch.stack([score, mean, std, m.amax(dim=1), top], dim=1)  # (B, 5), order of MAP_STATS
            return torch.cat([emb, stats], dim=1)

        def forward(self, image: Tensor, anomaly_map: Tensor, score: Tensor) -> tuple[Tensor]:
            x = self.features(image, anomaly_map, score)
            return (torch.sigmoid(x @ self.weight + self.bias),)

    return ClassifierPart().eval()


def set_head(module: nn.Module, clf: LinearClassifier) -> None:
    """Write the fitted weight ``(D,)`` and bias into the part's buffers (float32)."""
    import torch

    module.weight = torch.as_tensor(clf.weight, dtype=torch.float32)
    module.bias = torch.as_tensor([clf.bias], dtype=torch.float32)


@dataclass
class Described:
    """Labelled frames described for fitting: inputs of the part and its raw features."""

    images: np.ndarray  # (N, 3, H, W) float32, the runtime's preprocessing
    maps: np.ndarray  # (N, 1, H, W) float32, the bundle's anomaly maps
    scores: np.ndarray  # (N,) float32, the bundle's image scores
    features: np.ndarray  # (N, D) float64


def describe(module: nn.Module, model: Any, paths: Sequence[Path], batch: int = 16) -> Described:
    """Score every frame with the runtime's ``AnomalyModel`` and compute the part's features with torch.

    Args:
        module: from :func:`_classifier_module`.
        model: a loaded :class:`runtime.engine.AnomalyModel` of the base bundle (onnxruntime).
        paths: image files (decoded as the runtime's frames, uint8 BGR).
    """
    import torch

    from runtime.preprocess import Preprocessor
    from training.data import read_image

    pre = Preprocessor(model.manifest.preprocess, model.manifest.input)
    images, maps, scores = [], [], []
    for p in paths:
        frame = read_image(p)
        images.append(pre(frame)[0])
        pred = model.predict(frame)
        maps.append(pred.anomaly_map[None])
        scores.append(pred.score)
    x, m, s = np.stack(images), np.stack(maps).astype(np.float32), np.asarray(scores, np.float32)
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            t = [torch.from_numpy(a[i : i + batch]) for a in (x, m, s)]
            feats.append(module.features(*t).double().numpy())
    return Described(x, m, s, np.concatenate(feats))


# ------------------------------------------------------------------------------------------------------------ fit


def _candidates(kind: Kind) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if kind in ("auto", "logreg"):
        out += [("logreg", c) for c in LOGREG_C]
    if kind in ("auto", "svm"):
        out += [("svm", c) for c in SVM_C]
    return out


def _estimator(name: str, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    if name == "logreg":
        return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return SVC(kernel="linear", C=c, class_weight="balanced", random_state=seed)


#: A named group of feature columns the classifier may be restricted to (simplest first).
FeatureSet = tuple[str, Sequence[int]]


def score_column(dims: int) -> int:
    """Column of the anomaly score among ``dims`` part features (the first of :data:`MAP_STATS`, after the
    embedding)."""
    return dims - len(MAP_STATS)


def feature_sets(dims: int) -> list[FeatureSet]:
    """The nested feature sets ``label-tune`` chooses among, simplest first, for ``dims`` part features.

    The anomaly score alone (a calibrated 1-D rule on the bundle's own score), the anomaly-map statistics, and the
    teacher embedding with the statistics. With a dozen labelled images (5% of a small test set) a classifier on a
    ~180-dim embedding overfits: measured on kolektorsdd it fell below the bare anomaly score
    (``benchmarks/results/few_labels.md``), so the richer sets must earn their place in cross-validation.
    """
    score = score_column(dims)
    return [("anomaly score", [score]), ("anomaly-map statistics", list(range(score, dims))),
            ("embedding + map statistics", list(range(dims)))]  # fmt: skip


def _auroc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC estimated from ``n_pos`` positives, ``n_neg`` negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / max(n_pos * n_neg, 1)
    return float(np.sqrt(max(var, 0.0)))


def fit_classifier(
    x: np.ndarray,
    y: np.ndarray,
    kind: Kind = "auto",
    seed: int = 0,
    sets: Sequence[FeatureSet] | None = None,
    fallback: tuple[int, float] | None = None,
) -> LinearClassifier:
    """Fit, choose and calibrate a linear classifier on ``x (N, D)``, ``y (N,)`` in {0, 1} (1 = defect).

    Each candidate (feature set x logistic regression / linear SVM x ``C`` grid) gets out-of-fold decision values by
    stratified k-fold cross-validation (``k = min(5, smallest class)``). With several feature sets (``sets``,
    simplest first) the **one-standard-error rule** picks the set: the simplest one whose best candidate is within
    one standard error (Hanley-McNeil) of the best out-of-fold AUROC of any candidate; within it the best
    candidate wins. That candidate is refitted on every image, and a Platt sigmoid fitted on its out-of-fold
    decision values calibrates it. Only the labelled images are used. The weight vector has zeros outside the
    chosen set, so the exported part keeps one shape.

    **Fallback.** When the labels carry no usable signal (the chosen candidate's out-of-fold AUROC is at most 0.5,
    its Platt slope is not positive, or, on the score alone, a negative weight: each says the probability would
    fall as the evidence of a defect grows, which a dozen images can produce by chance) and ``fallback = (score
    column, threshold)`` is given, the result reproduces the bundle's own rule instead:
    ``probability = sigmoid((score - threshold) / spread)``, so NG iff ``score >= threshold`` at probability 0.5;
    ``stats["fallback"]`` is then 1.

    Args:
        sets: ``[(name, columns)]`` to choose among; ``None``: every column, one set.
        fallback: the anomaly score's column and the bundle's threshold, for the fallback above.

    Raises:
        ExportError: one class only, or fewer than :data:`MIN_PER_CLASS` images in a class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(x, np.float64), np.asarray(y).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ExportError(
            f"labelled images: {counts[0]} good and {counts[1]} defect; at least {MIN_PER_CLASS} of each are needed"
        )
    dims = x.shape[1]
    sets = list(sets) if sets is not None else [("all features", list(range(dims)))]
    for set_name, cols in sets:
        if not cols or min(cols) < 0 or max(cols) >= dims:
            raise ExportError(f"feature set {set_name!r}: columns {list(cols)[:5]}... outside the {dims} features")
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    sigma = np.where(sigma > 1e-8, sigma, 1.0)  # constant features stay at zero
    xs = (x - mu) / sigma
    folds = int(min(5, counts.min()))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(xs, y))
    per_set: list[tuple[float, str, float, np.ndarray]] = []  # best candidate of each set
    for _, cols in sets:
        xc = xs[:, list(cols)]
        best: tuple[float, str, float, np.ndarray] | None = None
        for name, c in _candidates(kind):
            oof = np.zeros(len(y))
            for tr, te in splits:
                oof[te] = _estimator(name, c, seed).fit(xc[tr], y[tr]).decision_function(xc[te])
            auc = float(roc_auc_score(y, oof))
            if best is None or auc > best[0] + 1e-9:  # ties keep the earlier (stronger-regularised) candidate
                best = (auc, name, c, oof)
        assert best is not None
        per_set.append(best)
    top = max(r[0] for r in per_set)
    se = _auroc_se(top, int(counts[1]), int(counts[0]))
    chosen = next(i for i, r in enumerate(per_set) if r[0] >= top - se)  # simplest set within one SE of the best
    auc, name, c, oof = per_set[chosen]
    set_name, cols = sets[chosen][0], list(sets[chosen][1])
    final = _estimator(name, c, seed).fit(xs[:, cols], y)
    w = np.zeros(dims)
    w[cols] = final.coef_.ravel().astype(np.float64)
    b = float(final.intercept_[0])
    platt = LogisticRegression(C=1e4, max_iter=5000).fit(oof[:, None], y)  # ~unregularised 1-D sigmoid
    a, b0 = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    # sigmoid(a * (w . (x - mu) / sigma + b) + b0) = sigmoid(x . w' + b')
    weight = a * w / sigma
    bias = a * (b - float(np.dot(w, mu / sigma))) + b0
    p_oof = 1.0 / (1.0 + np.exp(-(a * oof + b0)))
    label = "logistic regression" if name == "logreg" else "linear SVM"
    stats = {
        "cv_auroc": auc,
        "cv_f1_at_0.5": float(f1_score(y, p_oof >= 0.5, zero_division=0)),
        "folds": float(folds),
        "n_good": float(counts[0]),
        "n_defect": float(counts[1]),
        "C": float(c),
        "platt_a": a,
        "platt_b": b0,
        "cv_auroc_se": se,
        **{f"cv_auroc[{sn}]": r[0] for (sn, _), r in zip(sets, per_set, strict=True)},
    }
    # A higher anomaly score never means "less defective": a negative weight on the score alone says the labels are
    # noise (with the map statistics beside it the weights share collinear columns and their signs mean nothing).
    flipped = fallback is not None and cols == [fallback[0]] and w[fallback[0]] < 0
    if fallback is not None and (auc <= 0.5 or a <= 0 or flipped):
        col, thr = fallback
        spread = max(float(x[:, col].std()), 1e-6)
        weight = np.zeros(dims)
        weight[col] = 1.0 / spread
        stats.update({"fallback": 1.0, "threshold": float(thr)})
        desc = (
            f"the bundle's threshold rule (score >= {thr:.6g}) as a sigmoid: the labelled images carried no usable "
            f"signal (best CV AUROC {auc:.3f}, Platt slope {a:.3g}, score weight {w[col]:.3g})"
        )
        log.warning("classifier: %s", desc)
        return LinearClassifier(weight, -thr / spread, desc, stats, "anomaly score (bundle threshold)")
    n_cand = len(_candidates(kind)) * len(sets)
    chosen_by = (
        f"{folds}-fold stratified CV AUROC on the labelled images"
        if len(sets) == 1
        else f"{folds}-fold stratified CV AUROC on the labelled images, the simplest feature set within one "
        f"standard error ({se:.3f}) of the best"
    )
    desc = (
        f"{label} (C={c:g}, class-balanced) on standardised features ({set_name}), chosen among {n_cand} "
        f"candidates by {chosen_by}; Platt-calibrated on its out-of-fold decision values"
    )
    log.info("classifier: %s; CV AUROC %.3f, CV F1@0.5 %.3f", desc, auc, stats["cv_f1_at_0.5"])
    return LinearClassifier(weight=weight, bias=bias, description=desc, stats=stats, feature_set=set_name)


# ---------------------------------------------------------------------------------------------------------- bundle


def _export_part(module: nn.Module, d: Described, path: Path, opset: int) -> dict[str, float]:
    """Export the part, check ORT vs torch on the labelled frames; returns the parity figures."""
    import torch

    from export import onnx_parts, parity

    example = tuple(torch.from_numpy(a[:2]) for a in (d.images, d.maps, d.scores))
    onnx_parts.export_torch_part(module, "classifier", example, path, opset, (CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS))
    sess = parity.session(path)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(a) for a in (d.images, d.maps, d.scores)))[0].numpy()
    got = np.concatenate(
        [
            parity.run_session(
                sess, {"image": d.images[i : i + 8], "anomaly_map": d.maps[i : i + 8], "score": d.scores[i : i + 8]}
            )[0]
            for i in range(0, len(d.images), 8)
        ]
    )
    max_abs = float(np.max(np.abs(got - ref)))
    log.info("parity classifier (n=%d) max_abs %.3g (tolerance %.3g)", len(ref), max_abs, PROBABILITY_TOL)
    if not max_abs <= PROBABILITY_TOL:
        from export.errors import ParityError

        raise ParityError(
            f"parity check failed for the classifier: max |probability difference| {max_abs:.3g} exceeds "
            f"{PROBABILITY_TOL:g} on the {len(ref)} labelled images"
        )
    return {"classifier_probability_max_abs": max_abs}


def label_tune(opts: LabelTuneOptions) -> tuple[Path, Manifest]:
    """Fit the classifier on ``opts.labelled`` and write the bundle ``opts.out`` (base bundle + classifier part).

    Raises:
        ExportError / ParityError: bad labelled folder, bad options, existing ``out``, parity beyond tolerance.
        BundleError: the base bundle is missing, invalid or tampered with.
        training.errors.CheckpointError: missing or mismatched run.
    """
    require("torch", "export", "label-tune")
    require("sklearn", "train", "label-tune (logistic regression / SVM)")
    require("onnxruntime", "cpu", "label-tune")
    from export.bundle_writer import check_target, finalize_manifest, staging, utc_now
    from runtime.bundle import ClassifierSpec, PartSpec, load_manifest
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from runtime.signing import SIGNATURE_NAME
    from training.build import load_model

    if not 0.0 < opts.probability_threshold < 1.0:
        raise ExportError(f"--probability-threshold must be in (0, 1), got {opts.probability_threshold}")
    out = Path(opts.out)
    check_target(out, opts.force)
    items = labelled_images(opts.labelled)
    model, cfg, _ = load_model(opts.run)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".label-tune-", dir=out.absolute().parent) as scratch:
        base = opts.bundle
        if base is None:
            from export.pipeline import ExportOptions, export_bundle

            log.info("no --bundle: exporting %s with the default options first", opts.run)
            base, _ = export_bundle(ExportOptions(run=Path(opts.run), out=Path(scratch) / "base"))
        base_manifest = load_manifest(base, verify=True)
        if base_manifest.classifier is not None:
            raise ExportError(f"--bundle {base}: already has a classifier part; start from the bundle without one")
        if base_manifest.backbone != cfg.model.backbone:
            raise ExportError(
                f"--bundle {base} was exported from a {base_manifest.backbone} run, --run {opts.run} is "
                f"{cfg.model.backbone}"
            )
        inp = base_manifest.input
        module = _classifier_module(model.teacher, (inp.height, inp.width))
        with AnomalyModel(Path(base), BackendConfig(kind="onnxruntime", threads=2)) as anomaly:
            d = describe(module, anomaly, [p for p, _ in items])
        y = np.array([lab for _, lab in items])
        dims = d.features.shape[1]
        # The fallback only replaces the automatic choice: a model the user named is fitted as asked.
        fallback = (score_column(dims), base_manifest.threshold.value) if opts.classifier == "auto" else None
        clf = fit_classifier(d.features, y, opts.classifier, opts.seed, feature_sets(dims), fallback)
        set_head(module, clf)
        opset = int(base_manifest.extra.get("opset", 17))
        n_good, n_defect = int((y == 0).sum()), int((y == 1).sum())
        rule = (
            f"NG iff probability >= {opts.probability_threshold:g}"
            if opts.decision == "classifier"
            else f"NG iff probability >= {opts.probability_threshold:g} or score >= threshold "
            f"({base_manifest.threshold.value:.6g})"
        )
        with staging(out, opts.force) as tmp:
            for f in Path(base).iterdir():
                if f.name in ("manifest.json", SIGNATURE_NAME) or f.name.startswith("."):
                    continue
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
            par = _export_part(module, d, tmp / CLASSIFIER_FILE, opset)
            from export import onnx_parts

            part_in = [d.images[:1], d.maps[:1], d.scores[:1]]
            prob1 = _torch_probability(module, d, 0)[None].astype(np.float32)

            spec = ClassifierSpec(
                part=PartSpec(
                    name="classifier",
                    file=CLASSIFIER_FILE,
                    inputs=onnx_parts.tensor_specs(CLASSIFIER_INPUTS, part_in),
                    outputs=onnx_parts.tensor_specs(CLASSIFIER_OUTPUTS, [prob1]),
                ),
                decision=opts.decision,
                probability_threshold=opts.probability_threshold,
                rule=rule,
                model=clf.description,
                features=f"{base_manifest.backbone} teacher embedding (global mean of its 3 feature maps, "
                f"concatenated, L2-normalised; {d.features.shape[1] - len(MAP_STATS)} dims) + anomaly-map "
                f"statistics ({', '.join(MAP_STATS)}) of this bundle's chain",
                source=f"{Path(opts.labelled).absolute()}: {n_good} good, {n_defect} defect",
                stats=clf.stats,
                feature_set=clf.feature_set,
            )
            manifest = base_manifest.model_copy(
                update={
                    "model_id": f"{base_manifest.model_id}-clf{_sha8(tmp / CLASSIFIER_FILE)}",
                    "created": utc_now(),
                    "classifier": spec,
                    "parity": {**base_manifest.parity, **par},
                }
            )
            manifest = finalize_manifest(tmp, manifest)
            _check_served(tmp, [items[0][0], items[-1][0]], [_torch_probability(module, d, i) for i in (0, -1)])
            if opts.sign is not None:
                from runtime.signing import sign_bundle

                log.info("signed manifest.json with key %s", sign_bundle(tmp, opts.sign))
    log.info("bundle %s: model %s, classifier %s; %s", out, manifest.model_id, clf.description, rule)
    return out, manifest


def _sha8(path: Path) -> str:
    from runtime.bundle import sha256_file

    return sha256_file(path)[:8]


def _torch_probability(module: nn.Module, d: Described, i: int) -> np.ndarray:
    """The torch part's probability for labelled frame ``i`` (a 0-d array)."""
    import torch

    with torch.no_grad():
        t = (torch.from_numpy(a[i : i + 1] if i != -1 else a[-1:]) for a in (d.images, d.maps, d.scores))
        return np.asarray(module(*t)[0][0].numpy(), np.float64)


def _check_served(bundle: Path, paths: Sequence[Path], expected: Sequence[np.ndarray]) -> None:
    """Load the new bundle through the runtime (hashes, calibration, classifier session) and check the probability
    its ``predict`` gives two labelled files against torch."""
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.data import read_image

    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2)) as served:
        for p, ref in zip(paths, expected, strict=True):
            got = served.predict(read_image(p)).probability
            if got is None or not abs(got - float(ref)) <= PROBABILITY_TOL:
                raise ExportError(f"{bundle}: the served classifier gives {got} for {p}, torch {float(ref):.6g}")
