"""Figures of the few-labels mode (seed 002): t-SNE of the label-tune features and a saliency view.

Reads the per-dataset cache that ``benchmarks/few_labels.py`` writes (``--work``; the test images' label-tune
features and preprocessed images), then for each dataset:

- ``few_labels_tsne_<name>.png``: t-SNE (sklearn, perplexity 30, seed 0) of the teacher embeddings (the features
  without the anomaly-map statistics), coloured by defect type;
- ``few_labels_saliency_<name>.png``: for a few defective test images not in the labelled draw: the image, the
  bundle's anomaly map, and Grad-CAM (on the stride-16 trunk output) of the supervised CNN fitted on the 10% draw
  (seed 0) of ``few_labels.py``.

    nice -n 10 python benchmarks/few_labels_figures.py --runs magnetic_tile=RUN1 kolektorsdd=RUN2
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
log = logging.getLogger("few_labels_figures")


def tsne_plot(name: str, ds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from few_labels import STAT_DIMS
    from sklearn.manifold import TSNE

    emb = ds["features"][:, : ds["features"].shape[1] - STAT_DIMS]
    xy = TSNE(perplexity=min(30, len(emb) - 1), random_state=0, init="pca").fit_transform(emb)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for t in sorted(set(ds["types"]), key=lambda v: (v != "good", v)):
        sel = np.array([x == t for x in ds["types"]])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, label=f"{t} ({sel.sum()})", alpha=0.8)
    ax.set_title(f"{name}: t-SNE of the teacher embedding (label-tune features)")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grad_cam(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM of the defect logit on the trunk's stride-16 map: ``(N, H, W)`` in [0, 1]."""
    import torch.nn.functional as F

    cams = []
    for i in range(len(x)):
        f3 = model.trunk(x[i : i + 1])[2]
        f3.retain_grad()
        logit = model.head(f3.mean(dim=(2, 3)))[0, 1]
        model.zero_grad()
        logit.backward()
        w = f3.grad.mean(dim=(2, 3), keepdim=True)  # type: ignore[union-attr]
        cam = F.relu((w * f3).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0].detach().numpy()
        cams.append(cam / max(float(cam.max()), 1e-12))
    return np.stack(cams)


def saliency_plot(name: str, ds: dict, run: Path, work: Path, path: Path, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from few_labels import draw

    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.data import read_image
    from training.supervised import SupervisedOptions, fit_supervised

    lab, rest = draw(ds["y"], 0.10, 0)
    cnn = fit_supervised(ds["images"][lab], ds["y"][lab], SupervisedOptions(epochs=20, seed=0))
    defects = [i for i in rest if ds["y"][i] == 1]
    pick = [defects[j] for j in np.linspace(0, len(defects) - 1, n).round().astype(int)]
    cams = grad_cam(cnn, torch.from_numpy(ds["images"][pick]))
    with AnomalyModel(work / name / "bundle", BackendConfig(kind="onnxruntime", threads=1)) as am:
        maps = [am.predict(read_image(ds["paths"][i])).anomaly_map for i in pick]
    fig, axes = plt.subplots(3, n, figsize=(2.4 * n, 7.2), squeeze=False)
    for c, i in enumerate(pick):
        img = ds["images"][i].transpose(1, 2, 0) * 0.5 + 0.5  # lite0 normalisation (x - 0.5) / 0.5
        for r, (title, over) in enumerate((("image", None), ("anomaly map", maps[c]), ("Grad-CAM (CNN)", cams[c]))):
            ax = axes[r][c]
            ax.imshow(np.clip(img, 0, 1))
            if over is not None:
                ax.imshow(over, cmap="jet", alpha=0.45)
            ax.set_title(f"{title}\n{ds['types'][i]}" if r == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{name}: defective test images outside the 10% labelled draw", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rdedge-bench/few_labels"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from few_labels import describe_dataset

    for spec in args.runs:
        name, run = spec.split("=", 1)
        ds = describe_dataset(name, args.datasets / name, Path(run), args.work)
        tsne_plot(name, ds, args.results / f"few_labels_tsne_{name}.png")
        saliency_plot(name, ds, Path(run), args.work, args.results / f"few_labels_saliency_{name}.png")
        log.info("%s: figures written", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
