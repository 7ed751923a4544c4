"""Runtime service configuration: YAML -> pydantic v2, unknown keys rejected, every field described.

Errors name the field path (``cameras.0.source.kind``) so ``rdedge check-config`` can print exactly what is wrong.
Secrets (MQTT password) never live in the YAML: they come from an environment variable or a file in systemd's
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import ConfigError


def resolve_secret(credential: str | None, env: str | None) -> str | None:
    """A secret from ``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``) first, then ``$<env>``."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and credential:
        path = Path(cred_dir) / credential
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    if env and os.environ.get(env):
        return os.environ[env]
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Strict):
    """Which inference backend runs the bundle."""

    kind: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="onnxruntime (CPU, or CUDA with onnxruntime-gpu) or tensorrt (GPU boxes, Jetson)"
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="onnxruntime execution device; tensorrt is always cuda")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for onnxruntime; 0 lets it choose")
    fused: bool = Field(False, description="run the bundle's fused single graph instead of the chained parts")
    spinning: bool = Field(
        False,
        description="onnxruntime CPU: intra-op worker threads busy-wait for work instead of sleeping. Saves the "
        "thread wake-up on every frame of a paced camera (measured inside `rdedge run` at 256 px, fused graph, 2 "
        "cores: 20.9 -> 18.8 ms p50 inference) but keeps a core busy (2.1x the CPU per verdict); on a small box it "
        "can starve the capture and MQTT threads, most with several chained sessions. Off unless measured on your "
        "box (README, Latency and footprint)",
    )
    cuda_graph: bool = Field(False, description="tensorrt: capture the chain in a CUDA graph after warm-up")
    gpu_id: int = Field(0, ge=0, description="CUDA device ordinal")
    allow_failed_int8: bool = Field(
        False,
        description="load an int8 bundle whose parts failed the export's score-parity rule (manifest.int8.accepted "
        "false); without it such a bundle is refused",
    )


class RoiConfig(_Strict):
    """Crop applied to every frame before resizing, in source pixels."""

    x: int = Field(..., ge=0, description="left edge")
    y: int = Field(..., ge=0, description="top edge")
    width: int = Field(..., gt=0, description="crop width")
    height: int = Field(..., gt=0, description="crop height")


class V4L2Source(_Strict):
    kind: Literal["v4l2"] = "v4l2"
    device: int | str = Field(0, description="V4L2 index (0) or device path (/dev/video0)")
    width: int | None = Field(None, gt=0, description="requested capture width")
    height: int | None = Field(None, gt=0, description="requested capture height")
    fps: float | None = Field(None, gt=0, description="requested capture rate")


class GStreamerSource(_Strict):
    kind: Literal["gstreamer"] = "gstreamer"
    pipeline: str = Field(
        ...,
        min_length=1,
        description="GStreamer pipeline ending in appsink, e.g. Jetson CSI: "
        "'nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1920,height=1080 ! nvvidconv ! "
        "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1'",
    )


class RtspSource(_Strict):
    kind: Literal["rtsp"] = "rtsp"
    url: str = Field(..., pattern=r"^rtsps?://", description="rtsp:// or rtsps:// URL (credentials may be inline)")


class VideoFileSource(_Strict):
    kind: Literal["video"] = "video"
    path: Path = Field(..., description="video file readable by OpenCV")
    loop: bool = Field(False, description="start again at the end instead of stopping")
    realtime: bool = Field(True, description="pace frames at the file's frame rate (False: as fast as possible)")


class FolderSource(_Strict):
    kind: Literal["folder"] = "folder"
    path: Path = Field(..., description="folder of images, read in sorted order")
    loop: bool = Field(False, description="start again after the last image (False: 'once', then the camera ends)")
    pattern: str = Field("*", description="glob filter, e.g. '*.png'")


