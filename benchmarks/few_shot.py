"""Few-shot benchmark (seed 001): a k-shot curve of the few-shot mode against PaDiM-style density on the same K.

For each dataset and each k in ``--ks`` and each draw (seed = draw index): ``training.fewshot.choose_shots`` draws
k good training images (the same draw ``rdedge train --shots k --seed s`` makes), then

- ``fewshot``: :func:`training.fewshot.fit_fewshot` (contrastive fine-tuning, Mahalanobis image score, density map,
  leave-one-out / augmentation threshold), the defaults of ``rdedge train --shots k``;
- ``fewshot-frozen``: the same scoring on the ImageNet teacher without fine-tuning (``steps=0``): what the
  contrastive fine-tuning adds;
- ``padim``: PaDiM-style density (:class:`training.scoring.DensityHead` on the frozen teacher, fitted on the same k
  images and the same augmented views), image score = max of the blurred map.

Every test image is scored (the k training images are never test images); image AUROC, pixel AUROC (masks at the
input shape), and for ``fewshot`` the operating point of its k-image threshold (false-alarm rate on good test
images, recall on defects). ``--full name=BUNDLE`` adds the full-data default (an exported ``rdedge train`` run)
as a reference row. ``--aspect auto`` sizes the input from the train/good images as ``rdedge train`` does.

    nice -n 10 python benchmarks/few_shot.py [--ks 1 2 4 8 16] [--draws 5] [--full kolektorsdd=BUNDLE ...]

Writes benchmarks/results/few_shot.json (every draw), few_shot.md (mean +- std) and few_shot.png (the curve).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("few_shot")
SIZE = 128


def input_hw(root: Path, aspect: str) -> tuple[int, int]:
    """The input shape at ``SIZE`` for ``--aspect``: ``square``, or ``auto`` from the train/good images (the rule
    ``rdedge train --shots K`` applies to its K shots; here to the whole folder, so every draw shares one shape)."""
    from training.data import list_images, resolve_hw

    if aspect == "square":
        return SIZE, SIZE
    return resolve_hw(SIZE, aspect, list_images(root / "train" / "good"))[0]


def test_set(root: Path, hw: tuple[int, int]) -> dict[str, Any]:
    """Preprocessed test images ``(N, 3, H, W)`` (teacher normalisation), labels, masks at ``hw``."""
    from training.backbones import get_spec
    from training.data import discover, preprocess, read_image, read_mask, resize_mask

    spec = get_spec("efficientnet_lite0")
    test = discover(root, need_test=True).test
    xs, masks = [], []
    for s in test:
        img = read_image(s.path)
        xs.append(preprocess(img, hw, spec.mean, spec.std))
        m = read_mask(s.mask, img.shape[:2]) if s.mask is not None else np.zeros(img.shape[:2], bool)
        masks.append(resize_mask(m, hw))
    x = torch.from_numpy(np.stack(xs))
    return {"x": x, "y": np.array([s.label for s in test]), "masks": np.stack(masks), "hw": hw}


@torch.no_grad()
def score_model(model: Any, x: torch.Tensor, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(x), batch):
        a, s = model(x[i : i + batch])
        maps.append(a[:, 0].numpy())
        scores.append(s.numpy())
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


def auroc_pair(y: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    out = {"image_auroc": float(roc_auc_score(y, scores))}
    if masks.any():
        out["pixel_auroc"] = float(roc_auc_score(masks.ravel(), maps.ravel()))
    return out


class PadimModel(torch.nn.Module):
    """Frozen teacher + DensityHead; image score = max of the blurred map (PaDiM-style baseline)."""

    def __init__(self, fs: Any) -> None:
        super().__init__()
        self.fs = fs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fs.trunk(x)
        amap = self.fs.amap(self.fs.density(*f))
        return amap, amap.flatten(1).amax(dim=1)


def rd_draw(name: str, root: Path, k: int, seed: int, steps: int, work: Path, hw: tuple[int, int]) -> dict[str, Any]:
    """Plain RD trained by ``rdedge train``'s own loop on the same K images (student pinned to plain RD, ``steps``
    optimiser steps, the default selection and density head on the 10% of the K kept aside; K = 1 keeps none, so
    the RD paper's scoring), evaluated on the full test set like any run."""
    import shutil

    from training.config import load_train_config
    from training.evaluate import evaluate
    from training.fewshot import choose_shots
    from training.train import fit

    cat = work / f"{name}-k{k}-s{seed}"
    shutil.rmtree(cat, ignore_errors=True)
    good = cat / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i, src in enumerate(choose_shots(root, k, seed)):  # the same draw as the few-shot rows
        (good / f"{i:03d}{src.suffix}").symlink_to(src.resolve())
    overrides = {"data.image_size": SIZE, "data.shape": list(hw), "model.projection": "identity", "optim.steps": steps,
                 "optim.batch_size": min(8, k), "seed": seed}  # fmt: skip
    t0 = time.perf_counter()
    fit(load_train_config(None, overrides), cat / "data", cat / "run", show_progress=False)
    fit_s = time.perf_counter() - t0
    m = evaluate(cat / "run", root, show_progress=False)
    shutil.rmtree(cat, ignore_errors=True)
    row = {"dataset": name, "k": k, "seed": seed, "method": "rd", "fit_s": fit_s, "image_auroc": m["image_auroc"]}
    if m.get("pixel_auroc") is not None:
        row["pixel_auroc"] = m["pixel_auroc"]
    log.info("%s k=%d seed %d: rd %.3f", name, k, seed, row["image_auroc"])
    return row


