"""Does the threshold set from the validation images keep its false-alarm promise? (issue 9: "at its calibrated
threshold it can pass almost every defect").

For trained runs (``benchmarks/detection.py`` run folders) this scores three kinds of defect-free image:

- ``val``: the run's own validation images (they chose the checkpoint and recipe and set the threshold);
- ``holdout``: the train/good images the run never saw (``max_images`` keeps 200 of them, chosen evenly; the rest
  are defect-free images of the same part that neither training nor selection touched);
- ``test``: test/good (reported, never used to choose anything); the test defects give the recall each threshold
  leaves (reported only).

and reports, for each threshold rule of :mod:`training.threshold` calibrated on the validation images alone or on them
plus every other holdout image, the false-alarm rate it promised (the target) against what the other holdout half
and the test good images give. The holdout is the honest judge: it is defect-free data no choice in the run was made
on, so a rule can be judged there without looking at the test set.

    python benchmarks/calibration.py /tmp/rdedge-bench/detection/calib/*-128-s0 --datasets ../shared/datasets

Writes ``benchmarks/results/calibration.json`` (per run: the score arrays' summaries, each rule's threshold and
false-alarm rates) and ``calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.backbones import get_spec
from training.build import load_model
from training.data import Sample, discover, list_images
from training.evaluate import predict
from training.scoring import build_scoring
from training.threshold import RULES, calibrate_threshold

RESULTS = Path(__file__).resolve().parent / "results"


def _scores(run: Path, data: Path) -> dict[str, np.ndarray]:
    model, cfg, ckpt = load_model(run)
    model.eval()
    spec = get_spec(cfg.model.backbone)
    size = cfg.data.input_hw()
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, size, cfg.model.sigma)
    splits = discover(data, cfg.data.val_fraction, cfg.seed, need_test=True, max_images=cfg.data.max_images)
    used = {s.path.resolve() for s in splits.train + splits.val}
    holdout = [Sample(p) for p in list_images(data / "train" / "good", strict=True) if p.resolve() not in used]
    sets = {
        "val": splits.val,
        "holdout": holdout,
        "test": [s for s in splits.test if s.label == 0],
        "defect": [s for s in splits.test if s.label == 1],
    }
    dev = torch.device("cpu")
    return {
        k: predict(model, scoring, v, size, spec.mean, spec.std, dev, keep_maps=False).scores
        for k, v in sets.items()
        if v
    }


def run_one(run: Path, data: Path, target: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = _scores(run, data)
    row: dict[str, Any] = {
        "run": f"{run.parent.name}/{run.name}",  # benchmark tag / run: the same seed under two tags stays apart
        "data": data.name,
        "n": {k: int(v.size) for k, v in s.items()},
        "median": {k: round(float(np.median(v)), 4) for k, v in s.items()},
        "q90": {k: round(float(np.quantile(v, 0.9)), 4) for k, v in s.items()},
        "target_far": target,
        "rules": {},
    }
    # The holdout in two halves (every other image): "val+half" calibrates on the validation images and one half,
    # the other half judges it. Plain "val" is judged on the same judging half, so the two read side by side.
    h = s.get("holdout", np.zeros(0))
    calib_half, judge = h[0::2], h[1::2]
    for source, good in (("val", s["val"]), ("val+half", np.concatenate([s["val"], calib_half]))):
        for rule in RULES:
            thr = calibrate_threshold(good, target, rule=rule)
            row["rules"][f"{source} {rule}"] = {
                "n": int(good.size),
                "threshold": round(thr.value, 4),
                "far_upper_95": round(thr.stats["val_far_upper_95"], 4),
                "far_holdout": round(float((judge >= thr.value).mean()), 4) if judge.size else None,
                "far_test": round(float((s["test"] >= thr.value).mean()), 4),
                "recall_test": round(float((s["defect"] >= thr.value).mean()), 4),
            }
    row["score_s"] = round(time.perf_counter() - t0, 1)
    row["date"] = time.strftime("%Y-%m-%d")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "# Threshold calibration: promised against measured false-alarm rate",
        "",
        "`benchmarks/calibration.py`. Each rule sets the threshold from the run's validation images alone (target "
        "false-alarm rate in the column head). *holdout*: defect-free train/good images the run never saw (neither "
        "training nor selection); *test*: test/good, reported only. Raw: calibration.json.",
        "",
        "| run | n val / holdout / test good | median val / holdout / test | calibrated on, rule | n | threshold | "
        "FAR it can confirm (95%) | FAR holdout | FAR test | test recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = " / ".join(str(r["n"].get(k, "-")) for k in ("val", "holdout", "test"))  # good images only
        med = " / ".join(f"{r['median'][k]:.3f}" if k in r["median"] else "-" for k in ("val", "holdout", "test"))
        name = f"{r['run']} (target {r['target_far']:g})"
        for rule, v in r["rules"].items():
            far_h = f"{v['far_holdout']:.3f}" if v.get("far_holdout") is not None else "-"
            out.append(
                f"| {name} | {n} | {med} | {rule} | {v['n']} | {v['threshold']:.3f} | <= {v['far_upper_95']:.3f} | "
                f"{far_h} | {v['far_test']:.3f} | {v['recall_test']:.3f} |"
            )
            name = n = med = ""
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders named <dataset>-<px>-s<seed>")
    ap.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = args.results / "calibration.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for run in args.runs:
        name = run.name.rsplit("-", 2)[0]
        row = run_one(run, args.datasets / name, args.target)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["run"] != row["run"]] + [row]
        path.write_text(json.dumps({"rows": rows}, indent=1))
    (args.results / "calibration.md").write_text(table(rows))


if __name__ == "__main__":
    main()
