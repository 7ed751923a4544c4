"""Inference backends behind one small interface (:class:`runtime.backends.base.Backend`).

Each backend module imports its heavy dependency (onnxruntime, tensorrt + cuda-python) lazily, so importing this package
costs nothing and works on a box that has only one of them.
"""

from runtime.backends.base import Backend, create_backend

__all__ = ["Backend", "create_backend"]