def one_draw(
    name: str, root: Path, ts: dict[str, Any], k: int, seed: int, negatives: str, steps: int | None
) -> list[dict[str, Any]]:
    from training.fewshot import FewShotConfig, choose_shots, fit_fewshot, load_images01

    paths = choose_shots(root, k, seed)
    imgs = load_images01(paths, ts["hw"])
    rows = []
    y, masks = ts["y"], ts["masks"]
    for method, n_steps in (("fewshot", steps), ("fewshot-frozen", 0)):
        cfg = FewShotConfig(shots=k, image_size=SIZE, shape=ts["hw"], seed=seed, negatives=negatives,
                            **({} if n_steps is None else {"steps": n_steps}))  # fmt: skip
        t0 = time.perf_counter()
        res = fit_fewshot(imgs, cfg)
        fit_s = time.perf_counter() - t0
        scores, maps = score_model(res.model, ts["x"])
        row = {
            "dataset": name,
            "k": k,
            "seed": seed,
            "method": method,
            "fit_s": fit_s,
            **auroc_pair(y, scores, masks, maps),
        }
        ng = scores >= res.threshold
        row["threshold_far"] = float(ng[y == 0].mean())
        row["threshold_recall"] = float(ng[y == 1].mean())
        rows.append(row)
        if method == "fewshot-frozen":  # same frozen trunk and views: PaDiM's image score from the map
            p_scores, p_maps = score_model(PadimModel(res.model), ts["x"])
            rows.append({"dataset": name, "k": k, "seed": seed, "method": "padim", "fit_s": fit_s,
                         **auroc_pair(y, p_scores, masks, p_maps)})  # fmt: skip
    log.info("%s k=%d seed %d: %s", name, k, seed, [(r["method"], round(r["image_auroc"], 3)) for r in rows])
    return rows


