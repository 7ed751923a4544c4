"""Deployment files: the systemd unit, install.sh, the example config and the broker configuration.

Everything runs for real: ``systemd-analyze verify`` on the unit, ``shellcheck`` and the installer itself into a
temporary root (never into ``/``), ``rdedge check-config`` on the example, and a TLS mosquitto started from
``deploy/mosquitto.conf`` with the ACL exercised by real clients. Tools that are not installed skip their test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from runtime.config import RuntimeConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "rdedge.service"
INSTALL = DEPLOY / "install.sh"
EXAMPLE = DEPLOY / "config.example.yaml"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)

# The binary the unit starts is not installed on a test box; systemd-analyze says so in these words.
TOLERATED_VERIFY = ("is not executable", "No such file or directory")


# ----------------------------------------------------------------------------------------------------- helpers


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; repeated keys (After=, Environment=) are kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set exactly once, found {found}"
    return found[0]


def run_install(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert proc.returncode == 0, f"install.sh {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def steps(output: str) -> list[str]:
    """The '+ command' lines install.sh prints for every step."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every path under ``root`` with its mode, mtime and content (or link target)."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            content: bytes | str = os.readlink(path)
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = ""
        out[str(path.relative_to(root))] = (oct(st.st_mode), st.st_mtime_ns, content)
    return out


def make_bundle(where: Path, model_id: str = "demo-rd", salt: str = "a") -> Path:
    """A directory that looks enough like a bundle for the installer (it only reads manifest.json)."""
    where.mkdir(parents=True)
    (where / "manifest.json").write_text(f'{{"model_id": "{model_id}", "salt": "{salt}"}}\n', encoding="utf-8")
    (where / "teacher.onnx").write_bytes(b"not really onnx")
    return where


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# ------------------------------------------------------------------------------------------------ systemd unit


def _verify(unit_path: Path) -> list[str]:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies() -> None:
    complaints = _verify(UNIT)
    bad = [line for line in complaints if not any(t in line for t in TOLERATED_VERIFY)]
    assert not bad, "systemd-analyze verify deploy/rdedge.service:\n" + "\n".join(bad)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_unit_verifies_without_any_complaint(root: Path, tmp_path: Path) -> None:
    # Point --venv at a host path that holds an executable 'rdedge', so verify has nothing left to tolerate.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "rdedge"
    fake.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    fake.chmod(0o755)
    run_install("--root", root, "--skip-pip", "--no-systemctl", "--venv", venv)
    installed = root / "etc/systemd/system/rdedge.service"
    assert f"ExecStart={venv}/bin/rdedge run --config /etc/rdedge/config.yaml" in installed.read_text()
    assert _verify(installed) == []


