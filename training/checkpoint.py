"""Checkpoints: a plain dict of state_dicts plus the validated config and the seed (loaded with ``weights_only=True``).

Keys: ``format``, ``version``, ``config`` (TrainConfig as a plain dict), ``seed``, ``epoch``, ``model`` (the
inference model's state_dict: teacher, projection, OCBE, decoder), ``aux`` (training-only auxiliary weights or
``None``: never part of the inference model), ``optimizer`` (list of optimiser state_dicts), ``best_val_loss``,
``split`` (validation file names, for threshold calibration), ``step``, ``best_signal``, ``best_step``, ``history``
(the validation signal per evaluation) and ``scoring`` (the chosen :class:`~training.scoring.ScoreRecipe`, channel
statistics and density head; ``None`` -> the RD paper's scoring).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.errors import CheckpointError

FORMAT = "rdedge-checkpoint"
VERSION = 2  # 2: steps, validation signal, 'scoring'; decoder sized to the teacher (signed outputs)
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp + rename) so an interrupted save never leaves a truncated checkpoint."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a foreign or corrupt file raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"no {BEST} or {LAST} in run folder {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        raise CheckpointError(f"{path}: not a readable rdedge checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rdedge checkpoint (no format={FORMAT!r} key)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')} is not supported (want {VERSION}); it was written by an "
            "older rdedge whose decoder differs: retrain with this version"
        )
    return ckpt
