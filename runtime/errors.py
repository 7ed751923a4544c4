"""Errors every rdedge package raises; the CLI turns them into one clear line and an exit code."""

from __future__ import annotations


class RdedgeError(Exception):
    """An error a user can act on: the message names the file, field or value at fault."""

    exit_code = 1


class ConfigError(RdedgeError):
    """A config file or value is invalid; the message carries the field path."""


class DataError(RdedgeError):
    """Input data (folder, image, mask) is missing or unreadable; the message names the path."""


class BundleError(RdedgeError):
    """A bundle is missing, corrupt, tampered with or built for another device."""


class MissingExtraError(RdedgeError):
    """An optional dependency is missing; the message names the ``rdedge[extra]`` to install."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}: pip install 'rdedge[{extra}]'")
        self.package = package
        self.extra = extra