class GenICamSource(_Strict):
    """A GigE Vision / USB3 Vision camera through Aravis (``rdedge[genicam]``; docs/genicam.md)."""

    kind: Literal["genicam"] = "genicam"
    camera_id: str | None = Field(
        None, description="Aravis device id ('<vendor>-<serial>'), serial number or IP address; default: the first"
    )
    pixel_format: Literal["Mono8", "Mono16", "RGB8", "BGR8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8"] | None = (
        Field(None, description="GenICam PixelFormat to set; default: leave the camera's (Mono16 is scaled to 8 bit)")
    )
    exposure_us: float | None = Field(None, gt=0, description="ExposureTime in microseconds (auto exposure off)")
    gain: float | None = Field(None, ge=0, description="Gain in the camera's units (usually dB; auto gain off)")
    frame_rate: float | None = Field(None, gt=0, description="AcquisitionFrameRate in free-run (frames/s)")
    trigger: Literal["free_run", "software", "hardware"] = Field(
        "free_run",
        description="free_run: the camera streams; software: each rdedge trigger fires TriggerSoftware (camera "
        "mode: triggered); hardware: the camera exposes on an edge of trigger_line (camera mode: continuous)",
    )
    trigger_line: str = Field("Line0", min_length=1, description="TriggerSource for hardware trigger")
    buffers: int = Field(4, ge=2, le=64, description="stream buffers queued in the driver")
    packet_size: int | None = Field(None, ge=576, le=16384, description="GigE Vision packet size (jumbo frames)")


CameraSource = Annotated[
    V4L2Source | GStreamerSource | RtspSource | VideoFileSource | FolderSource | GenICamSource,
    Field(discriminator="kind"),
]


