"""Shared pytest fixtures. Use them from a ``conftest.py`` by importing them::

from tests.helpers.fixtures import tiny_bundle  # noqa: F401  (pytest finds the fixture by name)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.onnx_bundle import make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 64x64 bundle (five ONNX parts + fused model.onnx + manifest.json), built once per session.

    Treat it as read-only: tests that tamper with files must copy it first (``shutil.copytree``).
    """
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")
