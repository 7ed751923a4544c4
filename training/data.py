"""Data: MVTec-layout categories and plain folders of good images.

Layout read::

    CATEGORY/train/good/*.png|jpg|...          defect-free training images
    CATEGORY/test/good/*                       defect-free test images
    CATEGORY/test/<defect>/NNN.png             defective test images
    CATEGORY/ground_truth/<defect>/NNN_mask.png  masks (non-zero = defect), same size as the image; optional:
                                               without ground_truth/<defect> the defect type has image labels only

A plain folder of images (no ``train/``) is accepted for training alone. Images of any size, grey or colour; grey
becomes 3 channels. Preprocessing is the bundle's ``PreprocessSpec`` exactly (cv2 decode -> RGB -> cv2.resize
INTER_LINEAR -> /255 -> (x - mean) / std), so the runtime sees identical tensors.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from training.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Sample:
    """One image: its path, its defect type (``good`` for defect-free) and its mask path, if any."""

    path: Path
    defect: str = "good"
    mask: Path | None = None

    @property
    def label(self) -> int:
        return 0 if self.defect == "good" else 1


@dataclass(frozen=True)
class Splits:
    """Train / validation (both defect-free, from train/good) and test samples.

    ``unused``: the train/good images ``max_images`` left out. Neither training nor selection sees them, so they are
    defect-free images the threshold can be calibrated on beside the validation split (:func:`calibration_samples`).
    """

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    root: Path
    unused: list[Sample] = field(default_factory=list)


def list_images(folder: Path, strict: bool = True) -> list[Path]:
    """Sorted image files in ``folder``. With ``strict``, a non-image file is an error naming it."""
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        elif strict:
            raise DataError(f"not an image file (expected one of {sorted(IMAGE_SUFFIXES)}): {p}")
    if not out:
        raise DataError(f"no images in {folder}")
    return out


def read_image(path: Path) -> np.ndarray:
    """Decode an image as uint8 BGR ``(H, W, 3)``; grey and 16-bit inputs are converted. Raises DataError."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"unreadable image: {path}")
    if img.dtype == np.uint16:
        img = (img / 257).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a mask as bool ``(H, W)``; it must have the image's size ``shape``."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"unreadable mask: {path}")
    if m.shape != shape:
        raise DataError(f"mask {path} is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return m > 0


def preprocess(bgr: np.ndarray, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 BGR ``(H, W, 3)`` -> float32 ``(3, size_h, size_w)``, normalised. Mirrors ``runtime.preprocess``."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` -> bool ``size`` with nearest-neighbour resizing."""
    return cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0


def _mask_for(root: Path, defect: str, img: Path) -> Path | None:
    """The mask of a defective test image; ``None`` when the category has no ``ground_truth/<defect>`` folder
    (image labels only: image metrics are computed, pixel metrics reported as n/a)."""
    gt = root / "ground_truth" / defect
    if not gt.is_dir():
        return None
    for cand in (gt / f"{img.stem}_mask.png", gt / f"{img.stem}.png", gt / f"{img.stem}_mask{img.suffix}"):
        if cand.is_file():
            return cand
    raise DataError(f"mask missing for {img}: expected {gt / (img.stem + '_mask.png')}")


def split_train_val(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split of good images into train / validation (at least one of each when possible)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(samples) * val_fraction)
    if val_fraction > 0 and len(samples) >= 2:
        n_val = min(max(n_val, 1), len(samples) - 1)
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def evenly(n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices into a list of ``n``, spread evenly from the first to the last (ascending)."""
    k = min(k, n)
    if k <= 0:
        return []
    return [int(i) for i in np.linspace(0, n - 1, k).round()]


#: Images share one aspect when the 10th and 90th percentiles of their height / width lie within this factor of
#: the median (kolektorsdd: within 1%; magnetic_tile's crops spread from 0.6 to 1.7 and stay square).
ASPECT_TOLERANCE = 1.1


def measure_aspect(paths: list[Path], limit: int = 32) -> float | None:
    """The median height / width of up to ``limit`` of ``paths`` (chosen evenly), or ``None`` when they do not share
    one aspect (see :data:`ASPECT_TOLERANCE`) or there are none."""
    if not paths:
        return None
    ratios = []
    for i in evenly(len(paths), limit):
        try:
            h, w = read_image(paths[i]).shape[:2]
        except DataError:
            continue  # unreadable: training skips and counts it
        ratios.append(h / w)
    if not ratios:
        return None
    med = float(np.median(ratios))
    lo, hi = np.percentile(ratios, [10, 90])
    return med if med / ASPECT_TOLERANCE <= lo and hi <= med * ASPECT_TOLERANCE else None


def input_shape(side: int, aspect: float) -> tuple[int, int]:
    """``(height, width)``, multiples of 32, of about ``side^2`` pixels at ``height / width = aspect``: each side
    rounded to the nearest multiple of 32 (at least 32). ``input_shape(128, 2.52) == (192, 96)``."""

    def r32(v: float) -> int:
        return max(32, int(round(v / 32.0)) * 32)

    root = float(np.sqrt(aspect))
    return r32(side * root), r32(side / root)


def resolve_hw(side: int, aspect: str | float, paths: list[Path]) -> tuple[tuple[int, int], str]:
    """The input ``(height, width)`` for ``side`` and ``aspect`` (``auto``: :func:`measure_aspect` of ``paths``;
    ``square``; or a height / width number), and the reason, for the log."""
    if aspect == "square":
        return (side, side), "aspect square"
    if aspect == "auto":
        found = measure_aspect(paths)
        if found is None:
            return (side, side), "the training images do not share one aspect: square"
        return input_shape(side, found), f"the training images' height / width {found:.2f}"
    return input_shape(side, float(aspect)), f"aspect {float(aspect):g}"


def discover(
    root: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    need_test: bool = False,
    max_images: int | None = None,
) -> Splits:
    """Find the samples of an MVTec-layout category, or of a plain folder of good images.

    Args:
        root: category folder (with ``train/good``) or a folder of good images.
        val_fraction: share of the good training images kept aside for model selection and thresholds.
        seed: makes the split deterministic.
        need_test: require a ``test/`` folder (evaluation).
        max_images: keep at most this many good training images, chosen evenly from the sorted list.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    train_dir = root / "train" / "good"
    if train_dir.is_dir():
        good = [Sample(p) for p in list_images(train_dir, strict=True)]
    elif (root / "train").exists():
        raise DataError(f"{root / 'train'} has no 'good' folder (MVTec layout: train/good/*.png)")
    elif need_test:
        raise DataError(f"{root} is not an MVTec-layout category: missing train/good and test/")
    else:
        good = [Sample(p) for p in list_images(root, strict=True)]
    unused: list[Sample] = []
    if max_images is not None and len(good) > max_images:
        keep = evenly(len(good), max_images)
        kept = set(keep)
        unused = [s for i, s in enumerate(good) if i not in kept]
        good = [good[i] for i in keep]
    train, val = split_train_val(good, val_fraction, seed)
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            for p in list_images(sub, strict=True):
                mask = None if sub.name == "good" else _mask_for(root, sub.name, p)
                test.append(Sample(p, sub.name, mask))
        if not test:
            raise DataError(f"no test images under {test_dir}")
    elif need_test:
        raise DataError(f"no test folder: {test_dir}")
    return Splits(train, val, test, root, unused)


def has_masks(samples: list[Sample]) -> bool:
    return any(s.mask is not None for s in samples)


class ImageDataset:
    """A torch-style dataset (``__len__``/``__getitem__``) returning float32 CHW arrays.

    Training images that cannot be decoded are skipped with a warning and counted (``skipped``) instead of stopping
    a long run; evaluation passes ``skip_unreadable=False`` so a broken test image is an error naming its path.
    """

    def __init__(
        self,
        samples: list[Sample],
        size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        skip_unreadable: bool = True,
        with_masks: bool = False,
    ) -> None:
        self.size, self.mean, self.std, self.with_masks = size, mean, std, with_masks
        self.samples = []
        self.skipped: list[Path] = []
        for s in samples:
            if skip_unreadable and cv2.imread(str(s.path), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
                log.warning("skipping unreadable training image: %s", s.path)
                self.skipped.append(s.path)
                continue
            self.samples.append(s)
        if skip_unreadable and self.skipped:
            log.warning("skipped %d unreadable image(s) of %d", len(self.skipped), len(samples))
        if not self.samples:
            raise DataError("no readable images left (all were skipped)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | int]:
        s = self.samples[i]
        bgr = read_image(s.path)
        item: dict[str, np.ndarray | int] = {"image": preprocess(bgr, self.size, self.mean, self.std), "label": s.label}
        if self.with_masks:
            if s.mask is not None:
                mask = resize_mask(read_mask(s.mask, bgr.shape[:2]), self.size)
            else:
                mask = np.zeros(self.size, bool)
            item["mask"] = mask
        return item


_T = TypeVar("_T")

#: At most this many defect-free images set the threshold: 299 good images without an alarm are what it takes to
#: confirm a 1% false-alarm rate at 95% confidence (``ln 0.05 / ln 0.99``); more only costs export time.
CALIB_MAX_IMAGES = 300


def calibration_samples(val: list[_T], unused: list[_T], limit: int = CALIB_MAX_IMAGES) -> list[_T]:
    """The threshold's defect-free images: every validation image, then the images ``max_images`` left out (chosen
    evenly) up to ``limit`` in all.

    Why both: 20 validation images see the top 5% of the good scores at best, and good-image scores are
    heavy-tailed. On the shared sets at 128 px the true 99th percentile of unseen good images was 1.8-2.5x the
    validation maximum, so a threshold from the validation split alone gave 9-15% false alarms on unseen good
    images for a 1% target (``benchmarks/results/calibration.md``).
    """
    room = max(limit - len(val), 0)
    if len(unused) > room:
        unused = [unused[i] for i in evenly(len(unused), room)]
    return [*val, *unused]
