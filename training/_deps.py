"""Lazy import of the heavy training dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from training.errors import MissingExtraError


def require(module: str, extra: str = "train", purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``rdedge[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
