"""Few-labels benchmark (seed 002): anomaly score alone vs the label-tuned classifier vs a supervised CNN.

For each dataset: a run from ``rdedge train`` (given with ``--runs``; 128 px, 200 images) is exported with the
default options; every test image is scored once by that bundle through the runtime (``AnomalyModel``, onnxruntime)
and described by the label-tune features (teacher embedding + anomaly-map statistics, :mod:`export.label_tune`).
Then, for each labelled fraction (5%, 10% of the test set) and each draw (seed): a stratified draw of the test set
is the operator's labelled folder; every metric is computed on the remaining test images only.

Rows, all on the same remaining images:
- ``score@bundle``: the anomaly score with the bundle's own threshold (defect-free rule, no labels used).
- ``score@labelled-f1``: the anomaly score with the F1-optimal threshold on the labelled draw.
- ``classifier``: ``label-tune``'s fit (auto: logistic regression / linear SVM chosen by CV, Platt-calibrated),
  NG iff probability >= 0.5; also with the embedding alone and the map statistics alone (feature ablation).
- ``supervised CNN``: :mod:`training.supervised` (lite0 trunk, class-weighted CE, fixed recipe), argmax.

    nice -n 10 python benchmarks/few_labels.py --runs magnetic_tile=RUN1 kolektorsdd=RUN2 [--draws 5] [--cnn-draws 3]

Writes benchmarks/results/few_labels.json (every draw) and few_labels.md (mean +- std over draws).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("few_labels")
STAT_DIMS = 5  # export.label_tune.MAP_STATS


def metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """accuracy, precision, recall, F1 of hard ``pred`` and AUROC of ``score`` against ``y`` (1 = defect)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auroc": float(roc_auc_score(y, score)),
    }


def f1_threshold(score: np.ndarray, y: np.ndarray) -> float:
    """The threshold on ``score`` with the best F1 on (score, y): midpoint between neighbouring scores."""
    from sklearn.metrics import f1_score

    s = np.sort(np.unique(score))
    cands = np.r_[s[0] - 1e-6, (s[1:] + s[:-1]) / 2, s[-1] + 1e-6]
    f1s = [f1_score(y, score >= t, zero_division=0) for t in cands]
    return float(cands[int(np.argmax(f1s))])


def describe_dataset(name: str, root: Path, run: Path, work: Path) -> dict[str, Any]:
    """Export ``run``, score and describe every test image once (cached as ``work/name/features.npz``)."""
    from export.label_tune import _classifier_module, describe
    from export.pipeline import ExportOptions, export_bundle
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.build import load_model
    from training.data import discover

    cache = work / name / "features.npz"
    bundle = work / name / "bundle"
    test = discover(root, need_test=True).test
    paths, y = [s.path for s in test], np.array([s.label for s in test])
    types = [s.defect for s in test]
    if not cache.is_file():
        if not (bundle / "manifest.json").is_file():
            export_bundle(ExportOptions(run=run, out=bundle, precision="fp32", force=True))
        model, _, _ = load_model(run)
        with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2)) as am:
            inp = am.manifest.input
            module = _classifier_module(model.teacher, (inp.height, inp.width))
            t0 = time.perf_counter()
            d = describe(module, am, paths)
            log.info("%s: %d test images described in %.1f s", name, len(paths), time.perf_counter() - t0)
            thr = am.threshold
        np.savez(cache, images=d.images, features=d.features, scores=d.scores, threshold=thr)
    z = np.load(cache)
    return {
        "paths": paths,
        "y": y,
        "types": types,
        "images": z["images"],
        "features": z["features"],
        "scores": z["scores"].astype(np.float64),
        "threshold": float(z["threshold"]),
    }


