"""Export verbs: ``export``, ``build-engines``, ``demo``. torch/onnx/tensorrt are imported when a verb runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the export verbs to the ``rdedge`` parser."""
