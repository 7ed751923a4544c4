"""The line interfaces: no torch, each extra optional with an error naming it, and a clean SIGTERM of all of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import parse_config
from runtime.errors import MissingExtraError

ROOT = Path(__file__).resolve().parents[3]

NO_TORCH = """
import sys
sys.modules["torch"] = None
import runtime.outputs, runtime.outputs.modbus, runtime.outputs.opcua, runtime.outputs.sparkplug
import runtime.outputs.sparkplug_pb, runtime.sources, runtime.sources.genicam
assert sys.modules["torch"] is None
heavy = {"torch", "torchvision", "timm", "training", "export"}
bad = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in heavy)
assert not bad, bad
print("ok")
"""


def test_line_interfaces_import_without_torch() -> None:
    res = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def _cfg(section: str, extra: dict[str, object]) -> object:
    cams = [{"name": "c", "mode": "triggered", "source": {"kind": "folder", "path": "x"}}]
    return parse_config({"bundle": "b", "mqtt": None, "cameras": cams, section: {"enabled": True, **extra}})


@pytest.mark.parametrize(
    ("module", "cls", "section", "extra", "blocked"),
    [
        ("runtime.outputs.modbus", "ModbusOutput", "modbus", {}, "pymodbus"),
        ("runtime.outputs.opcua", "OpcUaOutput", "opcua", {"allow_anonymous": True}, "asyncua"),
        ("runtime.outputs.sparkplug", "SparkplugOutput", "sparkplug", {}, "google.protobuf"),
    ],
)
def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, module: str, cls: str, section: str, extra: dict[str, object], blocked: str
) -> None:
    import importlib

    cfg = _cfg(section, extra)
    mod = importlib.import_module(module)
    monkeypatch.setitem(sys.modules, blocked, None)
    if section == "sparkplug":  # forget an earlier import so the blocked protobuf is really reached
        import runtime.outputs

        monkeypatch.delitem(sys.modules, "runtime.outputs.sparkplug_pb", raising=False)
        monkeypatch.delattr(runtime.outputs, "sparkplug_pb", raising=False)
    with pytest.raises(MissingExtraError, match=rf"pip install 'rdedge\[{section}\]'"):
        getattr(mod, cls)(cfg)


def test_genicam_without_gi_names_the_extra_and_the_apt_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.sources.genicam import load_aravis

    monkeypatch.setitem(sys.modules, "gi", None)
    with pytest.raises(MissingExtraError) as exc:
        load_aravis()
    assert "gir1.2-aravis-0.8" in str(exc.value) and "rdedge[genicam]" in str(exc.value)


def test_sections_are_off_by_default_and_errors_name_the_field() -> None:
    cfg = parse_config({"bundle": "b", "cameras": [{"name": "c", "source": {"kind": "folder", "path": "x"}}]})
    assert not (cfg.modbus.enabled or cfg.opcua.enabled or cfg.sparkplug.enabled)
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"opcua\.security\.0"):
        _cfg("opcua", {"allow_anonymous": True, "security": ["basic128"]})
    with pytest.raises(ConfigError, match=r"sparkplug\.group_id"):
        _cfg("sparkplug", {"group_id": "a/b"})
    with pytest.raises(ConfigError, match=r"opcua\.users\.0"):
        _cfg("opcua", {"users": [{"name": "u"}]})
