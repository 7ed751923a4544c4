"""FP32 ONNX parts -> INT8 QDQ parts by ONNX Runtime static quantisation, and their score parity against FP32.

Used by ``rdedge export --precision int8`` for the teacher, projection, OCBE and decoder parts; the density and
score parts (cosine distance, normalisation, blur, top-k: small, and where an 8-bit step would move the score)
always stay FP32. Settings (recorded in ``manifest.int8.method``):

* ``onnxruntime.quantization.quantize_static``, QDQ format (QuantizeLinear/DequantizeLinear pairs that ORT's CPU
  provider fuses into integer kernels), weights int8 per output channel (symmetric), activations uint8 (asymmetric,
  MinMax ranges), ``reduce_range`` off: the u8s8 choice ORT recommends for x86 with VNNI and ARM.
* Each graph first goes through ``quant_pre_process`` (ORT's recommended step; it folds the decoder's BatchNorm into
  its ConvTranspose: without it the decoder alone moved magnetic_tile 128 px scores by ~20-30% of the threshold,
  with it by 1.25%, measured 2026-12-02 on 20 validation images). ORT's default op set is quantised.
* :data:`KEEP_OUTPUT_NODES` (off by default) keeps the weighted node writing each graph output in FP32.
* Graph inputs and outputs stay FP32 with the same names and shapes: an INT8 part is a drop-in replacement.
* Activation ranges come from defect-free images only: the run's training images (``ckpt["split"]["train"]``) when
  they are on disk, else the threshold images. The parity is measured on the threshold (validation) images.

Parity rule (:func:`score_parity`): ``max |score_int8 - score_fp32| <= INT8_SCORE_FRAC * |threshold|`` over the
validation images. The issue's second condition, image AUROC on both shared sets within :data:`INT8_AUROC_DELTA`, is
measured by ``benchmarks/int8.py``; export records both AUROCs when the calibration data carries labelled test images
(information only: nothing is chosen on them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError, require

log = logging.getLogger(__name__)

#: Parts that get an INT8 copy (density and score stay FP32).
INT8_PARTS = ("teacher", "projection", "ocbe", "decoder")
#: The parity rule: max |int8 - fp32| image score on the validation images <= this fraction of the threshold.
INT8_SCORE_FRAC = 0.01
#: The issue's AUROC condition (image AUROC on each shared set moves by at most this); benchmarks/int8.py checks it.
INT8_AUROC_DELTA = 0.005
#: Op types that carry weights (counted and, with KEEP_OUTPUT_NODES, kept FP32 at the outputs).
QUANT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: Keep the weighted node producing each graph output in FP32 (see the module docstring).
KEEP_OUTPUT_NODES = False
METHOD = (
    "onnxruntime quantize_static {ort}: QDQ, weights int8 per-channel symmetric, activations uint8 asymmetric "
    "(MinMax over {n} calibration images), reduce_range off, after quant_pre_process{outputs}"
)


@dataclass(frozen=True)
class QuantizedPart:
    """One part's INT8 graph.

    Attributes:
        name: part name.
        file: the INT8 ONNX file name (``<part>.int8.onnx``).
        quantized: nodes quantised (of :data:`QUANT_OPS`).
        fp32_nodes: names of quantisable nodes left in FP32 (output producers, ``keep_fp32``).
    """

    name: str
    file: str
    quantized: int
    fp32_nodes: list[str]


class _Feeds:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts (built lazily: ORT imports it)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def chain_tensors(sessions: Sequence[Any], images: np.ndarray, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Every named tensor of the FP32 chain on ``images (N, 3, H, W)``, one dict per batch (the calibration feeds)."""
    from export.parity import run_session

    out = []
    for i in range(0, len(images), batch_size):
        t: dict[str, np.ndarray] = {"image": np.ascontiguousarray(images[i : i + batch_size], np.float32)}
        for sess in sessions:
            t.update(zip([o.name for o in sess.get_outputs()], run_session(sess, t), strict=True))
        out.append(t)
    return out


def quantizable_nodes(model: Any) -> list[Any]:
    """The nodes of :data:`QUANT_OPS` with a constant weight (an identity projection has none)."""
    inits = {i.name for i in model.graph.initializer}
    inits |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n for n in model.graph.node if n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in inits]


#: Single-input ops that pass a weighted node's output on to a graph output unchanged in kind (activations).
_PASS_ON = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Identity", "Tanh"})


