"""A real mosquitto broker for tests: free loopback port, optional TLS (test-made CA) and password file.

Usage::

    broker = Broker(tmp_path)            # plain TCP, anonymous
    broker.start()
    ...
    broker.stop(); broker.start()        # same port again (outage simulation)

    certs = make_certs(tmp_path / "pki") # CA, server cert (127.0.0.1/localhost), client cert, via the openssl CLI
    broker = Broker(tmp_path, tls=certs, users={"line1": "s3cret"})

Tests skip (with the reason) when ``/usr/sbin/mosquitto`` is not installed; CI installs the Debian package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = os.environ.get("RDEDGE_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def mosquitto_missing() -> str | None:
    """Why broker tests cannot run here, or ``None`` when they can."""
    if not os.access(MOSQUITTO, os.X_OK):
        return f"mosquitto not installed at {MOSQUITTO} (apt-get install mosquitto)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """PEM files made by :func:`make_certs`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(out_dir: Path) -> Certs:
    """Make a throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate (EC P-256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=rdedge-test-ca",
             cwd=out_dir)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (out_dir / f"{name}.ext").write_text(ext)
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=rdedge-{name}",
                 cwd=out_dir)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=out_dir)  # fmt: skip
    for key in out_dir.glob("*.key"):
        key.chmod(0o644)  # mosquitto may run as another user in containers
    return Certs(
        ca=out_dir / "ca.crt",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
        client_cert=out_dir / "client.crt",
        client_key=out_dir / "client.key",
    )


class Broker:
    """One mosquitto process on ``127.0.0.1:<port>``; :meth:`stop` then :meth:`start` reuses the port."""

    def __init__(
        self,
        work_dir: Path,
        *,
        tls: Certs | None = None,
        users: dict[str, str] | None = None,
        require_client_cert: bool = True,
        port: int | None = None,
        persistence: bool = False,
    ) -> None:
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.users = users
        self.require_client_cert = require_client_cert
        self.persistence = persistence
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "mosquitto.log"
        self.conf_path = work_dir / "mosquitto.conf"
        self._write_conf()

    def _write_conf(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1", f"log_dest file {self.log_path}", "log_type all",
                 "max_inflight_messages 0", "max_queued_messages 0"]  # fmt: skip
        if self.persistence:  # subscribers' sessions survive a restart (the runtime itself relies on its spool)
            lines += ["persistence true", f"persistence_location {self.work_dir}/"]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read pytest's 0700 tmp dirs
        if self.users is not None:
            passwd = self.work_dir / "passwd"
            passwd.unlink(missing_ok=True)
            for i, (user, pw) in enumerate(self.users.items()):
                flags = ["-b", "-c"] if i == 0 else ["-b"]
                subprocess.run([MOSQUITTO_PASSWD, *flags, str(passwd), user, pw], check=True, capture_output=True)
            passwd.chmod(0o644)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.require_client_cert else 'false'}",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto and wait until the port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.2):
                        return self
                except OSError:
                    time.sleep(0.05)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.stop()
            if time.monotonic() >= deadline:
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {err}\n{log}")
            time.sleep(0.2)  # port still held by the previous process: retry

    def stop(self) -> None:
        """Terminate mosquitto (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def log(self) -> str:
        """The broker's log so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Collector:
    """A paho (v2 API, MQTT v5) subscriber that records every message, for assertions.

    ``messages`` holds ``(topic, payload, retain, properties)`` in arrival order.
    """

    def __init__(self, broker: Broker, topics: list[str], *, tls: Certs | None = None,
                 user: tuple[str, str] | None = None, session: str | None = None) -> None:  # fmt: skip
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.messages: list[tuple[str, bytes, bool, object]] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._subscribed = threading.Event()
        # session: a fixed client id with a persistent session (with a Broker(persistence=True), messages
        # published while this subscriber is away, even across a broker restart, are queued for it)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=session or "", protocol=MQTTProtocolVersion.MQTTv5
        )
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key))
        if user is not None:
            self.client.username_pw_set(*user)
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        props = None
        if session is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, keepalive=10, clean_start=session is None, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("collector could not subscribe")

    def _on_connect(self, client, userdata, flags, rc, props) -> None:  # type: ignore[no-untyped-def]
        for t in self.topics:
            client.subscribe(t, qos=1)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties))
            self._cond.notify_all()

    def on(self, topic_suffix: str) -> list[bytes]:
        """Payloads of messages whose topic ends with ``topic_suffix``."""
        with self._lock:
            return [p for t, p, _r, _pr in self.messages if t.endswith(topic_suffix)]

    def wait_for(self, pred: object, timeout: float = 10.0) -> bool:
        """Wait until ``pred()`` is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():  # type: ignore[operator]
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def publish(self, topic: str, payload: bytes | str, **kw: object) -> None:
        self.client.publish(topic, payload, qos=1, **kw).wait_for_publish(5)  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
