"""End to end through the CLI: ``rdedge pretrain`` -> ``rdedge train --aux`` -> ``rdedge evaluate``; the inference
model holds no auxiliary weight and scores identically once the SimCLR folder is gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from export.cli import main
from training.backbones import get_spec
from training.build import build_model, load_model
from training.checkpoint import load_checkpoint
from training.data import discover
from training.demo_data import make_demo_data
from training.evaluate import predict
from training.scoring import build_scoring

SIZE = "64"


@pytest.fixture(scope="module")
def aux_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("aux")
    data = make_demo_data(tmp, n_train=10, n_test_good=3, n_test_defect=1, size=64)
    simclr, run = tmp / "simclr", tmp / "run"
    common = ["--data", str(data), "--image-size", SIZE, "--batch-size", "4", "--epochs", "1", "--no-progress"]
    assert main(["pretrain", *common, "--out", str(simclr), "--init", "imagenet", "--augment", "no-flip"]) == 0
    assert main(["train", *common, "--out", str(run), "--aux", str(simclr)]) == 0
    return data, simclr, run


def test_pretrain_writes_checkpoint_and_log(aux_run: tuple[Path, Path, Path]) -> None:
    _, simclr, _ = aux_run
    ckpt = torch.load(simclr / "simclr.pt", weights_only=True)
    assert ckpt["format"] == "rdedge-simclr" and ckpt["init"] == "imagenet" and ckpt["augment"]["name"] == "no-flip"
    record = json.loads((simclr / "log.jsonl").read_text().splitlines()[0])
    assert {"epoch", "loss", "top1"} <= set(record) and 0.0 <= record["top1"] <= 1.0


def test_checkpoint_keeps_the_auxiliary_apart(aux_run: tuple[Path, Path, Path]) -> None:
    _, _, run = aux_run
    ckpt = load_checkpoint(run)
    model, cfg, _ = load_model(run)
    assert cfg.model.projection == "aux"
    expected = set(build_model(cfg, pretrained=False).state_dict())
    assert set(ckpt["model"]) == expected  # teacher, projection, OCBE, decoder: nothing else
    assert not any(k.startswith(("aux", "adapters")) for k in ckpt["model"])
    assert ckpt["aux"]["kind"] == "aux" and ckpt["aux"]["backbone"] == "efficientnet_lite0"
    assert set(ckpt["aux"]) == {"kind", "simclr_dir", "backbone", "adapters"}  # no backbone weights
    assert ckpt["aux"]["adapters"] == {}  # same architecture as the teacher: identity adapters
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "align" in log[0] and "kd" in log[0]


def test_scores_identical_without_the_simclr_folder(aux_run: tuple[Path, Path, Path]) -> None:
    data, simclr, run = aux_run
    spec = get_spec("efficientnet_lite0")
    samples = discover(data, need_test=True).test

    def scores() -> torch.Tensor:
        model, cfg, ckpt = load_model(run)
        scoring = build_scoring(ckpt["scoring"], spec.channels, (64, 64), cfg.model.sigma)  # the chosen recipe
        pred = predict(model, scoring, samples, (64, 64), spec.mean, spec.std, torch.device("cpu"), keep_maps=False)
        return torch.from_numpy(pred.scores)

    before = scores()
    shutil.rmtree(simclr)
    after = scores()
    assert torch.equal(before, after)


def test_evaluate_cli(aux_run: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, _, run = aux_run
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "image_auroc" in out and "overall" in out
