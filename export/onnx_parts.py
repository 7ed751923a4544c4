"""Torch model -> the bundle's ONNX parts (teacher, projection, ocbe, decoder, score, optional fused graph).

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). On torch 2.14 it exports
an ``efficientnet_lite0`` teacher in ~2 s where the dynamo exporter needs ~15 s on two cores, both give the same
numbers (max abs error ~1e-5 on the teacher features), and it names inputs/outputs and the dynamic batch axis from
plain ``input_names`` / ``dynamic_axes``. Two traps, both guarded here: the exporter traces the wrapper in whatever
mode it is in (a wrapper left in train mode bakes *batch* statistics into BatchNorm and silently updates the running
stats), so every wrapper is put in eval mode and the module's buffers are checked unchanged after the export; and an
identity projection traces to an empty graph, so it is written directly as three ``Identity`` nodes.

Every graph gets a dynamic batch axis named ``batch`` on every input and output and passes
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.errors import ExportError, require
from runtime.bundle import TensorSpec
from training.model import ReverseDistillation

log = logging.getLogger(__name__)

#: Tensor names of every part, exactly as in runtime/bundle.py and docs/TEAM_CONTRACT.md.
PART_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "teacher": (("image",), ("f1", "f2", "f3")),
    "projection": (("f1", "f2", "f3"), ("p1", "p2", "p3")),
    "ocbe": (("p1", "p2", "p3"), ("z",)),
    "decoder": (("z",), ("d1", "d2", "d3")),
    "density": (("f1", "f2", "f3"), ("density_map",)),
    "score": (("f1", "f2", "f3", "d1", "d2", "d3"), ("anomaly_map", "score")),
    "fused": (("image",), ("anomaly_map", "score")),
}
#: The score part of a recipe that fuses the density map.
SCORE_WITH_DENSITY_IO = (("f1", "f2", "f3", "d1", "d2", "d3", "density_map"), ("anomaly_map", "score"))
#: The decoder part of RD-E with guided information injection: it reads the (tuned) teacher's features too.
DECODER_WITH_TEACHER_IO = (("z", "f1", "f2", "f3"), ("d1", "d2", "d3"))


def part_io(
    name: str, with_density: bool, decoder_takes_teacher: bool = False
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output tensor names of a part (the score part takes ``density_map`` too when it fuses it; an
    RD-E decoder with injection takes ``f1, f2, f3`` after ``z``)."""
    if name == "decoder" and decoder_takes_teacher:
        return DECODER_WITH_TEACHER_IO
    return SCORE_WITH_DENSITY_IO if name == "score" and with_density else PART_IO[name]


def decode(model: nn.Module, z: Tensor, feats: list[Tensor]) -> list[Tensor]:
    """The model's decoder on ``z`` (and the teacher's ``feats`` when it takes them: RD-E with injection)."""
    from training.rde import takes_teacher

    return model.decoder(z, *feats) if takes_teacher(model.decoder) else model.decoder(z)


