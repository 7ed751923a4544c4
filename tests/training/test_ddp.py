"""Multi-process training through torchrun with the gloo backend on CPU (2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from training.checkpoint import BEST, load_checkpoint


def test_torchrun_two_processes_gloo(demo_category: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.train",
        "--data",
        str(demo_category),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    # One evaluation per student (plain RD and RD++ both train by default, in the same process group).
    assert [r["projection"] for r in log] == ["identity", "rdpp"], "only rank 0 logs"
    assert proc.stdout.count("checkpoint_best.pt") == 1, "only rank 0 prints the result"
    ckpt = load_checkpoint(out / BEST)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not any(k.startswith("module.") for k in ckpt["model"]), "rank 0 saves the unwrapped model"
