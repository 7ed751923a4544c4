"""Errors raised by ``training`` (kept apart from ``runtime.errors``: training never imports the runtime)."""

from __future__ import annotations


class TrainingError(Exception):
    """An error a user can act on: the message names the file, field or value at fault."""

    exit_code = 1


class DataError(TrainingError):
    """A data folder, image or mask is missing, unreadable or inconsistent; the message names the path."""


class ConfigError(TrainingError):
    """A training config is invalid; the message carries the field path."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, foreign or built for another architecture."""


class MissingExtraError(TrainingError):
    """An optional dependency is missing; the message names the ``rdedge[extra]`` to install."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}: pip install 'rdedge[{extra}]'")
        self.package = package
        self.extra = extra