def output_producers(model: Any) -> list[str]:
    """Names of the weighted nodes that write a graph output, directly or through one activation (``Relu``,
    ``Clip``...). An output written by another op (a residual ``Add``, a ``Concat``) names none."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weighted = {n.name for n in quantizable_nodes(model)}
    names: list[str] = []
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in _PASS_ON:
            node = producer.get(node.input[0])
        if node is not None and node.name in weighted and node.name not in names:
            names.append(node.name)
    return names


def quantize_part(
    name: str, src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], keep_fp32: Sequence[str] = ()
) -> QuantizedPart | None:
    """Quantise one FP32 part to an INT8 QDQ graph at ``dst``; ``None`` when it has nothing to quantise.

    Args:
        name: part name (for messages).
        src: the FP32 ONNX file.
        dst: where to write the INT8 graph.
        feeds: calibration batches, each a dict holding (at least) the part's inputs, float32.
        keep_fp32: further node names to leave in FP32.

    Raises:
        ExportError: a feed lacks one of the part's inputs, or ONNX Runtime cannot quantise the graph.
    """
    onnx = require("onnx", "export", "INT8 quantisation")
    ort = require("onnxruntime", "cpu", "INT8 quantisation")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    named = src.with_name(f".{src.stem}.pre.onnx")
    try:
        quant_pre_process(str(src), str(named), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - ORT's optimiser raises its own types
        raise ExportError(f"int8 {name}: onnxruntime cannot pre-process {src.name} for quantisation: {exc}") from None
    model = onnx.load(str(named))
    for i, node in enumerate(model.graph.node):  # quantize_static addresses nodes by name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    nodes = quantizable_nodes(model)
    if not nodes:
        log.info("int8 %s: no %s node with weights; the part stays FP32", name, "/".join(QUANT_OPS))
        named.unlink(missing_ok=True)
        return None
    inputs = [i.name for i in model.graph.input]
    for k, feed in enumerate(feeds):
        missing = [i for i in inputs if i not in feed]
        if missing:
            raise ExportError(f"int8 {name}: calibration batch {k} lacks the part's inputs {missing}")
    exclude = list(dict.fromkeys([*(output_producers(model) if KEEP_OUTPUT_NODES else []), *keep_fp32]))
    onnx.save(model, str(named))
    try:
        quantize_static(
            str(named),
            str(dst),
            _Feeds([{k: feed[k] for k in inputs} for feed in feeds]),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    except Exception as exc:  # noqa: BLE001 - the quantiser raises plain Exceptions and ORT's own types
        raise ExportError(f"int8 {name}: onnxruntime {ort.__version__} cannot quantise {src.name}: {exc}") from None
    finally:
        named.unlink(missing_ok=True)
    q = onnx.load(str(dst))
    onnx.checker.check_model(q)
    if [i.name for i in q.graph.input] != inputs or [o.name for o in q.graph.output] != [
        o.name for o in model.graph.output
    ]:
        raise ExportError(f"int8 {name}: the quantised graph's inputs/outputs differ from {src.name}'s")
    n_q = len(nodes) - len([n for n in nodes if n.name in exclude])
    log.info("int8 %s: %d of %d %s nodes quantised, %d kept FP32 (%s)", name, n_q, len(nodes), "/".join(QUANT_OPS),
             len(exclude), ", ".join(exclude) or "none")  # fmt: skip
    return QuantizedPart(name, dst.name, n_q, exclude)


def method(n_calib: int) -> str:
    """``manifest.int8.method`` for ``n_calib`` calibration images."""
    ort = require("onnxruntime", "cpu", "INT8 quantisation")
    outputs = ", graph-output producers kept FP32" if KEEP_OUTPUT_NODES else ""
    return METHOD.format(ort=ort.__version__, n=n_calib, outputs=outputs)


@dataclass(frozen=True)
class ScoreParity:
    """INT8 vs FP32 image scores on one image set (score units and fractions of ``|threshold|``)."""

    n_images: int
    max_abs: float
    p99_abs: float
    max_frac: float
    p99_frac: float
    tolerance_frac: float

    @property
    def accepted(self) -> bool:
        """The parity rule: ``max_frac <= tolerance_frac``."""
        return self.max_frac <= self.tolerance_frac


def score_parity(
    fp32: np.ndarray, int8: np.ndarray, threshold: float, tolerance_frac: float = INT8_SCORE_FRAC
) -> ScoreParity:
    """Compare the two chains' image scores ``(N,)`` against the FP32 threshold.

    Raises:
        ExportError: different lengths, no images, a zero threshold, or NaN/Inf in the INT8 scores.
    """
    a, b = np.asarray(fp32, np.float64), np.asarray(int8, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ExportError(f"int8 parity: score arrays must be equal-length 1-D, got {a.shape} and {b.shape}")
    if not np.isfinite(b).all():
        raise ExportError("int8 parity: the INT8 chain produced NaN or Inf scores")
    if not abs(threshold) > 0:
        raise ExportError(f"int8 parity: the threshold is {threshold}; fractions of it are undefined")
    d = np.abs(b - a)
    mx, p99 = float(d.max()), float(np.percentile(d, 99))
    return ScoreParity(len(d), mx, p99, mx / abs(threshold), p99 / abs(threshold), tolerance_frac)
