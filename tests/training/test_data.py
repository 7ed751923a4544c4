"""Data reading: MVTec layout, plain folders, the validation split and every bad-input case."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data import ImageDataset, discover, preprocess, read_image
from training.demo_data import make_demo_data
from training.errors import DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture()
def category(tmp_path: Path) -> Path:
    return make_demo_data(tmp_path, n_train=10, n_test_good=2, n_test_defect=1, size=32)


def test_mvtec_layout_is_read_with_masks_and_a_deterministic_split(category: Path) -> None:
    s1 = discover(category, val_fraction=0.2, seed=3)
    s2 = discover(category, val_fraction=0.2, seed=3)
    s3 = discover(category, val_fraction=0.2, seed=4)
    assert [x.path for x in s1.val] == [x.path for x in s2.val]
    assert len(s1.val) == 2 and len(s1.train) == 8
    assert {x.path for x in s1.val} != {x.path for x in s3.val} or len(s1.val) == 0
    assert not {x.path for x in s1.val} & {x.path for x in s1.train}
    defects = {x.defect for x in s1.test}
    assert defects == {"good", "scratch", "spot", "crack", "missing"}
    assert all((x.mask is None) == (x.defect == "good") for x in s1.test)


def test_plain_folder_of_good_images_trains(tmp_path: Path, category: Path) -> None:
    folder = tmp_path / "goods"
    shutil.copytree(category / "train" / "good", folder)
    s = discover(folder, val_fraction=0.1)
    assert len(s.train) + len(s.val) == 10 and s.test == []
    with pytest.raises(DataError, match="MVTec"):
        discover(folder, need_test=True)


def test_grey_and_16bit_images_become_3_channel_uint8(tmp_path: Path) -> None:
    grey = tmp_path / "g.png"
    cv2.imwrite(str(grey), np.full((20, 30), 77, np.uint8))
    deep = tmp_path / "d.png"
    cv2.imwrite(str(deep), np.full((20, 30), 257 * 200, np.uint16))
    a, b = read_image(grey), read_image(deep)
    assert a.shape == b.shape == (20, 30, 3) and a.dtype == b.dtype == np.uint8
    assert int(a[0, 0, 0]) == 77 and int(b[0, 0, 0]) == 200
    x = preprocess(a, (32, 32), MEAN, STD)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert np.allclose(x, (77 / 255 - 0.5) / 0.5, atol=1e-6)


def test_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found: .*nope"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in .*empty"):
        discover(tmp_path / "empty")


def test_non_image_file_is_named(category: Path) -> None:
    bad = category / "train" / "good" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        discover(category)


def test_missing_mask_and_mask_of_another_size_are_named(category: Path) -> None:
    mask = category / "ground_truth" / "spot" / "000_mask.png"
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    splits = discover(category)
    spot = [s for s in splits.test if s.defect == "spot"]
    ds = ImageDataset(spot, (32, 32), MEAN, STD, skip_unreadable=False, with_masks=True)
    with pytest.raises(DataError, match="000_mask.png is 10x10 but its image is 32x32"):
        ds[0]
    mask.unlink()
    with pytest.raises(DataError, match="mask missing for .*spot/000.png"):
        discover(category)


def test_unreadable_training_image_is_skipped_and_counted(category: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = category / "train" / "good" / "005.png"
    broken.write_bytes(b"this is not a png")
    splits = discover(category, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        ds = ImageDataset(splits.train, (32, 32), MEAN, STD, skip_unreadable=True)
    assert len(ds) == 9 and ds.skipped == [broken]
    assert "005.png" in caplog.text and "skipped 1" in caplog.text
    # at evaluation time the same image is an error naming it
    ds_eval = ImageDataset(splits.train, (32, 32), MEAN, STD, skip_unreadable=False)
    with pytest.raises(DataError, match="unreadable image: .*005.png"):
        ds_eval[[s.path for s in ds_eval.samples].index(broken)]


def test_demo_data_is_deterministic_with_exact_masks(tmp_path: Path) -> None:
    a = make_demo_data(tmp_path / "a", n_train=2, n_test_good=1, n_test_defect=2, size=48, seed=7)
    b = make_demo_data(tmp_path / "b", n_train=2, n_test_good=1, n_test_defect=2, size=48, seed=7)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for d in ("scratch", "spot", "crack", "missing"):
        m = cv2.imread(str(a / "ground_truth" / d / "000_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert m.shape == (48, 48) and set(np.unique(m)) <= {0, 255} and (m > 0).any(), d


def test_max_images_leaves_the_rest_for_threshold_calibration(category: Path) -> None:
    from training.data import calibration_samples

    full = discover(category, val_fraction=0.2, seed=0)
    s = discover(category, val_fraction=0.2, seed=0, max_images=6)
    kept = {x.path for x in s.train + s.val}
    assert len(kept) == 6 and full.unused == []
    assert {x.path for x in s.unused} == {x.path for x in full.train + full.val} - kept  # the other 4, no overlap
    good = calibration_samples(s.val, s.unused)
    assert good[: len(s.val)] == s.val and good[len(s.val) :] == s.unused  # validation first, then every unused
    capped = calibration_samples(s.val, s.unused, limit=len(s.val) + 2)
    assert capped[len(s.val) :] == [s.unused[0], s.unused[-1]]  # evenly chosen: both ends
    assert calibration_samples(s.val, s.unused, limit=1) == s.val  # the validation images are always kept


def test_evenly_spreads_distinct_indices_from_first_to_last() -> None:
    from training.data import evenly

    assert evenly(10, 3) == [0, 4, 9]  # numpy rounds 4.5 to even
    assert evenly(5, 9) == [0, 1, 2, 3, 4] and evenly(5, 0) == [] and evenly(0, 3) == []
    got = evenly(281, 280)
    assert len(set(got)) == 280 and got == sorted(got) and got[0] == 0 and got[-1] == 280


def test_measure_aspect_and_input_shape(tmp_path: Path) -> None:
    from training.data import input_shape, measure_aspect

    tall = []
    for i, (h, w) in enumerate([(512, 203), (512, 204), (510, 203), (512, 202)]):
        tall.append(tmp_path / f"t{i}.png")
        cv2.imwrite(str(tall[-1]), np.zeros((h, w), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    got = measure_aspect([*tall, tmp_path / "broken.png"])  # the unreadable file is skipped
    assert got is not None and abs(got - 2.52) < 0.01
    mixed = [*tall, tmp_path / "wide.png", tmp_path / "square.png"]
    cv2.imwrite(str(mixed[-2]), np.zeros((100, 200), np.uint8))
    cv2.imwrite(str(mixed[-1]), np.zeros((100, 100), np.uint8))
    assert measure_aspect(mixed) is None and measure_aspect([]) is None
    assert input_shape(128, 2.52) == (192, 96) and input_shape(256, 2.52) == (416, 160)
    assert input_shape(256, 1.0) == (256, 256) and input_shape(64, 0.1) == (32, 192)
