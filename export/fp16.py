"""FP32 ONNX -> FP16 ONNX that keeps the numerically delicate ops in FP32 (a small converter on plain ``onnx``).

Used for the teacher, projection, OCBE and decoder parts (the score part always stays FP32): TensorRT >= 10.12
builds *strongly typed* networks, whose precision is exactly the ONNX types, so the FP16 engine is built from this
graph. Rules:

* Graph inputs and outputs stay FP32: a ``Cast`` is inserted after each input and before each output, so the part
  is a drop-in replacement (same tensor names, same dtypes in the manifest).
* Ops in :data:`FP32_OPS` (normalisations, reductions, exp/log/pow/sqrt/div - the pieces of a cosine or a norm,
  softmax, resize) run in FP32; every other op with float inputs runs in FP16. ``Cast`` nodes are inserted where a
  tensor crosses between the two (one per tensor and direction).
* Initializers and ``Constant`` values used only by FP16 ops are stored in FP16 (half the file); those also read by
  FP32 ops stay FP32. FP32 values beyond the FP16 range are clipped to +-65504 (logged).
* Shape arithmetic (``Shape``, ``Gather`` on int64, ...) is untouched: only tensors that shape inference types as
  FP32 are considered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError, require

log = logging.getLogger(__name__)

#: Ops kept in FP32 (the block-list).
FP32_OPS = frozenset(
    {
        "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
        "LpNormalization", "MeanVarianceNormalization", "RMSNormalization",
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "CumSum", "TopK", "ArgMax", "ArgMin",
        "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
        "Resize", "Upsample", "GridSample", "Einsum",
    }
)  # fmt: skip
#: Ops whose inputs are left as they are (type-agnostic or shape-only).
PASSTHROUGH_OPS = frozenset({"Shape", "Size", "Cast", "CastLike", "Constant", "ConstantOfShape", "Range", "NonZero"})

_F32, _F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class Fp16Report:
    """What the conversion did."""

    fp16_nodes: int
    fp32_nodes: int
    fp16_initializers: int
    casts: int
    blocked_ops: dict[str, int]


def _to_fp16(arr: np.ndarray, name: str) -> np.ndarray:
    big = np.abs(arr) > _FP16_MAX
    if big.any():
        log.warning("fp16: %d value(s) of %s exceed the FP16 range; clipped to +-%g", int(big.sum()), name, _FP16_MAX)
    return np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)


def convert_model(model: Any) -> tuple[Any, Fp16Report]:
    """Convert an in-memory FP32 ``onnx.ModelProto`` (see module docstring); returns a new model and a report."""
    onnx = require("onnx", "export", "FP16 conversion")
    from onnx import helper, numpy_helper, shape_inference

    model = shape_inference.infer_shapes(model, strict_mode=True)
    g = model.graph
    types: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"fp16: control-flow op {node.op_type} ({node.name}) is not supported")

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == _F32

    def precision(node: Any) -> int | None:
        if node.op_type in PASSTHROUGH_OPS:
            return None
        return _F32 if node.op_type in FP32_OPS else _F16

    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in g.output}

    def only_fp16_consumers(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and name not in graph_outputs and all(precision(n) == _F16 for n in users)

    # Initializers / Constants read only by FP16 ops are stored in FP16.
    dtype: dict[str, int] = {}
    n_init16 = 0
    for init in g.initializer:
        if init.data_type == _F32 and only_fp16_consumers(init.name):
            init.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(init), init.name), init.name))
            n_init16 += 1
        dtype[init.name] = init.data_type
    for vi in g.input:
        dtype[vi.name] = vi.type.tensor_type.elem_type

    new_nodes: list[Any] = []
    casts: dict[tuple[str, int], str] = {}
    blocked: dict[str, int] = {}
    n16 = n32 = 0

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_fp{16 if to == _F16 else 32}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"cast_{out}", to=to))
            casts[key] = out
            dtype[out] = to
        return casts[key]

    for node in g.node:
        prec = precision(node)
        if node.op_type == "Constant" and is_float(node.output[0]) and only_fp16_consumers(node.output[0]):
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(t), node.output[0]), t.name))
            dtype[node.output[0]] = _F16
            new_nodes.append(node)
            continue
        if prec is not None:
            for i, name in enumerate(node.input):
                if is_float(name) and dtype.get(name, _F32) != prec:
                    node.input[i] = cast(name, prec)
            if prec == _F16:
                n16 += 1
            else:
                n32 += 1
                blocked[node.op_type] = blocked.get(node.op_type, 0) + 1
        for out in node.output:
            if is_float(out):
                dtype[out] = prec if prec is not None else _F32
        new_nodes.append(node)

    # Graph outputs stay FP32: the producer writes "<name>__fp16", a Cast restores "<name>".
    for o in g.output:
        if dtype.get(o.name) == _F16:
            inner = f"{o.name}__fp16"
            for n in new_nodes:
                for i, name in enumerate(n.output):
                    if name == o.name:
                        n.output[i] = inner
                for i, name in enumerate(n.input):
                    if name == o.name:
                        n.input[i] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [o.name], name=f"cast_out_{o.name}", to=_F32))

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    model = shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    n_casts = sum(1 for n in model.graph.node if n.op_type == "Cast")
    return model, Fp16Report(n16, n32, n_init16, n_casts, blocked)


def convert_file(src: Path, dst: Path) -> Fp16Report:
    """Read ``src`` (FP32 ONNX), write the FP16 version to ``dst``; see :func:`convert_model`."""
    onnx = require("onnx", "export", "FP16 conversion")
    model, report = convert_model(onnx.load(str(src)))
    onnx.save(model, str(dst))
    log.info(
        "fp16 %s: %d FP16 / %d FP32 nodes (%s), %d initializers halved, %d casts",
        dst.name, report.fp16_nodes, report.fp32_nodes, report.blocked_ops or "none blocked",
        report.fp16_initializers, report.casts,
    )  # fmt: skip
    return report
