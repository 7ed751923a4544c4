"""Runtime config: unknown keys and bad values name the field path; secrets from $CREDENTIALS_DIRECTORY or env."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import MqttConfig, load_config, parse_config
from runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"bundle": "/b", "cameras": [{"name": "cam1", "source": {"kind": "folder", "path": "/imgs"}}]}


def test_minimal_config_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.mqtt is not None and cfg.mqtt.qos == 1 and cfg.mqtt.topic_prefix == "rdedge"
    assert cfg.cameras[0].mode == "continuous"
    assert cfg.spool.max_messages == 100_000


def test_example_config_in_deploy_is_valid() -> None:
    example = REPO / "deploy" / "config.example.yaml"
    if not example.is_file():
        pytest.skip("deploy/config.example.yaml not present")
    load_config(example)


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"mqtt": {"hostname": "x"}}, "mqtt.hostname"),
        ({"cameras": [{"name": "cam1", "source": {"kind": "folder", "pth": "/x"}}]}, "cameras.0.source.folder.pth"),
        ({"cameras": [{"name": "bad name", "source": {"kind": "folder", "path": "/x"}}]}, "cameras.0.name"),
        ({"mqtt": {"qos": 3}}, "mqtt.qos"),
        ({"spool": {"max_messages": 0}}, "spool.max_messages"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_errors_name_the_field_path(patch: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, **patch}, "c.yaml")
    assert f"c.yaml: {path}:" in str(exc.value)


def test_duplicate_camera_names_and_tls_pair() -> None:
    cams = [{"name": "a", "source": {"kind": "folder", "path": "/x"}}] * 2
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config({**MINIMAL, "cameras": cams})
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        parse_config({**MINIMAL, "mqtt": {"tls": {"ca_file": "/ca", "cert_file": "/c"}}})


def test_password_from_credentials_directory_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MqttConfig(username="u")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("RDEDGE_MQTT_PASSWORD", raising=False)
    assert cfg.resolve_password() is None
    monkeypatch.setenv("RDEDGE_MQTT_PASSWORD", "from-env")
    assert cfg.resolve_password() == "from-env"
    (tmp_path / "mqtt-password").write_text("from-cred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cfg.resolve_password() == "from-cred"


def test_yaml_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("bundle: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