def test_unit_settings() -> None:
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    svc = "Service"
    assert one(unit, svc, "Type") == "notify"
    assert one(unit, svc, "NotifyAccess") == "main"
    assert int(one(unit, svc, "WatchdogSec")) > 0
    assert one(unit, svc, "Restart") == "on-failure"
    assert int(one(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(one(unit, "Unit", "StartLimitBurst")) > 0
    # the runtime exits within 5 s of SIGTERM: systemd must give it at least that before SIGKILL
    assert int(one(unit, svc, "TimeoutStopSec")) > 5

    start = one(unit, svc, "ExecStart").split()
    pre = one(unit, svc, "ExecStartPre").split()
    assert start[0] == pre[0] == "/opt/rdedge/venv/bin/rdedge"
    assert start[1:] == ["run", "--config", "/etc/rdedge/config.yaml"]
    assert pre[1:] == ["check-config", "--strict", "/etc/rdedge/config.yaml"]  # on the box: files must exist

    assert one(unit, svc, "User") == "rdedge"
    assert "video" in one(unit, svc, "SupplementaryGroups").split()
    assert one(unit, svc, "StateDirectory") == "rdedge"
    assert one(unit, svc, "LoadCredential") == "mqtt-password:/etc/rdedge/mqtt-password"
    for key, want in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "StandardOutput": "journal",
    }.items():
        assert one(unit, svc, key) == want, key
    assert "PYTHONUNBUFFERED=1" in values(unit, svc, "Environment")
    # these would hide /dev/video*, /dev/nvidia*, /dev/nvhost-*, /dev/nvmap from the service
    assert values(unit, svc, "PrivateDevices") in ([], ["no"])
    assert values(unit, svc, "DevicePolicy") == [] and values(unit, svc, "DeviceAllow") == []
    assert values(unit, svc, "ProtectClock") == []  # implies DeviceAllow=char-rtc: a closed device policy
    assert "multi-user.target" in one(unit, "Install", "WantedBy")


def test_example_config_writes_only_where_the_unit_allows() -> None:
    """ProtectSystem=strict leaves only StateDirectory/CacheDirectory/ReadWritePaths writable."""
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    writable = [Path("/var/lib") / d for d in one(unit, "Service", "StateDirectory").split()]
    writable += [Path("/var/cache") / d for d in values(unit, "Service", "CacheDirectory")]
    writable += [Path(p.lstrip("-")) for v in values(unit, "Service", "ReadWritePaths") for p in v.split()]
    cfg = load_config(EXAMPLE)
    assert cfg.spool.path == Path("/var/lib/rdedge/spool.sqlite3")
    assert cfg.alerts.save_dir is not None
    for path in (cfg.spool.path, cfg.alerts.save_dir):
        assert any(path.is_relative_to(w) for w in writable), f"{path} is read-only under the unit"
    assert cfg.mqtt is not None and cfg.mqtt.password_credential == "mqtt-password"


# ---------------------------------------------------------------------------------------------------- install.sh


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_prints_every_step_and_changes_nothing(root: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n", encoding="utf-8")
    before = snapshot(root)

    proc = run_install("--dry-run", "--root", root, "--bundle", bundle)

    assert snapshot(root) == before
    out = proc.stdout
    assert "platform=jetson" in out  # detected from <root>/etc/nv_tegra_release
    cmds = steps(out)
    joined = "\n".join(cmds)
    venv = f"{root}/opt/rdedge/venv"
    assert f"-m venv --system-site-packages {venv}" in joined
    assert re.search(rf"pip install --constraint \S+ '{REPO}\[jetson\]'", joined), joined
    assert f"{venv}/bin/python -m pip list --format=freeze | grep -i ^opencv" in joined
    assert "import cv2; print(cv2.__file__)" in joined and "import tensorrt; print(tensorrt.__file__)" in joined
    assert re.search(rf"cp -a {bundle} {root}/opt/rdedge/bundles/demo-rd-[0-9a-f]{{12}}\.partial", joined)
    assert re.search(rf"{venv}/bin/rdedge build-engines {root}/opt/rdedge/bundles/demo-rd-", joined)
    assert f"mv -T {root}/opt/rdedge/bundles/current.new {root}/opt/rdedge/bundles/current" in joined
    assert f"install -m 0640 {EXAMPLE} {root}/etc/rdedge/config.yaml" in joined
    assert f"{venv}/bin/rdedge check-config {root}/etc/rdedge/config.yaml" in joined
    assert re.search(rf"install -m 0644 \S+/rdedge.service {root}/etc/systemd/system/rdedge.service", joined)
    assert f"systemctl --root={root} enable rdedge.service" in joined
    # the steps come in the documented order
    order = ["-m venv", "pip install", "cp -a", "build-engines", "config.yaml", "rdedge.service", "systemctl"]
    positions = [next(i for i, c in enumerate(cmds) if word in c) for word in order]
    assert positions == sorted(positions), cmds


def test_dry_run_cpu_box_uses_cpu_extra_and_builds_no_engines(root: Path, tmp_path: Path) -> None:
    proc = run_install("--dry-run", "--root", root, "--bundle", make_bundle(tmp_path / "b"), "--platform", "cpu")
    joined = "\n".join(steps(proc.stdout))
    assert f"pip install '{REPO}[cpu]'" in joined and "jetson" not in joined
    assert "build-engines" not in joined
    assert "import cv2, onnxruntime" in joined
    assert list(root.iterdir()) == []


def test_dry_run_gpu_box_uses_trt_extra(root: Path) -> None:
    proc = run_install("--dry-run", "--root", root, "--gpu")
    joined = "\n".join(steps(proc.stdout))
    assert f"pip install '{REPO}[cpu,trt]'" in joined
    assert "import cv2, onnxruntime, tensorrt" in joined


def test_install_into_root_is_idempotent_and_keeps_the_config(root: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    first = run_install("--root", root, "--skip-pip", "--no-systemctl", "--bundle", bundle)
    assert steps(first.stdout), first.stdout

    unit = root / "etc/systemd/system/rdedge.service"
    config = root / "etc/rdedge/config.yaml"
    assert unit.read_text() == UNIT.read_text()  # default venv: installed verbatim
    assert config.read_text() == EXAMPLE.read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert oct((root / "etc/rdedge").stat().st_mode & 0o777) == "0o750"
    current = root / "opt/rdedge/bundles/current"
    assert current.is_symlink() and (current / "manifest.json").is_file()
    assert re.fullmatch(r"demo-rd-[0-9a-f]{12}", os.readlink(current))
    assert not list((root / "opt/rdedge/bundles").glob("*.partial"))

    # second run with the same inputs: nothing to do
    before = snapshot(root)
    second = run_install("--root", root, "--skip-pip", "--no-systemctl", "--bundle", bundle)
    assert steps(second.stdout) == [], second.stdout
    assert snapshot(root) == before

    # an operator edited the config; a new install must not overwrite it
    config.write_text(EXAMPLE.read_text() + "# edited on site\n", encoding="utf-8")
    other = tmp_path / "line2.yaml"
    other.write_text(EXAMPLE.read_text().replace("line1-cell3", "line2-cell1"), encoding="utf-8")
    third = run_install("--root", root, "--skip-pip", "--no-systemctl", "--config", other)
    assert config.read_text().endswith("# edited on site\n")
    assert (root / "etc/rdedge/config.yaml.new").read_text() == other.read_text()
    assert "config.yaml.new" in third.stdout


def test_bundle_upgrade_switches_current_and_leaves_the_spool_alone(root: Path, tmp_path: Path) -> None:
    spool = root / "var/lib/rdedge/spool.sqlite3"
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"SQLite format 3\x00 queued verdicts")
    state_before = snapshot(root / "var")

    run_install("--root", root, "--skip-pip", "--no-systemctl", "--bundle", make_bundle(tmp_path / "v1", salt="1"))
    first = os.readlink(root / "opt/rdedge/bundles/current")
    out = run_install(
        "--root", root, "--skip-pip", "--no-systemctl", "--bundle", make_bundle(tmp_path / "v2", salt="2")
    ).stdout
    second = os.readlink(root / "opt/rdedge/bundles/current")

    assert first != second
    assert (root / "opt/rdedge/bundles" / first / "manifest.json").is_file()  # kept for a rollback
    assert f"ln -sfn {first} /opt/rdedge/bundles/current" in out  # the rollback command is printed
    assert snapshot(root / "var") == state_before


def test_uninstall_removes_unit_keeps_data_and_purge_removes_all(root: Path, tmp_path: Path) -> None:
    run_install("--root", root, "--skip-pip", "--no-systemctl", "--bundle", make_bundle(tmp_path / "b"))
    (root / "var/lib/rdedge").mkdir(parents=True)
    (root / "var/lib/rdedge/spool.sqlite3").write_bytes(b"spool")
    (root / "opt/rdedge/venv/bin").mkdir(parents=True)  # what a real install leaves
    (root / "opt/rdedge/venv/pyvenv.cfg").write_text("include-system-site-packages = true\n", encoding="utf-8")
    (root / "usr/bin").mkdir(parents=True)  # --venv pointing at something that is not a venv: left alone

    refused = run_install("--uninstall", "--root", root, "--no-systemctl", "--venv", "/usr")
    assert (root / "usr/bin").is_dir() and "not removing it" in refused.stdout
    run_install("--uninstall", "--root", root, "--no-systemctl")
    assert not (root / "etc/systemd/system/rdedge.service").exists()
    assert not (root / "opt/rdedge/venv").exists()
    assert (root / "etc/rdedge/config.yaml").is_file()
    assert (root / "var/lib/rdedge/spool.sqlite3").read_bytes() == b"spool"
    assert (root / "opt/rdedge/bundles/current/manifest.json").is_file()

    again = run_install("--uninstall", "--root", root, "--no-systemctl")  # idempotent
    assert steps(again.stdout) == []

    run_install("--uninstall", "--purge", "--root", root, "--no-systemctl")
    for gone in ("etc/rdedge", "var/lib/rdedge", "opt/rdedge"):
        assert not (root / gone).exists(), gone


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_enable_in_alternate_root_uses_systemctl_root(root: Path) -> None:
    run_install("--root", root, "--skip-pip")
    wants = root / "etc/systemd/system/multi-user.target.wants/rdedge.service"
    assert wants.is_symlink()
    run_install("--uninstall", "--root", root)
    assert not wants.exists() and not wants.is_symlink()


def test_bad_arguments_are_refused(root: Path, tmp_path: Path) -> None:
    assert run_install("--root", root, "--bogus", check=False).returncode != 0
    assert run_install("--root", root, "--bundle", tmp_path, check=False).returncode != 0  # no manifest.json
    assert run_install("--root", root, "--venv", "relative/venv", check=False).returncode != 0
    assert run_install("--root", root, "--venv", "/opt/../usr", check=False).returncode != 0
    assert run_install("--root", root, "--venv", "/", check=False).returncode != 0
    assert run_install("--root", root, "--purge", check=False).returncode != 0
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------------------------------------ example config


def test_example_config_validates() -> None:
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, RuntimeConfig)
    assert cfg.backend.kind == "tensorrt"
    src = cfg.cameras[0].source
    assert src.kind == "gstreamer" and src.pipeline.startswith("nvarguscamerasrc")
    assert "appsink" in src.pipeline
    assert cfg.mqtt is not None and cfg.mqtt.port == 8883 and cfg.mqtt.tls is not None
    assert cfg.mqtt.username == cfg.mqtt.device_id  # deploy/mosquitto.acl keys devices on %u
    assert cfg.bundle == Path("/opt/rdedge/bundles/current")  # where install.sh puts the active bundle


def _commented_sources(text: str) -> list[str]:
    """The commented-out ``source:`` alternatives of the first camera, uncommented."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"^ {4}# ?(.*)$", line)
        body = m.group(1) if m else None
        if body is not None and body.startswith("source:"):
            current = [body]
            blocks.append(current)
        elif current is not None and body is not None and body.startswith("  "):
            current.append(body)
        else:
            current = None
    return ["\n".join(b) for b in blocks]


def test_example_config_commented_alternatives_validate() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    base = yaml.safe_load(text)
    alternatives = _commented_sources(text)
    kinds = []
    for block in alternatives:
        source = yaml.safe_load(block)["source"]
        data = {**base, "cameras": [{**base["cameras"][0], "source": source}]}
        kinds.append(parse_config(data, "alternative").cameras[0].source.kind)
    assert sorted(kinds) == ["gstreamer", "gstreamer", "rtsp", "v4l2"], alternatives


def _rdedge() -> list[str]:
    exe = Path(sys.executable).parent / "rdedge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "export.cli"]


def test_example_config_passes_check_config_cli() -> None:
    probe = subprocess.run([*_rdedge(), "check-config", "--help"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("'rdedge check-config' is not available yet (runtime/cli.py); load_config is tested above")
    proc = subprocess.run(
        [*_rdedge(), "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The unit runs it with --strict: on this box the example's bundle and CA do not exist, so that must fail
    # and name the fields (that is what stops a half-installed box from starting).
    if Path("/opt/rdedge/bundles/current/manifest.json").exists():
        pytest.skip("this box has an installed bundle")
    strict = subprocess.run(
        [*_rdedge(), "check-config", "--strict", str(EXAMPLE)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert strict.returncode != 0
    assert "bundle" in strict.stdout + strict.stderr


# -------------------------------------------------------------------------------------------------- mosquitto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@pytest.fixture()
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """deploy/mosquitto.conf with its paths pointed into tmp, a fresh CA and server cert, three users."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed")
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl / mosquitto_passwd not installed")
    d = tmp_path / "broker"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=test-ca", "-keyout", d / "ca.key", "-out", d / "ca.crt")
    _openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", d / "server.key", "-out", d / "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n", encoding="utf-8")
    _openssl(
        "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", d / "san.ext", "-out", d / "server.crt",
    )  # fmt: skip
    passwd = d / "passwd"
    for i, (user, pw) in enumerate([("scada", "scada-pw"), ("line1", "line1-pw"), ("line2", "line2-pw")]):
        flags = ["-c", "-b"] if i == 0 else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwd), user, pw], check=True, timeout=30)
    shutil.copy(DEPLOY / "mosquitto.acl", d / "mosquitto.acl")

    port = _free_port()
    replacements = {
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^password_file .*$": f"password_file {passwd}",
        r"^acl_file .*$": f"acl_file {d / 'mosquitto.acl'}",
        r"^persistence_location .*$": f"persistence_location {d}/",
        r"^cafile .*$": f"cafile {d / 'ca.crt'}",
        r"^certfile .*$": f"certfile {d / 'server.crt'}",
        r"^keyfile .*$": f"keyfile {d / 'server.key'}",
        r"^log_dest syslog$": "log_dest stderr",
    }
    conf = (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8")
    for pattern, repl in replacements.items():
        conf, n = re.subn(pattern, repl, conf, flags=re.M)
        assert n == 1, f"deploy/mosquitto.conf should have exactly one line matching {pattern}"
    if os.geteuid() == 0:
        conf += "user root\n"  # otherwise mosquitto drops to 'mosquitto', which cannot read the tmp files
    (d / "mosquitto.conf").write_text(conf, encoding="utf-8")

    log = (d / "mosquitto.log").open("w")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "mosquitto exited:\n" + (d / "mosquitto.log").read_text()
        yield port, d / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


class _Client:
    """A paho client over TLS that records what it receives."""

    def __init__(self, port: int, ca: Path, user: str | None, password: str | None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.reason: object = None
        self.granted: list[int] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}")
        self.c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("localhost", port)
        self.c.loop_start()

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.reason = reason
        self.connected.set()

    def _on_subscribe(self, _c: object, _u: object, _mid: int, codes: list[object], _p: object) -> None:
        self.granted = [int(getattr(rc, "value", rc)) for rc in codes]  # type: ignore[call-overload]
        self.subscribed.set()

    def ok(self) -> bool:
        assert self.connected.wait(5), "no CONNACK"
        return not getattr(self.reason, "is_failure", True)

    def subscribe(self, topic: str) -> list[int]:
        self.subscribed.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)
        return self.granted

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_mosquitto_conf_loads_and_acl_confines_devices(tls_broker: tuple[int, Path]) -> None:
    port, ca = tls_broker
    anonymous = _Client(port, ca, None, None)
    wrong = _Client(port, ca, "line1", "not-the-password")
    scada = _Client(port, ca, "scada", "scada-pw")
    line1 = _Client(port, ca, "line1", "line1-pw")
    line2 = _Client(port, ca, "line2", "line2-pw")
    try:
        assert not anonymous.ok(), "allow_anonymous false"
        assert not wrong.ok(), "password_file is enforced"
        assert scada.ok() and line1.ok() and line2.ok()

        scada.subscribe("rdedge/#")
        line1.subscribe("rdedge/line1/+/trigger")
        line2.subscribe("rdedge/line1/#")  # another device's topics: must receive nothing

        line1.publish("rdedge/line1/status", b"online")
        line1.publish("rdedge/line1/cam0/result", b"ok")
        line1.publish("rdedge/line1/cam0/alert/image", b"\xff\xd8jpeg")
        line1.publish("rdedge/line1/cam0/reply/scada", b"reply")  # a v5 response topic below its own id
        line1.publish("rdedge/line2/cam0/result", b"forged by line1")  # outside its own id
        scada.publish("rdedge/line1/cam0/trigger", b"inspect")
        scada.publish("rdedge/line1/cam0/result", b"forged by scada")  # scada writes triggers only
        line2.publish("rdedge/line1/cam0/trigger", b"trigger from another device")
        time.sleep(1.0)

        got_scada = {(t, p) for t, p in scada.messages}
        assert ("rdedge/line1/status", b"online") in got_scada
        assert ("rdedge/line1/cam0/result", b"ok") in got_scada
        assert ("rdedge/line1/cam0/alert/image", b"\xff\xd8jpeg") in got_scada
        assert ("rdedge/line1/cam0/trigger", b"inspect") in got_scada
        assert ("rdedge/line1/cam0/reply/scada", b"reply") in got_scada
        assert not any(b"forged" in p for _, p in got_scada), got_scada
        assert not any(b"another device" in p for _, p in got_scada)

        assert line1.messages == [("rdedge/line1/cam0/trigger", b"inspect")]
        assert line2.messages == []
    finally:
        for c in (anonymous, wrong, scada, line1, line2):
            c.close()
