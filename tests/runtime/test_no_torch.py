"""The runtime never imports torch (a Jetson line box has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import runtime, runtime.engine, runtime.capture, runtime.preprocess, runtime.bench, runtime.overlay
import runtime.backends.onnxruntime, runtime.backends.tensorrt
import runtime.service, runtime.mqtt, runtime.spool, runtime.health, runtime.cli
assert sys.modules["torch"] is None  # still the blocker: nothing replaced it with the real package
heavy = {"torch", "torchvision", "timm", "training", "export"}
bad = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in heavy)
assert not bad, bad
print("ok")
"""


def test_runtime_imports_without_torch() -> None:
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_predict_without_torch(tiny_bundle: Path) -> None:
    code = (
        'import sys; sys.modules["torch"] = None\n'
        "import numpy as np\n"
        "from runtime.engine import AnomalyModel\n"
        "from runtime.config import BackendConfig\n"
        f"with AnomalyModel({str(tiny_bundle)!r}, BackendConfig()) as m:\n"
        "    p = m.predict(np.zeros((64, 64, 3), np.uint8))\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print(p.score)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    float(res.stdout.strip())