def draw(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified draw of ``frac`` of the images (at least 2 per class): ``(labelled idx, remaining idx)``."""
    rng = np.random.default_rng(seed)
    lab = []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        n = max(2, int(round(frac * len(idx))))
        lab.append(rng.choice(idx, n, replace=False))
    labelled = np.sort(np.concatenate(lab))
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    return labelled, rest


def run_dataset(ds: dict[str, Any], fracs: list[float], draws: int, cnn_draws: int, cnn_epochs: int) -> list[dict]:
    from export.label_tune import feature_sets, fit_classifier, score_column
    from training.supervised import SupervisedOptions, fit_supervised, predict_proba

    rows = []
    y, x, s = ds["y"], ds["features"], ds["scores"]
    emb = slice(0, x.shape[1] - STAT_DIMS)
    for frac in fracs:
        for seed in range(draws):
            first = len(rows)
            lab, rest = draw(y, frac, seed)
            base = {"fraction": frac, "seed": seed, "n_labelled": int(len(lab)), "n_eval": int(len(rest))}
            base["n_labelled_defect"], base["n_eval_defect"] = int(y[lab].sum()), int(y[rest].sum())
            rows.append({**base, "method": "score@bundle", **metrics(y[rest], s[rest] >= ds["threshold"], s[rest])})
            t = f1_threshold(s[lab], y[lab])
            rows.append({**base, "method": "score@labelled-f1", **metrics(y[rest], s[rest] >= t, s[rest])})
            for method, cols, sets in (
                ("classifier", slice(None), feature_sets(x.shape[1])),  # what label-tune fits
                ("classifier (embedding + map stats, no set choice)", slice(None), None),
                ("classifier (embedding only)", emb, None),
                ("classifier (map stats only)", slice(x.shape[1] - STAT_DIMS, None), None),
            ):
                t0 = time.perf_counter()
                fb = (score_column(x.shape[1]), ds["threshold"]) if sets is not None else None  # as label-tune
                clf = fit_classifier(x[lab][:, cols], y[lab], "auto", seed, sets, fb)
                p = clf.predict_proba(x[rest][:, cols])
                m = metrics(y[rest], p >= 0.5, p)
                rows.append({**base, "method": method, **m, "model": clf.description.split(" on ")[0],
                             "feature_set": clf.feature_set, "fit_s": time.perf_counter() - t0})  # fmt: skip
            if seed < cnn_draws:
                t0 = time.perf_counter()
                cnn = fit_supervised(ds["images"][lab], y[lab], SupervisedOptions(epochs=cnn_epochs, seed=seed))
                p = predict_proba(cnn, ds["images"][rest])
                log.info("supervised CNN fitted on %d images in %.1f s", len(lab), time.perf_counter() - t0)
                rows.append({**base, "method": "supervised CNN", **metrics(y[rest], p >= 0.5, p),
                             "fit_s": time.perf_counter() - t0})  # fmt: skip
            log.info("fraction %.2f draw %d: %s", frac, seed, {r["method"]: round(r["f1"], 3) for r in rows[first:]})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["dataset"], r["fraction"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    order = ["score@bundle", "score@labelled-f1", "classifier", "classifier (embedding + map stats, no set choice)",
             "classifier (embedding only)", "classifier (map stats only)", "supervised CNN"]  # fmt: skip
    keys.sort(key=lambda k: (k[0], k[1], order.index(k[2])))
    for d, f, m in keys:
        sel = [r for r in rows if (r["dataset"], r["fraction"], r["method"]) == (d, f, m)]
        row: dict[str, Any] = {"dataset": d, "fraction": f, "method": m, "draws": len(sel)}
        row["n_labelled"], row["n_eval"] = sel[0]["n_labelled"], sel[0]["n_eval"]
        for k in ("accuracy", "precision", "recall", "f1", "auroc"):
            v = np.array([r[k] for r in sel])
            row[k], row[f"{k}_std"] = float(v.mean()), float(v.std())
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN", help="dataset=run folder")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.10])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cnn-draws", type=int, default=3, help="draws that also fit the supervised CNN")
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rdedge-bench/few_labels"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--merge", action="store_true", help="keep other datasets' rows of an existing few_labels.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a crowded box)")
    ap.add_argument(
        "--keep-cnn",
        action="store_true",
        help="with --cnn-draws 0: keep the supervised CNN rows of an existing few_labels.json (the CNN reads neither "
        "the run nor the classifier; same images and draws)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    rows: list[dict] = []
    for spec in args.runs:
        name, run = spec.split("=", 1)
        (args.work / name).mkdir(parents=True, exist_ok=True)
        ds = describe_dataset(name, args.datasets / name, Path(run), args.work)
        for r in run_dataset(ds, args.fractions, args.draws, args.cnn_draws, args.cnn_epochs):
            rows.append({"dataset": name, **r})
    done = {spec.split("=", 1)[0] for spec in args.runs}
    previous = args.results / "few_labels.json"
    if args.keep_cnn and previous.is_file():
        rows += [r for r in json.loads(previous.read_text())["rows"]
                 if r["method"] == "supervised CNN" and r["dataset"] in done]  # fmt: skip
    kept_runs: dict[str, str] = {}
    if args.merge and previous.is_file():  # keep the other datasets' draws from an earlier invocation
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["dataset"] not in done] + rows
        kept_runs = {k: v for k, v in old["conditions"]["runs"].items() if k not in done}
    summary = summarise(rows)
    f1_10 = {r["dataset"]: r["f1"] for r in summary if r["method"] == "classifier" and abs(r["fraction"] - 0.10) < 1e-9}
    target = {d: {"f1": v, "holds": v >= 0.75} for d, v in f1_10.items()}
    out = {
        "benchmark": "few_labels (seed 002)",
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "conditions": {
            "host": platform.node(),
            "cpu_threads": os.cpu_count(),
            "note": "2-core CPU shared with other jobs; timings indicative only",
            "runs": {**kept_runs, **dict(s.split("=", 1) for s in args.runs)},
            "fractions": args.fractions,
            "draws": args.draws,
            "cnn_draws": args.cnn_draws,
            "cnn_rows_kept_from_previous": bool(args.keep_cnn),
            "cnn_epochs": args.cnn_epochs,
            "labelled_draw": "stratified per class, round(fraction * n_class) (at least 2), numpy seed = draw index",
            "evaluated_on": "the test images not drawn (never the labelled ones)",
            "wall_s": time.time() - t_start,
        },
        "target_f1_0.75_at_10pct": target,
        "summary": summary,
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "few_labels.json").write_text(json.dumps(out, indent=2))
    cnn = "CNN rows kept from the previous invocation" if args.keep_cnn else f"{args.cnn_draws} for the CNN"
    lines = [
        "# Few-labels benchmark (seed 002)",
        "",
        f"{out['date']}; `benchmarks/few_labels.py`; runs {out['conditions']['runs']}; {args.draws} stratified draws "
        f"per fraction ({cnn}); metrics on the test images not drawn; mean +- std over draws. "
        "Raw: few_labels.json.",
        "",
        "| dataset | labels | method | draws | n eval | accuracy | precision | recall | F1 | AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        cells = " | ".join(
            f"{r[k]:.3f} +- {r[k + '_std']:.3f}" for k in ("accuracy", "precision", "recall", "f1", "auroc")
        )
        lines.append(
            f"| {r['dataset']} | {r['fraction']:.0%} ({r['n_labelled']}) | {r['method']} | {r['draws']} | "
            f"{r['n_eval']} | {cells} |"
        )
    lines += ["", "Seed 002's target, F1 >= 0.75 with 10% labels (classifier):"]
    lines += [f"- {d}: F1 {v['f1']:.3f} -> {'holds' if v['holds'] else 'missed'}" for d, v in target.items()]
    (args.results / "few_labels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