class CameraConfig(_Strict):
    """One camera: where frames come from and how often to inspect them."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="camera id, used in MQTT topics")
    source: CameraSource = Field(..., description="frame source; 'kind' selects v4l2/gstreamer/rtsp/video/folder")
    mode: Literal["continuous", "triggered"] = Field(
        "continuous", description="continuous: inspect every fresh frame; triggered: inspect on an MQTT trigger"
    )
    roi: RoiConfig | None = Field(None, description="optional crop before resizing")
    max_fps: float | None = Field(None, gt=0, description="inspect at most this many frames per second")
    no_frame_timeout_s: float = Field(5.0, gt=0, description="report the camera down after this long without a frame")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first reopen delay after a failure")
    reconnect_max_s: float = Field(30.0, gt=0, description="cap of the exponential reopen backoff")

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        if isinstance(self.source, GenICamSource) and self.source.trigger == "software" and self.mode != "triggered":
            raise ValueError("source.trigger: software needs mode: triggered (each trigger fires the camera)")
        return self


class TlsConfig(_Strict):
    """TLS to the broker. Paths are read at start-up."""

    ca_file: Path = Field(..., description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname verification (test rigs only)")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(_Strict):
    """Broker connection and topic layout: ``<topic_prefix>/<device_id>/...`` (see docs/mqtt.md)."""

    host: str = Field("localhost", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual for TLS)")
    client_id: str | None = Field(None, description="MQTT client id; default rdedge-<device_id>")
    device_id: str = Field("rdedge", pattern=r"^[A-Za-z0-9_-]+$", description="this box's id, the second topic level")
    topic_prefix: str = Field("rdedge", pattern=r"^[A-Za-z0-9_/-]+$", description="first topic level(s)")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of result and alert messages")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    username: str | None = Field(None, description="broker user name")
    password_env: str | None = Field(
        "RDEDGE_MQTT_PASSWORD", description="environment variable holding the password (if set)"
    )
    password_credential: str | None = Field(
        "mqtt-password", description="file name in $CREDENTIALS_DIRECTORY holding the password (systemd LoadCredential)"
    )
    tls: TlsConfig | None = Field(None, description="TLS settings; omit for plain TCP")
    stats_interval_s: float = Field(10.0, gt=0, description="how often to publish <prefix>/<device>/stats")
    reconnect_max_s: float = Field(30.0, gt=0, description="cap of the broker reconnect backoff")
    max_inflight: int = Field(20, ge=1, le=65535, description="QoS>0 messages in flight before waiting for PUBACKs")
    refused_probe_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="while the broker refuses a topic (failure PUBACK, e.g. 135 Not authorized), send one message "
        "on it per this many seconds to ask again; the others go straight to the spool's dead-letter table",
    )

    def resolve_password(self) -> str | None:
        """Password from ``$CREDENTIALS_DIRECTORY/<password_credential>`` first, then ``$<password_env>``."""
        return resolve_secret(self.password_credential, self.password_env)


class SpoolConfig(_Strict):
    """On-disk SQLite spool: every verdict is written here before it is published, deleted on PUBACK."""

    path: Path = Field(Path("/var/lib/rdedge/spool.sqlite3"), description="SQLite file (StateDirectory under systemd)")
    max_messages: int = Field(100_000, ge=1, description="bound on queued messages; overflow drops the oldest")
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0, description="messages older than this are dropped (counted)")
    min_free_mb: float = Field(
        64.0,
        ge=0,
        le=1_000_000,
        description="free space (MiB) to keep on the spool's file system for the OS, journald and SQLite's own "
        "bookkeeping; the SQLite WAL's growth up to its checkpoint (~4 MiB) is set aside on top. A verdict that would "
        "eat into it is not stored: the service exits non-zero (everything stored so far stays intact); stats "
        "spool.verdicts_fit says how many more fit. 0: write until SQLite reports the disk full",
    )


class AlertsConfig(_Strict):
    """What to do with NG verdicts beyond the result message."""

    save_dir: Path | None = Field(None, description="save heatmap overlay JPEGs of NG frames here")
    max_saved: int = Field(1000, ge=1, description="keep at most this many overlays (oldest deleted)")
    publish_image: bool = Field(False, description="publish the overlay JPEG on <camera>/alert/image")
    jpeg_quality: int = Field(85, ge=10, le=100, description="overlay JPEG quality")


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level (journald)")
    json_lines: bool = Field(False, description="log one JSON object per line instead of text")


class StationArchiveConfig(_Strict):
    """The station's NG archive: NG and borderline frames with overlay, raw crop and metadata (docs/station.md)."""

    dir: Path = Field(Path("/var/lib/rdedge/archive"), description="archive folder (one .jpg/.png/.json per frame)")
    max_mb: float = Field(2048.0, gt=0, le=10_000_000, description="disk quota (MiB); the oldest frames go first")
    queue_size: int = Field(16, ge=1, le=4096, description="frames waiting for the writer thread; more are dropped")
    borderline_margin: float = Field(
        0.1, ge=0, le=1, description="also archive OK frames scoring at least (1 - margin) * threshold"
    )
    good_dir: Path | None = Field(None, description="review 'false reject' copies the raw frame here (the good set)")
    labelled_dir: Path | None = Field(
        None, description="review copies the raw frame to <labelled_dir>/good or /defect (rdedge label-tune --labelled)"
    )
    jpeg_quality: int = Field(85, ge=10, le=100, description="overlay JPEG quality")


class StationTlsConfig(_Strict):
    """HTTPS for the station page (otherwise plain HTTP; keep it on loopback or behind a reverse proxy)."""

    cert_file: Path = Field(..., description="PEM certificate (chain)")
    key_file: Path = Field(..., description="PEM private key")


