"""runtime.bench on the real tiny bundle: documented keys, JSON-serialisable, sane numbers."""

from __future__ import annotations

import json
import shutil
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


def test_compare_lays_backends_and_bundles_side_by_side(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.bench import compare, comparison_table
    from runtime.cli import main

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    rows = compare([tiny_bundle, other], frames=3, warmup=0)
    variants = [(r["bundle"], r["variant"]) for r in rows]
    assert [v for b, v in variants[:3] if b == str(tiny_bundle)] == [
        "onnxruntime cpu",
        "onnxruntime cpu fused",
        "onnxruntime cpu fused spinning",
    ]
    assert len(rows) == 2 * len([v for v in variants if v[0] == str(tiny_bundle)])
    for r in rows:
        assert "result" in r, r.get("error")
        assert r["precision"] == "fp32" and r["result"]["peak_rss_mb"] > 10
    table = comparison_table(rows).splitlines()
    assert table[0].startswith("| bundle | precision | backend | total p50 / p99 ms")
    assert len(table) == 2 + len(rows) and "| fp32 | onnxruntime cpu fused |" in table[3]
    # a row that cannot run says why instead of disappearing
    broken = {k: v for k, v in rows[0].items() if k != "result"} | {"error": "boom"}
    assert "| onnxruntime cpu | not run: boom |" in comparison_table([broken])
    assert main(["bench", "--bundle", str(tiny_bundle), "--compare", "--frames", "2", "--warmup", "0",
                 "--json-out", str(tmp_path / "rows.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| tiny-rd-s64-seed0 | fp32 | onnxruntime cpu |" in out
    assert json.loads((tmp_path / "rows.json").read_text())[0]["variant"] == "onnxruntime cpu"
