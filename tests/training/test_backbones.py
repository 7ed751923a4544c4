"""Teacher registry: local weights for offline boxes, clear errors for bad files and failed downloads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.backbones import build_teacher, get_spec
from training.errors import CheckpointError, ConfigError


def test_local_teacher_weights_are_loaded(tmp_path: Path) -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(ref.layer1[0].conv1.weight, 0.123)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    teacher = build_teacher("resnet18", weights_path=str(path))
    assert torch.equal(teacher.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_local_weights_of_the_wrong_architecture_or_garbage(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises((CheckpointError, RuntimeError)):
        build_teacher("resnet18", weights_path=str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_teacher("resnet18", weights_path=str(junk))
    with pytest.raises(CheckpointError, match="not found"):
        build_teacher("resnet18", weights_path=str(tmp_path / "none.pth"))


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        get_spec("vgg16")


def test_failed_download_suggests_teacher_weights(tmp_path: Path) -> None:
    """A real failed download: an empty torch cache and a proxy on a closed loopback port."""
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    code = "from training.backbones import build_teacher\nbuild_teacher('resnet18')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--teacher-weights" in proc.stderr and "could not download resnet18" in proc.stderr
