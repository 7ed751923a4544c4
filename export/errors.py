"""Errors raised by ``export``: subclasses of :class:`runtime.errors.RdedgeError`, so the CLI prints one line."""

from __future__ import annotations

from types import ModuleType

from runtime.errors import MissingExtraError, RdedgeError

__all__ = ["ExportError", "MissingExtraError", "ParityError", "require"]


class ExportError(RdedgeError):
    """The export cannot go on (bad option, bad run, existing bundle, unsupported opset); the message says why."""


class ParityError(ExportError):
    """An exported graph disagrees with the torch model beyond the documented tolerance."""


def require(module: str, extra: str = "export", purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``rdedge[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from None
