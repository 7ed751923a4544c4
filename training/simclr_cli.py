"""``rdedge pretrain``: SimCLR pretraining of the auxiliary backbone (see :mod:`training.simclr`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``pretrain`` to the ``rdedge`` parser."""