DEFAULT_OPSET = 17
#: Opsets the TorchScript exporter of torch 2.14 writes and TensorRT 10.3 (JetPack 6) parses.
MIN_OPSET, MAX_OPSET = 14, 20


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` for an opset outside ``[MIN_OPSET, MAX_OPSET]`` (or beyond the installed onnx)."""
    onnx = require("onnx", "export", "ONNX export")
    latest = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= latest:
        raise ExportError(
            f"--opset {opset} is not supported: choose {MIN_OPSET}..{latest} (default {DEFAULT_OPSET}; the "
            f"exporter of torch {torch.__version__} and TensorRT 10.3 both handle that range)"
        )


class _AsTuple(nn.Module):
    """Wrap a part whose ``forward`` returns a list (the exporter wants a tuple of outputs)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        out = self.module(*xs)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class FusedModel(nn.Module):
    """``image (B,3,H,W)`` -> ``anomaly_map (B,1,H,W), score (B,)``: the whole chain in one graph."""

    def __init__(self, model: nn.Module, scorer: nn.Module, density: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer
        self.density = density

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        feats, recon = self.model(image)
        if self.density is not None:
            return self.scorer(*feats, *recon, self.density(*feats))
        return self.scorer(*feats, *recon)


class _PaddedConv(torch.autograd.Function):
    """``conv2d(pad(x))`` that exports as one ``Conv`` with (asymmetric) ``pads`` instead of ``Pad`` + ``Conv``.

    Measured on the 416 x 160 lite0 teacher (ONNX Runtime CPU, 2 threads), its four ``Pad`` nodes took about 1.2 ms
    of 7.8: ONNX Runtime does not fold them into the convolutions itself. ONNX ``Conv`` and TensorRT take
    asymmetric padding, and zero padding in the convolution is the same arithmetic.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d, pad: tuple[int, int, int, int]
    ) -> Tensor:
        return F.conv2d(F.pad(x, pad), weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, weight, bias, conv: nn.Conv2d, pad: tuple[int, int, int, int]
    ):
        left, right, top, bottom = pad
        args = [x, weight] if bias is None or bias.node().mustBeNone() else [x, weight, bias]
        return g.op(
            "Conv",
            *args,
            kernel_shape_i=list(conv.kernel_size),
            pads_i=[top, left, bottom, right],
            strides_i=list(conv.stride),
            dilations_i=list(conv.dilation),
            group_i=conv.groups,
        )


class _StaticPadConv(nn.Module):
    """A TF-'SAME' conv with its padding fixed for one input size (one ``Conv`` with ``pads`` in ONNX)."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.pad = pad  # (left, right, top, bottom), as F.pad wants

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        return cast(Tensor, _PaddedConv.apply(x, c.weight, c.bias, c, self.pad))


def _same_pad(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def freeze_same_padding(teacher: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    """Copy of ``teacher`` whose TF-'SAME' convs (timm ``Conv2dSame``) pad by constants for ``image_size``.

    timm computes the padding of its TF-ported EfficientNets from the input shape at run time; exported as is, that
    becomes ``Shape -> Div -> Ceil -> ... -> Pad`` arithmetic in float that TensorRT and the FP16 converter would
    have to carry. The bundle's input size is fixed (only the batch is dynamic), so the pads are constants.
    """
    teacher = copy.deepcopy(teacher).eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
        for n, m in teacher.named_modules()
        if type(m).__name__ == "Conv2dSame"
    ]
    with torch.no_grad():
        teacher(torch.zeros(1, 3, *image_size))
    for h in hooks:
        h.remove()
    for name, (ih, iw) in sizes.items():
        conv = cast(nn.Conv2d, teacher.get_submodule(name))
        ph = _same_pad(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = _same_pad(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent_name, _, attr = name.rpartition(".")
        parent = teacher.get_submodule(parent_name) if parent_name else teacher
        setattr(parent, attr, _StaticPadConv(conv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    if sizes:
        log.debug("froze the SAME padding of %d conv(s) for %dx%d inputs", len(sizes), *image_size)
    return teacher


def is_identity_projection(module: nn.Module) -> bool:
    """True for the plain-RD projection (no weights, returns its inputs)."""
    from training.model import IdentityProjection

    return isinstance(module, (IdentityProjection, nn.Identity)) and not any(True for _ in module.parameters())


class _ExportRD(nn.Module):
    """The RD model with the export-ready teacher (same weights, constant padding)."""

    def __init__(self, model: ReverseDistillation, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.projection = teacher, model.projection
        self.ocbe, self.decoder = model.ocbe, model.decoder

    def forward(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.teacher(image)
        return feats, decode(self, self.ocbe(*self.projection(*feats)), feats)


def part_modules(
    model: ReverseDistillation, scorer: nn.Module, image_size: tuple[int, int], density: nn.Module | None = None
) -> dict[str, nn.Module]:
    """The torch module behind each part, wrapped to return tuples (``projection`` as the model has it).

    The teacher is a copy with its SAME padding frozen for ``image_size`` (see :func:`freeze_same_padding`).
    ``density`` (the scoring's density head) adds the ``density`` part; ``scorer`` must then take its map.
    """
    teacher = freeze_same_padding(model.teacher, image_size)
    parts: dict[str, nn.Module] = {
        "teacher": _AsTuple(teacher),
        "projection": _AsTuple(model.projection),
        "ocbe": _AsTuple(model.ocbe),
        "decoder": _AsTuple(model.decoder),
        "score": _AsTuple(scorer),
        "fused": FusedModel(_ExportRD(model, teacher), scorer, density),
    }
    if density is not None:
        parts["density"] = _AsTuple(density)
    return parts


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def export_torch_part(
    module: nn.Module,
    name: str,
    example: tuple[Tensor, ...],
    path: Path,
    opset: int = DEFAULT_OPSET,
    io: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
) -> None:
    """Export one part with named tensors and a dynamic batch axis, then run the full ONNX check.

    Args:
        module: the part (returns a tuple), put in eval mode here.
        name: part name, a key of :data:`PART_IO`.
        example: example inputs, each ``(B, ...)`` float32.
        path: output ``.onnx`` file.
        opset: ONNX opset.
        io: input and output names (default ``PART_IO[name]``).
    """
    inputs, outputs = io or PART_IO[name]
    module.eval()
    before = _buffers(module)
    dynamic = {t: {0: "batch"} for t in (*inputs, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)  # constant-folding notes of the exporter
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    after = _buffers(module)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if changed:  # would mean the graph was traced in train mode (batch statistics baked in)
        raise ExportError(f"exporting {name} changed module buffers {changed[:3]}: the part was not in eval mode")
    check_onnx(path)
    log.info("exported %s -> %s (%.1f MB)", name, path.name, path.stat().st_size / 1e6)


def write_identity_projection(path: Path, feature_specs: list[TensorSpec], opset: int = DEFAULT_OPSET) -> None:
    """Write ``projection.onnx`` for plain RD: ``p_k = Identity(f_k)``; the part exists even when it does nothing."""
    onnx = require("onnx", "export", "ONNX export")
    from onnx import TensorProto, helper

    def vi(name: str, spec: TensorSpec) -> object:
        dims: list[int | str] = ["batch" if d < 0 else d for d in spec.shape]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    outs = PART_IO["projection"][1]
    nodes = [
        helper.make_node("Identity", [s.name], [o], name=f"identity_{o}")
        for s, o in zip(feature_specs, outs, strict=True)
    ]
    graph = helper.make_graph(
        nodes,
        "projection_identity",
        [vi(s.name, s) for s in feature_specs],  # type: ignore[misc]
        [vi(o, s) for s, o in zip(feature_specs, outs, strict=True)],  # type: ignore[misc]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rdedge")
    onnx.save(model, str(path))
    check_onnx(path)


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` (includes shape inference); raises ExportError naming the file."""
    onnx = require("onnx", "export", "ONNX export")
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"{path}: onnx.checker rejected the exported graph: {exc}") from None


def tensor_specs(names: tuple[str, ...], arrays: list[np.ndarray]) -> list[TensorSpec]:
    """TensorSpecs from example arrays, with ``-1`` for the dynamic batch axis."""
    return [
        TensorSpec(name=n, shape=[-1, *map(int, a.shape[1:])], dtype="float32")
        for n, a in zip(names, arrays, strict=True)
    ]
