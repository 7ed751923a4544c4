"""A real, tiny bundle built with ``onnx.helper`` (no torch) for runtime tests.

The graphs follow ``runtime/bundle.py`` exactly (tensor names, chain order, dynamic batch axis, opset 17) so the
runtime code under test cannot tell them from an exported Reverse Distillation model:

* teacher    image (B,3,H,W) -> f1 (B,8,H/4,W/4), f2 (B,16,H/8,W/8), f3 (B,32,H/16,W/16): strided convs + tanh
* projection f1,f2,f3 -> p1,p2,p3: identity
* ocbe       p1,p2,p3 -> z (B,64,H/16,W/16): pool to the coarsest scale, concat, 1x1 conv, tanh
* decoder    z -> d1,d2,d3: same shapes as f1..f3, deterministic and different from them
* score      f1..f3, d1..d3 -> anomaly_map (B,1,H,W), score (B,): per scale ``1 - cos`` over channels, bilinear
  resize to (H,W), sum, Gaussian blur (sigma 4, kernel 33, reflect padding, two separable convs), max over H,W.

Weights are random but fixed by ``seed``. The default threshold is the median score of random noise images, so
roughly half of random images come out NG. Like an exported bundle it ships four calibration frames
(``calib.npy``, uint8 noise) with their scores, which the runtime reproduces at load time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.bundle import (
    CHAIN,
    CalibrationSpec,
    InputSpec,
    Manifest,
    PartSpec,
    PreprocessSpec,
    TensorSpec,
    ThresholdSpec,
    sha256_file,
    write_manifest,
)

OPSET = 17
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FEATURE_CHANNELS = (8, 16, 32)
FEATURE_STRIDES = (4, 8, 16)
Z_CHANNELS = 64
BLUR_SIGMA = 4.0
BLUR_KERNEL = 33
COS_EPS = 1e-8

_Graph = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def gaussian_kernel_1d(sigma: float = BLUR_SIGMA, size: int = BLUR_KERNEL) -> np.ndarray:
    """Normalised 1-D Gaussian taps, shape ``(size,)`` float32 (anomalib's ``2*int(4*sigma+0.5)+1`` = 33 taps)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return (k / k.sum()).astype(np.float32)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _conv_weight(rng: np.random.Generator, cout: int, cin: int, k: int) -> np.ndarray:
    return (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)


def _teacher(rng: np.random.Generator) -> _Graph:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev, cin = "image", 3
    # f1: 4x4 stride 4; f2, f3: 2x2 stride 2 -> strides 4, 8, 16.
    for i, (cout, k) in enumerate(zip(FEATURE_CHANNELS, (4, 2, 2), strict=True), start=1):
        w, b = f"teacher.w{i}", f"teacher.b{i}"
        inits += [_init(w, _conv_weight(rng, cout, cin, k)), _init(b, rng.standard_normal(cout).astype(np.float32))]
        nodes.append(helper.make_node("Conv", [prev, w, b], [f"teacher.c{i}"], kernel_shape=[k, k], strides=[k, k]))
        nodes.append(helper.make_node("Tanh", [f"teacher.c{i}"], [f"f{i}"]))
        prev, cin = f"f{i}", cout
    return nodes, inits


def _projection() -> _Graph:
    return [helper.make_node("Identity", [f"f{i}"], [f"p{i}"]) for i in (1, 2, 3)], []


def _ocbe(rng: np.random.Generator) -> _Graph:
    nodes = [
        helper.make_node("AveragePool", ["p1"], ["ocbe.a1"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("AveragePool", ["p2"], ["ocbe.a2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["ocbe.a1", "ocbe.a2", "p3"], ["ocbe.cat"], axis=1),
        helper.make_node("Conv", ["ocbe.cat", "ocbe.w", "ocbe.b"], ["ocbe.c"], kernel_shape=[1, 1]),
        helper.make_node("Tanh", ["ocbe.c"], ["z"]),
    ]
    cin = sum(FEATURE_CHANNELS)
    inits = [
        _init("ocbe.w", _conv_weight(rng, Z_CHANNELS, cin, 1)),
        _init("ocbe.b", rng.standard_normal(Z_CHANNELS).astype(np.float32) * 0.1),
    ]
    return nodes, inits


def _decoder(rng: np.random.Generator) -> _Graph:
    c1, c2, c3 = FEATURE_CHANNELS
    nodes = [
        helper.make_node("Conv", ["z", "decoder.w3", "decoder.b3"], ["decoder.c3"], kernel_shape=[1, 1]),
        helper.make_node("Tanh", ["decoder.c3"], ["d3"]),
        helper.make_node("ConvTranspose", ["d3", "decoder.w2", "decoder.b2"], ["decoder.c2"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Tanh", ["decoder.c2"], ["d2"]),
        helper.make_node("ConvTranspose", ["d2", "decoder.w1", "decoder.b1"], ["decoder.c1"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Tanh", ["decoder.c1"], ["d1"]),
    ]  # fmt: skip
    inits = [
        _init("decoder.w3", _conv_weight(rng, c3, Z_CHANNELS, 1)),
        _init("decoder.b3", rng.standard_normal(c3).astype(np.float32) * 0.1),
        # ConvTranspose weights are (C_in, C_out, k, k).
        _init("decoder.w2", _conv_weight(rng, c3, c2, 2)),
        _init("decoder.b2", rng.standard_normal(c2).astype(np.float32) * 0.1),
        _init("decoder.w1", _conv_weight(rng, c2, c1, 2)),
        _init("decoder.b1", rng.standard_normal(c1).astype(np.float32) * 0.1),
    ]
    return nodes, inits


def _score(image_size: int) -> _Graph:
    """Per-scale ``1 - cos(f, d)`` over channels -> bilinear to (H, W) -> sum -> Gaussian blur -> max."""
    nodes: list[onnx.NodeProto] = []
    k = gaussian_kernel_1d()
    pad = BLUR_KERNEL // 2
    inits = [
        _init("score.axis1", np.array([1], dtype=np.int64)),
        _init("score.eps", np.array(COS_EPS, dtype=np.float32)),
        _init("score.one", np.array(1.0, dtype=np.float32)),
        _init("score.kh", k.reshape(1, 1, BLUR_KERNEL, 1)),
        _init("score.kw", k.reshape(1, 1, 1, BLUR_KERNEL)),
        _init("score.pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], dtype=np.int64)),
    ]
    maps = []
    for i, stride in zip((1, 2, 3), FEATURE_STRIDES, strict=True):
        s = f"score.s{i}."
        inits.append(_init(s + "scales", np.array([1.0, 1.0, stride, stride], dtype=np.float32)))
        nodes += [
            helper.make_node("Mul", [f"f{i}", f"d{i}"], [s + "fd"]),
            helper.make_node("ReduceSum", [s + "fd", "score.axis1"], [s + "dot"], keepdims=1),
            helper.make_node("Mul", [f"f{i}", f"f{i}"], [s + "ff"]),
            helper.make_node("ReduceSum", [s + "ff", "score.axis1"], [s + "nf2"], keepdims=1),
            helper.make_node("Mul", [f"d{i}", f"d{i}"], [s + "dd"]),
            helper.make_node("ReduceSum", [s + "dd", "score.axis1"], [s + "nd2"], keepdims=1),
            helper.make_node("Mul", [s + "nf2", s + "nd2"], [s + "n2"]),
            helper.make_node("Sqrt", [s + "n2"], [s + "n"]),
            helper.make_node("Max", [s + "n", "score.eps"], [s + "nc"]),
            helper.make_node("Div", [s + "dot", s + "nc"], [s + "cos"]),
            helper.make_node("Sub", ["score.one", s + "cos"], [s + "m"]),
            # half_pixel == torch F.interpolate(mode="bilinear", align_corners=False)
            helper.make_node("Resize", [s + "m", "", s + "scales"], [s + "up"], mode="linear",
                             coordinate_transformation_mode="half_pixel"),
        ]  # fmt: skip
        maps.append(s + "up")
    nodes += [
        helper.make_node("Sum", maps, ["score.sum"]),
        helper.make_node("Pad", ["score.sum", "score.pads"], ["score.padded"], mode="reflect"),
        helper.make_node("Conv", ["score.padded", "score.kh"], ["score.bh"], kernel_shape=[BLUR_KERNEL, 1]),
        helper.make_node("Conv", ["score.bh", "score.kw"], ["anomaly_map"], kernel_shape=[1, BLUR_KERNEL]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    return nodes, inits


def tensor_shapes(image_size: int) -> dict[str, list[int]]:
    """Shapes of every named tensor of the contract, ``-1`` for the batch axis."""
    s = image_size
    shapes = {
        "image": [-1, 3, s, s],
        "anomaly_map": [-1, 1, s, s],
        "score": [-1],
        "z": [-1, Z_CHANNELS, s // 16, s // 16],
    }
    for i, (c, stride) in enumerate(zip(FEATURE_CHANNELS, FEATURE_STRIDES, strict=True), start=1):
        for prefix in "fpd":
            shapes[f"{prefix}{i}"] = [-1, c, s // stride, s // stride]
    return shapes


PART_IO: dict[str, tuple[list[str], list[str]]] = {
    "teacher": (["image"], ["f1", "f2", "f3"]),
    "projection": (["f1", "f2", "f3"], ["p1", "p2", "p3"]),
    "ocbe": (["p1", "p2", "p3"], ["z"]),
    "decoder": (["z"], ["d1", "d2", "d3"]),
    "score": (["f1", "f2", "f3", "d1", "d2", "d3"], ["anomaly_map", "score"]),
    "fused": (["image"], ["anomaly_map", "score"]),
}


def _value_info(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    dims: list[int | str] = ["batch" if d == -1 else d for d in shape]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _model(part: str, graph: _Graph, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    nodes, inits = graph
    ins, outs = PART_IO[part]
    g = helper.make_graph(
        nodes,
        f"tiny_rd_{part}",
        [_value_info(n, shapes[n]) for n in ins],
        [_value_info(n, shapes[n]) for n in outs],
        initializer=inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rdedge-tests")
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model


def _part_spec(part: str, file: str, shapes: dict[str, list[int]]) -> PartSpec:
    ins, outs = PART_IO[part]
    return PartSpec(
        name=part,
        file=file,
        inputs=[TensorSpec(name=n, shape=shapes[n]) for n in ins],
        outputs=[TensorSpec(name=n, shape=shapes[n]) for n in outs],
    )


def _median_noise_score(fused: onnx.ModelProto, image_size: int, seed: int, n: int = 16) -> float:
    """Median score of ``n`` uniform-noise uint8 images, preprocessed like the runtime does (no resize needed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed + 1000)
    bgr = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    rgb = bgr[..., ::-1].astype(np.float32) / 255.0
    x = (rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    scores = sess.run(["score"], {"image": x})[0]
    return float(np.median(scores))


def _calibration(fused: onnx.ModelProto, out_dir: Path, image_size: int, seed: int, n: int = 4) -> CalibrationSpec:
    """Write ``calib.npy`` (``n`` uint8 BGR noise frames) and score them through the runtime's preprocessing."""
    import onnxruntime as ort

    from runtime.preprocess import Preprocessor

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(seed + 2000).integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    pre = Preprocessor(
        PreprocessSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD), InputSpec(height=image_size, width=image_size)
    )
    scores = [float(sess.run(["score"], {"image": pre(f)})[0][0]) for f in frames]
    np.save(out_dir / "calib.npy", frames)
    return CalibrationSpec(file="calib.npy", scores=scores, source=f"{n} uniform-noise frames (tests/helpers)")


def make_tiny_bundle(
    out_dir: Path,
    image_size: int = 64,
    seed: int = 0,
    threshold: float | None = None,
    fused: bool = True,
    calibration: bool = True,
) -> Path:
    """Write a complete tiny bundle (five parts, optional fused ``model.onnx``, ``manifest.json``) into ``out_dir``.

    Args:
        out_dir: directory to create (may exist; files are overwritten).
        image_size: square input size in pixels, a multiple of 16 and > 32 (reflect padding of the blur needs 17+).
        seed: fixes the random weights and the noise images that set the default threshold.
        threshold: NG threshold in score units; default the median score of random noise images.
        fused: also write the fused single graph ``model.onnx`` (image -> anomaly_map, score).
        calibration: also write ``calib.npy`` and record its scores (``manifest.calibration``); ``False`` makes a
            bundle like those exported before the load-time score check existed.

    Returns:
        ``out_dir``.
    """
    if image_size % 16 or image_size <= 32:
        raise ValueError(f"image_size must be a multiple of 16 and > 32, got {image_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(image_size)
    graphs: dict[str, _Graph] = {
        "teacher": _teacher(rng),
        "projection": _projection(),
        "ocbe": _ocbe(rng),
        "decoder": _decoder(rng),
        "score": _score(image_size),
    }
    parts: list[PartSpec] = []
    files: dict[str, str] = {}
    for name in CHAIN:
        file = f"{name}.onnx"
        onnx.save(_model(name, graphs[name], shapes), str(out_dir / file))
        files[file] = sha256_file(out_dir / file)
        parts.append(_part_spec(name, file, shapes))
    # The fused graph is the union of the parts: their node and initializer names are already unique.
    fused_graph: _Graph = ([], [])
    for name in CHAIN:
        fused_graph[0].extend(graphs[name][0])
        fused_graph[1].extend(graphs[name][1])
    fused_model = _model("fused", fused_graph, shapes)
    fused_spec = None
    if fused:
        onnx.save(fused_model, str(out_dir / "model.onnx"))
        files["model.onnx"] = sha256_file(out_dir / "model.onnx")
        fused_spec = _part_spec("fused", "model.onnx", shapes)
    calib = None
    if calibration:
        calib = _calibration(fused_model, out_dir, image_size, seed)
        files[calib.file] = sha256_file(out_dir / calib.file)
    if threshold is None:
        value = _median_noise_score(fused_model, image_size, seed)
        rule, source = "median", "16 uniform-noise images (tests/helpers/onnx_bundle.py)"
    else:
        value, rule, source = float(threshold), "given", "make_tiny_bundle(threshold=...)"
    manifest = Manifest(
        model_id=f"tiny-rd-s{image_size}-seed{seed}",
        created="2026-01-01T00:00:00Z",
        backbone="tiny-conv",
        input=InputSpec(height=image_size, width=image_size),
        preprocess=PreprocessSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        parts=parts,
        fused=fused_spec,
        threshold=ThresholdSpec(value=value, rule=rule, source=source),
        files=files,
        versions={"onnx": onnx.__version__},
        extra={"synthetic": True},
        calibration=calib,
    )
    write_manifest(out_dir, manifest)
    return out_dir
