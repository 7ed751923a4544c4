"""Runtime verbs: ``run``, ``check-config``, ``bench``. No torch here."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the runtime verbs to the ``rdedge`` parser."""