def full_row(name: str, bundle: Path, root: Path, ts: dict[str, Any]) -> dict[str, Any]:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.data import discover, read_image

    test = discover(root, need_test=True).test
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2)) as am:
        preds = [am.predict(read_image(s.path)) for s in test]
        size = (am.manifest.input.height, am.manifest.input.width)
    scores = np.array([p.score for p in preds])
    maps = np.stack([p.anomaly_map for p in preds])
    if size != ts["hw"]:
        raise SystemExit(f"--full {bundle}: input {size}, the benchmark's masks are {ts['hw']}")
    return {"dataset": name, "k": "all", "seed": 0, "method": "full-data default (rdedge train)",
            "bundle": str(bundle), **auroc_pair(ts["y"], scores, ts["masks"], maps)}  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = []
    for r in rows:
        key = (r["dataset"], str(r["k"]), r["method"])
        if key not in keys:
            keys.append(key)
    # per dataset: the full-data reference first, then k ascending (a resumed run appends draws out of order)
    keys.sort(key=lambda t: (t[0], -1 if t[1] == "all" else int(t[1])))
    for d, k, m in keys:
        sel = [r for r in rows if (r["dataset"], str(r["k"]), r["method"]) == (d, k, m)]
        row: dict[str, Any] = {"dataset": d, "k": k, "method": m, "draws": len(sel)}
        for key in ("image_auroc", "pixel_auroc", "threshold_far", "threshold_recall", "fit_s"):
            v = [r[key] for r in sel if key in r]
            if v:
                row[key], row[f"{key}_std"] = float(np.mean(v)), float(np.std(v))
        out.append(row)
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for m in ("fewshot", "fewshot-frozen", "padim", "rd"):
            pts = [r for r in summary if r["dataset"] == d and r["method"] == m]
            if pts:
                ks = [int(r["k"]) for r in pts]
                ax.errorbar(ks, [r["image_auroc"] for r in pts], yerr=[r["image_auroc_std"] for r in pts],
                            marker="o", capsize=3, label=f"{m} image")  # fmt: skip
                if "pixel_auroc" in pts[0]:
                    ax.plot(ks, [r["pixel_auroc"] for r in pts], ls="--", marker=".", label=f"{m} pixel")
        full = [r for r in summary if r["dataset"] == d and r["k"] == "all"]
        if full:
            ax.axhline(full[0]["image_auroc"], color="k", lw=0.8, label="full-data default image")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (good training images)")
        ax.set_ylabel("AUROC")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--names", nargs="+", default=["kolektorsdd", "magnetic_tile"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--negatives", choices=["none", "synth"], default="none")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the mode's, 40)")
    ap.add_argument("--full", nargs="*", default=[], metavar="NAME=BUNDLE", help="full-data default bundles")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop starting new draws after this")
    ap.add_argument("--merge", action="store_true", help="keep other datasets' rows of an existing few_shot.json")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep every row of an existing few_shot.json and run only the (dataset, k, draw) not in it yet",
    )
    ap.add_argument(
        "--aspect",
        choices=["square", "auto"],
        default="square",
        help="input shape: square (the rows of before 2026-12-03) or auto (the parts' aspect, as rdedge train)",
    )
    ap.add_argument("--tag", default="", help="results go to few_shot_<tag>.{json,md,png}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a crowded box)")
    ap.add_argument("--rd", action="store_true", help="also train plain RD on the same K images (a row 'rd')")
    ap.add_argument("--rd-steps", type=int, default=200, help="optimiser steps of the 'rd' rows")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rdedge-bench/few_shot"), help="scratch for 'rd' runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    full = dict(s.split("=", 1) for s in args.full)
    rows: list[dict[str, Any]] = []
    stem = f"few_shot{'_' + args.tag if args.tag else ''}"
    previous = args.results / f"{stem}.json"
    if args.merge and previous.is_file():  # other datasets' draws from an earlier invocation
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["dataset"] not in args.names]
    if args.resume and previous.is_file():  # every earlier draw; only the missing ones run
        rows = json.loads(previous.read_text())["rows"]
    done = {(r["dataset"], r["k"], r["seed"]) for r in rows if r.get("k") != "all" and r["method"] != "rd"}
    done_rd = {(r["dataset"], r["k"], r["seed"]) for r in rows if r["method"] == "rd"}
    stopped = False
    for name in args.names:
        root = args.datasets / name
        ts = test_set(root, input_hw(root, args.aspect))
        if name in full:
            rows = [r for r in rows if not (r["dataset"] == name and r.get("k") == "all")]
            rows.append(full_row(name, Path(full[name]), root, ts))
        for seed in range(args.draws):  # draw-major: a time cap still leaves every k with the same draws
            for k in args.ks:
                if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                    stopped = True
                    break
                if (name, k, seed) not in done:
                    rows.extend(one_draw(name, root, ts, k, seed, args.negatives, args.steps))
                if args.rd and (name, k, seed) not in done_rd:
                    rows.append(rd_draw(name, root, k, seed, args.rd_steps, args.work, ts["hw"]))
                write(args, rows, t_start, stopped)  # a killed run keeps every finished draw
            if stopped:
                break
        write(args, rows, t_start, stopped)
    write(args, rows, t_start, stopped)
    return 0


def write(args: argparse.Namespace, rows: list[dict[str, Any]], t_start: float, stopped: bool) -> None:
    summary = summarise(rows)
    out = {
        "benchmark": "few_shot (seed 001)",
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "conditions": {
            "image_size": SIZE,
            "aspect": args.aspect,
            "backbone": "efficientnet_lite0 (ImageNet, PyPI wheel)",
            "ks": args.ks,
            "draws_requested": args.draws,
            "negatives": args.negatives,
            "steps": args.steps if args.steps is not None else "default (40)",
            "stopped_by_time_cap": stopped,
            "cpu_threads": os.cpu_count(),
            "note": "2-core CPU shared with other jobs; fit_s indicative only; test images scored: all",
            "wall_s": time.time() - t_start,
        },
        "summary": summary,
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"few_shot{'_' + args.tag if args.tag else ''}"
    (args.results / f"{stem}.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Few-shot benchmark (seed 001)",
        "",
        f"{out['date']}; `benchmarks/few_shot.py`, {SIZE} px, lite0; draws per k as listed (requested "
        f"{args.draws}{', stopped by the time cap' if stopped else ''}); mean +- std over draws. Raw: {stem}.json.",
        "",
        "| dataset | k | method | draws | image AUROC | pixel AUROC | FAR @ k-image thr | recall @ k-image thr |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.3f} +- {r[key + '_std']:.3f}" if key in r and f"{key}_std" in r else "-"

    for r in summary:
        lines.append(
            f"| {r['dataset']} | {r['k']} | {r['method']} | {r['draws']} | {cell(r, 'image_auroc')} | "
            f"{cell(r, 'pixel_auroc')} | {cell(r, 'threshold_far')} | {cell(r, 'threshold_recall')} |"
        )
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if summary:
        plot(summary, args.results / f"{stem}.png")


if __name__ == "__main__":
    raise SystemExit(main())