class StationConfig(_Strict):
    """The station page (``rdedge[ui]``): live view, counters, NG archive and review, threshold tool, /metrics."""

    enabled: bool = Field(False, description="serve the station page from the service process")
    host: str = Field("127.0.0.1", min_length=1, description="bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    state_dir: Path = Field(
        Path("/var/lib/rdedge/station"), description="users, audit log (SQLite) and the threshold override sidecar"
    )
    live_fps: float = Field(2.0, gt=0, le=10, description="JPEG-encode at most this many live frames/s per camera")
    jpeg_quality: int = Field(75, ge=10, le=100, description="live view JPEG quality")
    history: int = Field(5000, ge=10, le=1_000_000, description="recent scores per camera kept for the threshold tool")
    shifts: list[str] = Field(
        ["06:00", "14:00", "22:00"], min_length=1, description="local shift start times HH:MM (per-shift counters)"
    )
    session_ttl_s: float = Field(8 * 3600.0, gt=0, description="a login lasts this long")
    login_max_failures: int = Field(5, ge=1, le=1000, description="failed logins per user or address per window")
    login_window_s: float = Field(300.0, gt=0, description="login rate-limit window (s)")
    max_request_kb: int = Field(64, ge=1, le=1_048_576, description="larger request bodies are refused (413)")
    tls: StationTlsConfig | None = Field(None, description="serve HTTPS with this certificate")
    bundles_dir: Path | None = Field(
        None, description="bundles offered for a hot swap, one folder each (default <state_dir>/bundles)"
    )
    archive: StationArchiveConfig = Field(default_factory=StationArchiveConfig, description="NG archive")
    teach_dir: Path | None = Field(
        None, description="teach mode writes <teach_dir>/<name>/train/good/*.png and runs (default <state_dir>/teach)"
    )
    teach_image_size: int = Field(256, ge=64, le=1024, multiple_of=32, description="teach: training image side (px)")
    teach_steps: int = Field(1000, ge=1, le=1_000_000, description="teach: training steps on this box")

    @field_validator("shifts")
    @classmethod
    def _hhmm(cls, shifts: list[str]) -> list[str]:
        for s in shifts:
            hh, _, mm = s.partition(":")
            if not (len(hh) == 2 and len(mm) == 2 and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                raise ValueError(f"shift start {s!r} is not HH:MM (00:00 .. 23:59)")
        if len(set(shifts)) != len(shifts):
            raise ValueError("shift start times must be unique")
        return sorted(shifts)


class ModbusConfig(_Strict):
    """Modbus TCP server for the PLC (``rdedge[modbus]``): register map v1 and handshake in docs/modbus.md."""

    enabled: bool = Field(False, description="serve the register map from the service process")
    host: str = Field("127.0.0.1", min_length=1, description="bind address; 0.0.0.0 exposes it to the line network")
    port: int = Field(502, ge=1, le=65535, description="TCP port (502 is the Modbus port; needs CAP_NET_BIND_SERVICE)")
    camera: str | None = Field(
        None, description="the triggered camera the PLC trigger bit fires (default: the first triggered camera)"
    )
    score_scale: float = Field(
        10000.0, gt=0, le=1e9, description="score and threshold registers hold round(value * score_scale) as uint32"
    )
    heartbeat_s: float = Field(0.5, gt=0, le=60, description="the heartbeat register advances this often (s)")


class OpcUaUser(_Strict):
    """One OPC UA user; the password comes from an environment variable or a systemd credential, never the YAML."""

    name: str = Field(..., min_length=1, max_length=64, description="user name")
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_credential: str | None = Field(None, description="file name in $CREDENTIALS_DIRECTORY holding it")

    @model_validator(mode="after")
    def _one_source(self) -> OpcUaUser:
        if self.password_env is None and self.password_credential is None:
            raise ValueError("give password_env or password_credential")
        return self

    def resolve_password(self) -> str | None:
        """Password from ``$CREDENTIALS_DIRECTORY/<password_credential>`` first, then ``$<password_env>``."""
        return resolve_secret(self.password_credential, self.password_env)


class OpcUaConfig(_Strict):
    """OPC UA server (``rdedge[opcua]``) shaped after OPC 40100 Machine Vision (docs/opcua.md)."""

    enabled: bool = Field(False, description="serve the OPC UA address space from the service process")
    host: str = Field("127.0.0.1", min_length=1, description="bind address (the endpoint URL uses it)")
    port: int = Field(4840, ge=1, le=65535, description="TCP port (4840 is the OPC UA port)")
    allow_anonymous: bool = Field(False, description="accept anonymous sessions (off: users only)")
    users: list[OpcUaUser] = Field([], description="accepted user names and where their passwords come from")
    security: list[Literal["none", "basic256sha256_sign", "basic256sha256_sign_encrypt"]] = Field(
        ["none", "basic256sha256_sign_encrypt"], min_length=1, description="offered security policies / modes"
    )
    cert_dir: Path = Field(
        Path("/var/lib/rdedge/opcua"), description="server certificate + key; made on first start if absent"
    )
    namespace: str = Field("urn:rdedge:machinevision", min_length=1, description="namespace URI of rdedge's nodes")

    @model_validator(mode="after")
    def _someone(self) -> OpcUaConfig:
        if self.enabled and not self.allow_anonymous and not self.users:
            raise ValueError("no user can log in: add users or set allow_anonymous: true")
        return self


class SparkplugConfig(_Strict):
    """Sparkplug B edge node for SCADA (``rdedge[sparkplug]``): one device per camera (docs/sparkplug.md)."""

    enabled: bool = Field(False, description="publish Sparkplug B from the service process")
    host: str = Field("localhost", min_length=1, description="broker host (Sparkplug's own MQTT 3.1.1 session)")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    username: str | None = Field(None, description="broker user name")
    password_env: str | None = Field("RDEDGE_SPARKPLUG_PASSWORD", description="environment variable with the password")
    group_id: str = Field("rdedge", pattern=r"^[^/#+]+$", description="Sparkplug group id")
    edge_node_id: str | None = Field(
        None, pattern=r"^[^/#+]+$", description="edge node id (default: mqtt.device_id, else 'rdedge')"
    )
    keepalive_s: int = Field(10, ge=5, le=3600, description="MQTT keepalive; the broker sends NDEATH after 1.5x")
    state_dir: Path = Field(Path("/var/lib/rdedge/sparkplug"), description="bdSeq kept here across restarts")
    spool_max: int = Field(10_000, ge=0, le=1_000_000, description="verdicts kept in memory while offline")
    queue_size: int = Field(1024, ge=1, le=100_000, description="verdicts waiting for the publisher thread")
    reconnect_min_s: int = Field(1, ge=1, le=60, description="first reconnect delay (s) after a broker loss")


class RuntimeConfig(_Strict):
    """Top level of ``/etc/rdedge/config.yaml``."""

    bundle: Path = Field(..., description="bundle directory written by 'rdedge export'")
    backend: BackendConfig = Field(default_factory=BackendConfig, description="inference backend")
    cameras: list[CameraConfig] = Field(..., min_length=1, description="one or more cameras")
    mqtt: MqttConfig | None = Field(default_factory=MqttConfig, description="broker; null disables publishing")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="at-least-once delivery spool")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="NG overlays")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="logging")
    ui: StationConfig = Field(default_factory=StationConfig, description="station page (off by default)")
    modbus: ModbusConfig = Field(default_factory=ModbusConfig, description="Modbus TCP server for the PLC (off)")
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig, description="OPC UA server (off by default)")
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig, description="Sparkplug B (off by default)")
    threshold: float | None = Field(None, description="override the bundle's calibrated threshold (score units)")
    trusted_keys: list[Path] | None = Field(
        None,
        min_length=1,
        description="ed25519 public key files ('rdedge keygen' writes KEY.pub); when set, a bundle whose "
        "manifest.sig does not verify under one of them (unsigned, altered after signing, or signed by another key) "
        "is refused at start-up and by 'check-config --strict'. Unset: signatures are not required",
    )

    @field_validator("cameras")
    @classmethod
    def _unique_names(cls, cams: list[CameraConfig]) -> list[CameraConfig]:
        names = [c.name for c in cams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"camera names must be unique; repeated: {', '.join(dupes)}")
        return cams

    @model_validator(mode="after")
    def _line_cameras(self) -> RuntimeConfig:
        triggered = [c.name for c in self.cameras if c.mode == "triggered"]
        if self.modbus.enabled:
            if self.modbus.camera is not None and self.modbus.camera not in triggered:
                raise ValueError(f"modbus.camera: {self.modbus.camera!r} is not a triggered camera ({triggered})")
            if not triggered:
                raise ValueError("modbus.enabled needs a camera with mode: triggered (the PLC trigger fires it)")
        return self


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per error: ``<file>: <field.path>: <message> (got <value>)``."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = err.get("input")
        shown = repr(got) if not isinstance(got, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source}: {path}: {err['msg']} (got {shown})")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> RuntimeConfig:
    """Validate an already-parsed mapping; raises :class:`ConfigError` naming every bad field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> RuntimeConfig:
    """Read and validate a YAML config file. Relative paths inside stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
