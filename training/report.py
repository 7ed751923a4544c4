"""Evaluation report: ROC curve, score histogram, heatmap overlays and an index.html that shows them."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.data import read_image
from training.evaluate import Predictions
from training.metrics import roc_curve


def _overlay(bgr: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, size: tuple[int, int]) -> np.ndarray:
    img = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(img, 0.55, heat, 0.45, 0)


def _input_text(metrics: dict[str, Any]) -> str:
    """``256 px`` for a square input, ``416 x 160 px (height x width)`` for another shape."""
    hw = metrics.get("input_hw") or [metrics.get("image_size")] * 2
    return f"{hw[0]} px" if hw[0] == hw[1] else f"{hw[0]} x {hw[1]} px (height x width)"


def write_report(
    out: Path,
    metrics: dict[str, Any],
    pred: Predictions,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: tuple[int, int],
    n_show: int = 6,
) -> Path:
    """Write ``roc.png``, ``histogram.png``, ``overlays/*.png`` and ``index.html`` into ``out``; returns the index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.label for s in pred.samples])
    thr = metrics.get("validation_threshold", {}).get("value")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fpr, tpr, _ = roc_curve(pred.scores, labels)
    ax.plot(fpr, tpr, label=f"image AUROC {metrics['image_auroc']:.3f}")
    if pred.maps is not None and pred.masks is not None:
        idx = np.random.default_rng(0).choice(pred.maps.size, min(pred.maps.size, 2_000_000), replace=False)
        pf, pt, _ = roc_curve(pred.maps.ravel()[idx], pred.masks.ravel()[idx])
        ax.plot(pf, pt, label=f"pixel AUROC {metrics.get('pixel_auroc', float('nan')):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test set)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(pred.scores.min(), pred.scores.max(), 40)
    ax.hist(pred.scores[labels == 0], bins=bins, alpha=0.6, label="good")
    ax.hist(pred.scores[labels == 1], bins=bins, alpha=0.6, label="defect")
    if thr is not None:
        ax.axvline(thr, color="k", ls="--", label=f"validation threshold {thr:.3f}")
    ax.set(xlabel="image score (max of anomaly map)", ylabel="images", title="Score histogram (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "histogram.png", dpi=110)
    plt.close(fig)

    figures: list[tuple[str, list[tuple[str, str]]]] = []
    if pred.maps is not None:
        # one colour scale for every overlay: the median map value (the typical defect-free level) is blue, the
        # 99.9th percentile red, so overlays compare with each other
        sample = pred.maps.ravel()[:: max(1, pred.maps.size // 2_000_000)]
        vmin, vmax = float(np.quantile(sample, 0.5)), float(np.quantile(sample, 0.999))
        (out / "overlays").mkdir(exist_ok=True)
        groups = {
            "Worst-scored good images (highest scores: false-alarm risks)": [
                i for i in np.argsort(-pred.scores) if labels[i] == 0
            ][:n_show],
            "Best-scored defect images (highest scores)": [i for i in np.argsort(-pred.scores) if labels[i] == 1][
                :n_show
            ],
            "Lowest-scored defect images (misses first)": [i for i in np.argsort(pred.scores) if labels[i] == 1][
                :n_show
            ],
        }
        for title, idxs in groups.items():
            cells = []
            for i in idxs:
                s = pred.samples[i]
                name = f"{s.defect}_{s.path.stem}.png"
                panel = _overlay(read_image(s.path), pred.maps[i], vmin, vmax, size)
                if pred.masks is not None and pred.masks[i].any():
                    contours, _ = cv2.findContours(
                        pred.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
                    )
                    cv2.drawContours(panel, contours, -1, (255, 255, 255), 1)
                cv2.imwrite(str(out / "overlays" / name), panel)
                cells.append((f"overlays/{name}", f"{s.defect}/{s.path.name} score {pred.scores[i]:.4f}"))
            figures.append((title, cells))

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"  # image labels only: no pixel metrics
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    keys = ["image_auroc", "image_f1_max", "pixel_auroc", "aupro"]
    rows = [("overall", metrics)] + sorted(metrics["per_defect"].items())
    table = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{fmt(m.get(k, '-'))}</td>" for k in keys) + "</tr>"
        for n, m in rows
    )
    op = metrics.get("at_validation_threshold")
    vt = metrics.get("validation_threshold", {})
    bound = vt.get("stats", {}).get("val_far_upper_95")
    op_html = (
        f"<p>At the threshold set from defect-free images only ({fmt(op['threshold'])}, "
        f"{html.escape(str(vt.get('source', 'validation split')))}): "
        f"false-alarm rate {fmt(op['false_alarm_rate'])}, recall {fmt(op['recall'])}, "
        f"precision {fmt(op['precision'])} on the test set."
        + (
            f" Those defect-free images confirm a false-alarm rate of at most {100 * bound:.1f}% (95% confidence)."
            if bound is not None
            else ""
        )
        + "</p>"
        if op
        else ""
    )
    gallery = "".join(
        f"<h3>{html.escape(t)}</h3><div class='g'>"
        + "".join(f"<figure><img src='{src}'><figcaption>{html.escape(c)}</figcaption></figure>" for src, c in cells)
        + "</div>"
        for t, cells in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rdedge evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
.g{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0}}figure img{{width:200px}}
figcaption{{font-size:12px}}</style></head><body>
<h1>rdedge evaluation</h1>
<p>run <code>{html.escape(str(metrics.get("run")))}</code>, data <code>{html.escape(str(metrics.get("data")))}</code>,
backbone {html.escape(str(metrics.get("backbone")))}, {_input_text(metrics)}, epoch {metrics.get("epoch")},
{metrics["n_images"]} test images ({metrics["n_defective"]} defective).</p>
<table><tr><th></th>{"".join(f"<th>{k}</th>" for k in keys)}</tr>{table}</table>
{op_html}
<p><img src="roc.png"> <img src="histogram.png"></p>
{gallery}
</body></html>"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
