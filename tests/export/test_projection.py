"""Trained projections (SimCLR-aligned ``aux`` heads, RD++ ``rdpp``) export as the bundle's projection part, with
the training-only auxiliary weights left out and the FP16 copy keeping InstanceNorm in FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from export.pipeline import ExportOptions, export_bundle
from runtime.bundle import load_manifest
from training.build import build_model
from training.config import parse_train_config


@pytest.mark.parametrize("kind", ["aux", "rdpp"])
def test_trained_projection_exports_without_aux_weights(kind: str, tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["model"]["projection"] = kind
    torch.manual_seed(1)
    model = build_model(parse_train_config(ckpt["config"]), pretrained=False)
    proj = {k: v for k, v in model.state_dict().items() if k.startswith("projection.")}
    assert proj
    ckpt["model"] = {**ckpt["model"], **proj}
    gen = torch.Generator().manual_seed(5)
    ckpt["aux"] = {"backbone": {"conv_stem.weight": torch.randn(32, 3, 3, 3, generator=gen)},
                   "adapters": {"0.weight": torch.randn(24, 24, 1, 1, generator=gen)}}  # fmt: skip
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "checkpoint_best.pt")

    out, manifest = export_bundle(ExportOptions(run=tmp_path / "run", out=tmp_path / "bundle", precision="fp16"))
    assert load_manifest(out).extra["projection"] == kind
    graph = onnx.load(str(out / "projection.onnx")).graph
    assert any(n.op_type == "Conv" for n in graph.node)
    assert manifest.parity["projection_max_rel"] <= 1e-4 and "fp16_score_max_rel" in manifest.parity
    tensors = [onnx.numpy_helper.to_array(t) for f in out.glob("*.onnx") for t in onnx.load(str(f)).graph.initializer]
    for aux in (ckpt["aux"]["backbone"]["conv_stem.weight"], ckpt["aux"]["adapters"]["0.weight"]):
        assert not any(t.shape == aux.shape and np.array_equal(t, aux.numpy()) for t in tensors)
    if kind == "rdpp":
        fp16 = onnx.shape_inference.infer_shapes(onnx.load(str(out / "projection.fp16.onnx"))).graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*fp16.value_info, *fp16.input, *fp16.output]}
        norms = [n for n in fp16.node if n.op_type == "InstanceNormalization"]
        assert norms and all(types[n.input[0]] == TensorProto.FLOAT for n in norms)
