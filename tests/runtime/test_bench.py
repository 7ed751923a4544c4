"""runtime.bench on the real tiny bundle: documented keys, JSON-serialisable, sane numbers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.bench import bench
from runtime.config import BackendConfig
from runtime.errors import DataError

STAGE_KEYS = {"p50", "p99", "mean", "min", "max"}


def test_bench_chain_keys_and_json(tiny_bundle: Path) -> None:
    r = bench(tiny_bundle, BackendConfig(threads=1), frames=20, warmup=2)
    json.dumps(r)  # JSON-serialisable as is
    assert {
        "model_id",
        "bundle",
        "backend",
        "frames",
        "warmup",
        "input",
        "cold_start_ms",
        "load_ms",
        "first_predict_ms",
        "stages_ms",
        "fps",
        "peak_rss_mb",
        "host",
    } <= set(r)
    assert r["model_id"] == "tiny-rd-s64-seed0" and r["backend"]["kind"] == "onnxruntime"
    assert list(r["stages_ms"]) == ["preprocess", "teacher", "projection", "ocbe", "decoder", "score", "total"]
    for stats in r["stages_ms"].values():
        assert set(stats) == STAGE_KEYS and 0 <= stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"]
    assert r["cold_start_ms"] >= r["load_ms"] > 0
    assert r["fps"] > 0 and r["peak_rss_mb"] > 10
    assert r["input"] == {"frame_hw": [720, 1280], "model_hw": [64, 64]}
    assert r["host"]["cpu_count"] >= 1 and "onnxruntime" in r["host"]


def test_bench_fused_with_image(tiny_bundle: Path, tmp_path: Path) -> None:
    img = tmp_path / "part.png"
    cv2.imwrite(str(img), np.full((100, 80, 3), 90, np.uint8))
    r = bench(tiny_bundle, BackendConfig(fused=True), frames=5, warmup=0, image=img)
    assert list(r["stages_ms"]) == ["preprocess", "fused", "total"]
    assert r["input"]["frame_hw"] == [100, 80]


def test_bench_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read benchmark image"):
        bench(tiny_bundle, BackendConfig(), frames=1, image=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="frames must be >= 1"):
        bench(tiny_bundle, BackendConfig(), frames=0)
