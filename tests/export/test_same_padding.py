"""The lite0 teacher's TF-'SAME' padding: frozen for the bundle's input size, exported as ``Conv`` pads, same numbers.

timm pads its TF-ported EfficientNets asymmetrically (one more row or column at the bottom / right for a stride-2
conv on an even size). The export writes that padding into each ``Conv``'s ``pads`` instead of a ``Pad`` node; the
ONNX Runtime features must equal the timm module's on sizes where the padding is asymmetric, symmetric, or both.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_parts import _AsTuple, export_torch_part, freeze_same_padding
from export.parity import session
from training.backbones import build_teacher


@pytest.mark.parametrize("hw", [(96, 64), (80, 112), (97, 65)])
def test_frozen_same_padding_exports_as_conv_pads_with_the_timm_numbers(tmp_path: Path, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    teacher = build_teacher("efficientnet_lite0", pretrained=False).eval()
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        want = [f.numpy() for f in teacher(x)]
        frozen = [f.numpy() for f in freeze_same_padding(teacher, hw)(x)]
    for a, b in zip(frozen, want, strict=True):
        np.testing.assert_array_equal(a, b)  # the same arithmetic in torch, to the bit
    path = tmp_path / "teacher.onnx"
    export_torch_part(_AsTuple(freeze_same_padding(teacher, hw)), "teacher", (x[:1],), path)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Pad"] == 0 and ops["Conv"] > 0, ops
    pads = [list(a.ints) for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" for a in n.attribute]
    asymmetric = any(p[:2] != p[2:] for p in pads if len(p) == 4)
    assert asymmetric == (hw[0] % 2 == 0), pads  # even sizes pad one more at the end; these odd ones do not
    got = session(path).run(None, {"image": x.numpy()})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
