"""Projection stages: shapes, gradients reach every projection parameter (aux and rdpp), never the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.augment import POLICIES
from training.backbones import get_spec
from training.build import build_model
from training.config import parse_train_config
from training.objectives import build as build_objective
from training.projection import AuxProjection, RDPPProjection, build
from training.simclr import SimCLRConfig, SimCLRNet, build_trainable_backbone, save_simclr

SPEC = get_spec("efficientnet_lite0")


def _feats(b: int = 2, size: int = 64) -> list[torch.Tensor]:
    c1, c2, c3 = SPEC.channels
    return [
        torch.randn(b, c1, size // 4, size // 4),
        torch.randn(b, c2, size // 8, size // 8),
        torch.randn(b, c3, size // 16, size // 16),
    ]


@pytest.mark.parametrize("kind", ["aux", "rdpp"])
def test_projection_keeps_widths_and_strides(kind: str) -> None:
    proj = build(kind, SPEC).eval()
    f = _feats()
    p = proj(*f)
    assert [t.shape for t in p] == [t.shape for t in f]
    assert all(torch.isfinite(t).all() for t in p)


def test_rdpp_layer_channels() -> None:
    proj = RDPPProjection(SPEC)
    convs = [m for m in proj.proj_a.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (24, 12, (3, 3)),
        (12, 6, (3, 3)),
        (6, 12, (3, 3)),
        (12, 24, (3, 3)),
    ]
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in proj.proj_a.modules()) == 4
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in proj.proj_a.modules()) == 4
    assert isinstance(build("aux", SPEC), AuxProjection)


@pytest.fixture(scope="module")
def simclr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simclr")
    cfg = SimCLRConfig(init="scratch", image_size=64)
    net = SimCLRNet(build_trainable_backbone(cfg.backbone, cfg.init), SPEC.channels, 16)
    save_simclr(out / "simclr.pt", cfg, net, 0, [], POLICIES["default"])
    return out


@pytest.mark.parametrize("kind", ["aux", "rdpp"])
def test_every_projection_parameter_gets_a_gradient(kind: str, simclr_dir: Path) -> None:
    cfg = parse_train_config({"data": {"image_size": 64}, "model": {"projection": kind, "pretrained": False}})
    model = build_model(cfg).train()
    objective = build_objective(cfg, model, simclr_dir if kind == "aux" else None)
    optimizers = objective.parameters_groups(model, cfg)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats = model.teacher(images)  # training runs the frozen teacher once and caches its features
    loss, parts = objective.loss(model.student(), feats, images)
    assert torch.isfinite(loss) and all(v == v for v in parts.values())
    loss.backward()
    for name, p in model.projection.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"projection.{name} got no gradient"
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training
    optimised = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    trainable = [p for n, p in model.named_parameters() if not n.startswith("teacher.")]
    assert all(id(p) in optimised for p in trainable)
    assert not any(id(p) in optimised for p in model.teacher.parameters())
    if kind == "aux":
        assert all(p.grad is None for p in objective.aux.parameters())  # type: ignore[attr-defined]
        assert "align" in parts and not objective.aux.training  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["aux", "rdpp"])
def test_projection_exports_to_onnx(kind: str, tmp_path: Path) -> None:
    """The bundle's ``projection`` part: f1, f2, f3 -> p1, p2, p3 through ONNX Runtime, two different inputs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from export.onnx_parts import export_torch_part

    class AsTuple(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.m(f1, f2, f3))

    proj = build(kind, SPEC)
    proj.train()(*_feats(4))  # move BatchNorm running stats away from their init
    part = AsTuple(proj).eval()
    path = tmp_path / "projection.onnx"
    export_torch_part(part, "projection", tuple(_feats(1)), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        f = _feats(b)
        got = sess.run(["p1", "p2", "p3"], {"f1": f[0].numpy(), "f2": f[1].numpy(), "f3": f[2].numpy()})
        with torch.no_grad():
            want = part(*f)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


def test_aux_of_another_architecture_gets_adapters_and_its_own_normalisation(tmp_path: Path) -> None:
    from training.objectives import AuxObjective, Renormalize

    scfg = SimCLRConfig(backbone="resnet18", init="scratch", image_size=64)
    r18 = get_spec("resnet18")
    save_simclr(
        tmp_path / "simclr.pt",
        scfg,
        SimCLRNet(build_trainable_backbone("resnet18", "scratch"), r18.channels, 16),
        0,
        [],
        POLICIES["default"],
    )
    cfg = parse_train_config({"data": {"image_size": 64}, "model": {"projection": "aux", "pretrained": False}})
    model = build_model(cfg).train()
    obj = build_objective(cfg, model, tmp_path)
    assert isinstance(obj, AuxObjective) and isinstance(obj.renorm, Renormalize)
    x01 = torch.rand(2, 3, 64, 64)
    teacher_in = (x01 - 0.5) / 0.5  # efficientnet_lite0: mean = std = 0.5
    mean, std = torch.tensor(r18.mean).view(1, 3, 1, 1), torch.tensor(r18.std).view(1, 3, 1, 1)
    torch.testing.assert_close(obj.renorm(teacher_in), (x01 - mean) / std)
    convs = [a for a in obj.adapters if isinstance(a, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == list(zip(SPEC.channels, r18.channels, strict=True))
    obj.parameters_groups(model, cfg)
    with torch.no_grad():
        feats = model.teacher(teacher_in)
    loss, _ = obj.loss(model.student(), feats, teacher_in)
    loss.backward()
    assert all(p.grad is not None for p in obj.adapters.parameters())
    assert set(obj.state_dict()["adapters"]) == {f"{i}.{w}" for i in range(3) for w in ("weight", "bias")}
