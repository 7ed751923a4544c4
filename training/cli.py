"""Training verbs: ``make-demo-data``, ``train``, ``evaluate``, ``pretrain``. torch is imported when a verb runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the training verbs to the ``rdedge`` parser."""
