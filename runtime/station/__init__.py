"""The station page (``rdedge[ui]``): live view, counters, NG archive and review, threshold tool, /metrics.

Imported only when ``ui.enabled`` is true; without the extra, :func:`create_station` raises an error naming it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from runtime.errors import MissingExtraError

if TYPE_CHECKING:
    from runtime.config import RuntimeConfig
    from runtime.outputs import Output

_NEEDS = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("jinja2", "jinja2"), ("argon2", "argon2-cffi"),
          ("prometheus_client", "prometheus-client"))  # fmt: skip


def require_ui() -> None:
    """Raise :class:`MissingExtraError` (``rdedge[ui]``) when a package of the station page is missing."""
    for module, package in _NEEDS:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(package, "ui", "the station page, ui.enabled") from None


def create_station(cfg: RuntimeConfig) -> Output:
    """The station output for ``cfg`` (``cfg.ui``); raises :class:`MissingExtraError` without ``rdedge[ui]``."""
    require_ui()
    from runtime.station.output import Station

    return Station(cfg)
