"""FP16 ONNX: weights FP16, block-listed ops FP32, FP32 I/O, runs in ONNX Runtime on CPU, scores stay close.

Tolerance: the FP16 chain's image scores are within ``FP16_SCORE_TOL`` = 2e-2 relative (to the peak score) of the
FP32 chain's; a single FP16 op on a hand-made graph within 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import FP32_OPS, convert_file, convert_model
from export.parity import FP16_SCORE_TOL, chain_scores, errors, session
from export.pipeline import FP16_PARTS, load_images
from runtime.bundle import load_manifest
from training.backbones import get_spec


def _toy_model() -> onnx.ModelProto:
    """x (B,4,8,8) -> Conv -> Sigmoid -> ReduceL2 over C -> Div (a cosine-like normalisation) -> y."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["r"]),
        helper.make_node("ReduceL2", ["r", "axes"], ["n"], keepdims=1),
        helper.make_node("Div", ["r", "n"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 8, 8])
    graph = helper.make_graph(nodes, "toy", [x], [y], [w, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_block_listed_ops_stay_fp32_and_io_stays_fp32(tmp_path: Path) -> None:
    model, report = convert_model(_toy_model())
    g = model.graph
    assert [i.type.tensor_type.elem_type for i in [*g.input, *g.output]] == [TensorProto.FLOAT] * 2
    assert {i.name: i.data_type for i in g.initializer}["w"] == TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    for node in g.node:
        if node.op_type in FP32_OPS:
            assert all(types[i] == TensorProto.FLOAT for i in node.input if i in types), node.op_type
        if node.op_type in ("Conv", "Sigmoid"):
            assert types[node.output[0]] == TensorProto.FLOAT16
    assert report.blocked_ops == {"ReduceL2": 1, "Div": 1} and report.fp16_initializers == 1
    onnx.save(_toy_model(), str(tmp_path / "a.onnx"))
    onnx.save(model, str(tmp_path / "b.onnx"))
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = session(tmp_path / "a.onnx").run(None, {"x": x})
    got = session(tmp_path / "b.onnx").run(None, {"x": x})
    assert got[0].dtype == np.float32
    assert errors(ref, got)[1] < 1e-2


def test_fp16_parts_convert_and_run_in_ort(exported_bundle: Path, tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Re-convert the bundle's FP32 parts and run the FP16 chain (+ FP32 score) on real images."""
    m = load_manifest(exported_bundle)
    for name in FP16_PARTS:
        report = convert_file(exported_bundle / f"{name}.onnx", tmp_path / f"{name}.fp16.onnx")
        assert report.casts >= 2  # at least the boundary casts
        assert m.extra[f"fp16_onnx.{name}"] == f"{name}.fp16.onnx"
    teacher = onnx.load(str(tmp_path / "teacher.fp16.onnx"))
    assert all(t.data_type == TensorProto.FLOAT16 for t in teacher.graph.initializer if t.data_type != 7)
    spec = get_spec("efficientnet_lite0")
    paths = sorted((tiny_run[1] / "test").rglob("*.png"))
    images = load_images(paths, (64, 64), spec.mean, spec.std)
    fp32, _ = chain_scores([session(exported_bundle / f"{p}.onnx") for p in (*FP16_PARTS, "score")], images)
    fp16_chain = [session(tmp_path / f"{p}.fp16.onnx") for p in FP16_PARTS] + [session(exported_bundle / "score.onnx")]
    fp16, maps = chain_scores(fp16_chain, images)
    assert fp16.dtype == np.float32 and maps.shape == (len(paths), 1, 64, 64)
    _, rel = errors([fp32], [fp16])
    assert rel <= FP16_SCORE_TOL
    assert m.parity["fp16_score_max_rel"] <= FP16_SCORE_TOL
