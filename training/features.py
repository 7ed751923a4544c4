"""Decode once, run the frozen teacher once: the per-run cache training reads every step.

The teacher is frozen and sees no augmentation, so its features of a training image are the same every epoch;
computing them once turns a training step into OCBE + decoder only. Arrays live in RAM, or in ``np.memmap`` files
in the run folder past ``limit_mb`` (a wide_resnet50_2 teacher at 256 px needs 7.3 MB an image).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from training.data import Sample, preprocess, read_image, read_mask, resize_mask
from training.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Preprocessed images ``(N, 3, H, W)`` and their teacher features, per scale ``(N, C_k, h_k, w_k)``."""

    images: Tensor
    feats: list[Tensor]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.images[idx], [f[idx] for f in self.feats]


def load_images(
    samples: list[Sample],
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    with_masks: bool = False,
    show_progress: bool = False,
    desc: str = "decoding",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode and preprocess every sample once: ``(N, 3, H, W)`` float32 and optional masks ``(N, H, W)`` bool."""
    from tqdm import tqdm

    out = np.empty((len(samples), 3, *size), np.float32)
    masks = np.zeros((len(samples), *size), bool) if with_masks else None
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", disable=not show_progress, leave=False)):
        bgr = read_image(s.path)
        out[i] = preprocess(bgr, size, mean, std)
        if masks is not None and s.mask is not None:
            masks[i] = resize_mask(read_mask(s.mask, bgr.shape[:2]), size)
    return out, masks


def load_readable(
    samples: list[Sample],
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    show_progress: bool = False,
    desc: str = "decoding",
) -> tuple[np.ndarray, list[Sample], list[Path]]:
    """Training's decode: each image read once; an unreadable one is skipped with a warning and counted.

    Returns:
        ``(images (N_kept, 3, H, W) float32, kept samples, skipped paths)``; DataError if nothing is readable.
    """
    from tqdm import tqdm

    arrays, kept, skipped = [], [], []
    for s in tqdm(samples, desc=desc, unit="img", disable=not show_progress, leave=False):
        try:
            arrays.append(preprocess(read_image(s.path), size, mean, std))
        except DataError:
            log.warning("skipping unreadable training image: %s", s.path)
            skipped.append(s.path)
            continue
        kept.append(s)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(samples))
    if not kept:
        raise DataError("no readable images left (all were skipped)")
    return np.stack(arrays), kept, skipped


@torch.no_grad()
def teacher_features(
    teacher: nn.Module,
    images: Tensor,
    device: torch.device,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    limit_mb: float = 2048.0,
    show_progress: bool = False,
) -> list[Tensor]:
    """The frozen teacher's ``[f1, f2, f3]`` for every image, on the CPU (RAM, or memmap files past ``limit_mb``)."""
    from tqdm import tqdm

    teacher.eval()
    n = images.shape[0]
    probe = teacher(images[:1].to(device))
    shapes = [(n, *f.shape[1:]) for f in probe]
    total_mb = sum(int(np.prod(s)) for s in shapes) * 4 / 2**20
    use_disk = cache_dir is not None and total_mb > limit_mb
    outs: list[np.ndarray] = []
    for k, shape in enumerate(shapes):
        if use_disk:
            assert cache_dir is not None
            cache_dir.mkdir(parents=True, exist_ok=True)
            outs.append(np.lib.format.open_memmap(cache_dir / f"f{k + 1}.npy", "w+", np.float32, shape))
        else:
            outs.append(np.empty(shape, np.float32))
    log.info(
        "teacher features for %d images: %.0f MB in %s", n, total_mb, f"memmap under {cache_dir}" if use_disk else "RAM"
    )
    bar = tqdm(range(0, n, batch_size), desc="teacher features", unit="batch", disable=not show_progress, leave=False)
    for i in bar:
        feats = teacher(images[i : i + batch_size].to(device))
        for k, f in enumerate(feats):
            outs[k][i : i + f.shape[0]] = f.float().cpu().numpy()
    return [torch.from_numpy(o) for o in outs]


def feature_set(
    teacher: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16, **kw: object
) -> FeatureSet:
    """:class:`FeatureSet` of preprocessed images (see :func:`teacher_features` for ``kw``)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return FeatureSet(x, teacher_features(teacher, x, device, batch_size, **kw))  # type: ignore[arg-type]
