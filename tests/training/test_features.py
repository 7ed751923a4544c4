"""The per-run feature cache: memmap files past the limit hold exactly what the RAM path holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.backbones import build_teacher
from training.features import feature_set, load_images, teacher_features


def test_memmap_path_equals_ram_path(tmp_path: Path) -> None:
    teacher = build_teacher("efficientnet_lite0", pretrained=False)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dev = torch.device("cpu")
    ram = teacher_features(teacher, x, dev, batch_size=2, cache_dir=tmp_path / "cache", limit_mb=1e3)
    assert not (tmp_path / "cache").exists(), "under the limit nothing is written"
    disk = teacher_features(teacher, x, dev, batch_size=2, cache_dir=tmp_path / "cache", limit_mb=1e-3)
    files = sorted((tmp_path / "cache").glob("f*.npy"))
    assert [f.name for f in files] == ["f1.npy", "f2.npy", "f3.npy"]
    with torch.no_grad():
        direct = teacher(x)
    for k, (a, b, f) in enumerate(zip(ram, disk, direct, strict=True)):
        assert a.shape == b.shape == f.shape and a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), f"scale {k + 1}"
        torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-5 * float(f.abs().max()))  # batches of 2 == one of 5
        np.testing.assert_array_equal(np.load(files[k], mmap_mode="r"), b.numpy())


def test_feature_set_batches_and_images(tmp_path: Path, demo_category: Path) -> None:
    teacher = build_teacher("efficientnet_lite0", pretrained=False)
    from training.data import discover

    samples = discover(demo_category).train[:3]
    imgs, masks = load_images(samples, (64, 64), (0.5,) * 3, (0.5,) * 3)
    assert imgs.shape == (3, 3, 64, 64) and masks is None
    fs = feature_set(teacher, imgs, torch.device("cpu"), cache_dir=tmp_path, limit_mb=1e-3)
    assert len(fs) == 3 and [tuple(f.shape[1:]) for f in fs.feats] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]
    x, feats = fs.batch(torch.tensor([2, 0]))
    assert torch.equal(x[1], torch.from_numpy(imgs[0])) and torch.equal(feats[0][0], fs.feats[0][2])


def test_load_readable_skips_and_counts_unreadable_images(tmp_path: Path, demo_category: Path) -> None:
    import shutil

    import pytest

    from training.data import Sample
    from training.errors import DataError
    from training.features import load_readable

    good = sorted((demo_category / "train" / "good").glob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    shutil.copy(good[0], tmp_path / "ok.png")
    samples = [Sample(good[0]), Sample(broken), Sample(good[1])]
    x, kept, skipped = load_readable(samples, (32, 32), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 32, 32) and [s.path for s in kept] == [good[0], good[1]] and skipped == [broken]
    with pytest.raises(DataError, match="no readable images"):
        load_readable([Sample(broken)], (32, 32), (0.5,) * 3, (0.5,) * 3)
