"""INT8 bundles: ORT static QDQ parts, the parity record in the manifest, and the runtime's refusal of a failed one.

The pass/fail outcome is forced through ``ExportOptions.int8_score_frac`` (the rule's bound as a fraction of the
threshold): a bound no quantised chain can meet (1e-9) must fail, a loose one (0.99) must pass, on the same real
tiny run, so both paths run whatever the quantiser's error on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.pipeline import ExportOptions, export_bundle
from runtime.bundle import load_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError


def _export(run: Path, out: Path, frac: float) -> Path:
    export_bundle(ExportOptions(run=run, out=out, precision="int8", int8_calib_images=8, int8_score_frac=frac))
    return out


def test_int8_parts_are_qdq_and_parity_is_recorded(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_run
    bundle = _export(run, tmp_path / "loose", 0.99)
    m = load_manifest(bundle)
    q = m.int8
    assert q is not None and q.parts and "score" in q.fp32_parts and "score" not in q.parts
    assert q.max_frac_of_threshold == pytest.approx(q.score_max_abs_diff / abs(q.threshold), rel=1e-6)
    assert q.score_p99_abs_diff <= q.score_max_abs_diff and q.tolerance_frac_of_threshold == 0.99
    assert q.accepted == (q.max_frac_of_threshold <= 0.99) and q.n_images >= 1
    for part in q.parts:  # really quantised: QDQ nodes in every INT8 part's graph
        spec = next(p for p in m.parts if p.name == part)
        ops = {n.op_type for n in onnx.load(str(bundle / spec.file)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, part
    with AnomalyModel(bundle, BackendConfig(threads=1)) as model:  # an accepted bundle serves as any other
        frame = np.full((m.input.height, m.input.width, 3), 128, np.uint8)
        assert np.isfinite(model.predict(frame).score)


def test_failed_int8_bundle_is_written_marked_and_refused_unless_allowed(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run, _ = tiny_run
    bundle = _export(run, tmp_path / "strict", 1e-9)
    q = load_manifest(bundle).int8
    assert q is not None and not q.accepted and "fail" in q.verdict.lower()
    # the sensitivity search ran, found no subset either, and left every part INT8
    assert q.part_max_frac is not None and set(q.part_max_frac) == set(q.parts) and len(q.parts) > 1
    with pytest.raises(BundleError, match="allow_failed_int8"):
        AnomalyModel(bundle, BackendConfig(threads=1))
    with AnomalyModel(bundle, BackendConfig(threads=1, allow_failed_int8=True)) as model:
        assert model.calibration is None or model.calibration.max_abs_diff <= model.calibration.tolerance


def test_sensitivity_search_keeps_the_least_sensitive_parts_in_int8(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bound between the least sensitive part's deviation and the all-INT8 chain's: a subset passes, the rest
    stays FP32 (its FP32 file in the bundle, no INT8 file), and the bundle serves."""
    run, _ = tiny_run
    probe = load_manifest(_export(run, tmp_path / "probe", 1e-9)).int8
    assert probe is not None and probe.part_max_frac
    every = load_manifest(_export(run, tmp_path / "every", 0.99)).int8
    assert every is not None and every.part_max_frac is None  # passed at once: no search
    least = min(probe.part_max_frac, key=probe.part_max_frac.__getitem__)
    bound = probe.part_max_frac[least] * 1.001 + 1e-12
    if bound >= every.max_frac_of_threshold:
        pytest.skip("on this tiny run the least sensitive part alone deviates as much as the whole INT8 chain")
    bundle = _export(run, tmp_path / "subset", bound)
    m = load_manifest(bundle)
    q = m.int8
    assert q is not None and q.accepted and least in q.parts and q.max_frac_of_threshold <= bound
    assert set(q.parts) < set(probe.parts)
    for spec in m.parts:
        assert (bundle / spec.file).is_file()
        assert spec.precision == ("int8" if spec.name in q.parts else spec.precision)
        if spec.name in set(probe.parts) - set(q.parts):
            assert not spec.file.endswith(".int8.onnx") and not (bundle / f"{spec.name}.int8.onnx").exists()
            assert spec.name in q.fp32_parts
    with AnomalyModel(bundle, BackendConfig(threads=1)) as model:
        frame = np.full((m.input.height, m.input.width, 3), 128, np.uint8)
        assert np.isfinite(model.predict(frame).score)


def test_bad_int8_options_are_refused_naming_the_option(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_run
    with pytest.raises(ExportError, match="int8-calib-images"):
        export_bundle(ExportOptions(run=run, out=tmp_path / "a", precision="int8", int8_calib_images=0))
    with pytest.raises(ExportError, match="without --fused"):
        export_bundle(ExportOptions(run=run, out=tmp_path / "b", precision="int8", fused=True))
