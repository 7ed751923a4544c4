"""``rdedge demo``: synthetic data -> short training -> evaluation report -> bundle -> runtime on a replayed camera.

Everything lands under ``--dir`` (default ``./rdedge-demo``): ``data/synthetic`` (MVTec layout), ``run/``
(checkpoints), ``report/index.html``, ``bundle/`` and ``camera/`` (the test images, flat, named
``<truth>_<n>.png``, replayed once in sorted order). Without ``--mqtt`` the verdicts come from
``runtime.engine.AnomalyModel`` directly; with ``--mqtt HOST:PORT`` the same frames also go through the real
runtime service (``runtime.service.run_service``: folder camera, spool in the demo dir) and a subscriber counts the
``result`` messages that arrive.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import ExportError

log = logging.getLogger(__name__)

DEMO_DEVICE_ID = "demo"
DEMO_CAMERA = "cam0"


@dataclass
class DemoOptions:
    """Options of ``rdedge demo``; the defaults take a few minutes on two CPU cores."""

    dir: Path = Path("rdedge-demo")
    mqtt: str | None = None
    epochs: int = 4
    image_size: int = 128
    n_train: int = 72
    val_fraction: float = 0.25
    threads: int = 2
    seed: int = 0


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:1883"`` -> ``("127.0.0.1", 1883)``; raises ExportError naming the value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExportError(f"--mqtt must be HOST:PORT (e.g. 127.0.0.1:1883), got {text!r}")
    return host.strip("[]"), int(port)


def make_camera_folder(category: Path, camera_dir: Path) -> dict[str, str]:
    """Copy ``category/test/<truth>/*.png`` to ``camera_dir/<truth>_<name>``; returns file name -> truth."""
    if camera_dir.exists():
        shutil.rmtree(camera_dir)
    camera_dir.mkdir(parents=True)
    truth = {}
    for sub in sorted(d for d in (category / "test").iterdir() if d.is_dir()):
        for img in sorted(sub.glob("*.png")):
            name = f"{sub.name}_{img.name}"
            shutil.copyfile(img, camera_dir / name)
            truth[name] = sub.name
    return truth


def run_demo(opts: DemoOptions, emit: Callable[[str], None] = print) -> int:
    """Run the whole demo, writing the lines a user reads through ``emit``; returns the exit code."""
    import cv2
    import torch

    from export.pipeline import ExportOptions, export_bundle
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.config import load_train_config
    from training.demo_data import make_demo_data
    from training.evaluate import evaluate, format_table
    from training.train import fit

    hostport = parse_hostport(opts.mqtt) if opts.mqtt else None
    torch.set_num_threads(opts.threads)
    root = Path(opts.dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    emit(f"[1/5] synthetic data -> {root / 'data'}")
    category = make_demo_data(root / "data", n_train=opts.n_train, size=opts.image_size, seed=opts.seed)
    emit(f"[2/5] training efficientnet_lite0 RD, {opts.epochs} epoch(s) at {opts.image_size}px on CPU")
    cfg = load_train_config(
        None,
        {"model.backbone": "efficientnet_lite0", "optim.epochs": opts.epochs, "optim.batch_size": 8,
         "data.image_size": opts.image_size, "data.val_fraction": opts.val_fraction, "seed": opts.seed,
         "device": "cpu"},
    )  # fmt: skip
    run_dir = root / "run"
    fit(cfg, category, run_dir, show_progress=False)
    emit("[3/5] evaluating on the test split")
    metrics = evaluate(run_dir, category, root / "report", "cpu", 16, show_progress=False)
    emit(format_table(metrics))
    op = metrics.get("at_validation_threshold")
    if op:
        emit(f"      at the validation threshold: test false-alarm rate {op['false_alarm_rate']:.3f}, "
             f"recall {op['recall']:.3f}")  # fmt: skip
    emit("[4/5] exporting the bundle (ONNX parts, parity checks, threshold from the validation split)")
    bundle, manifest = export_bundle(ExportOptions(run=run_dir, out=root / "bundle", force=True, fused=True))
    emit(f"      model {manifest.model_id}, threshold {manifest.threshold.value:.5f} ({manifest.threshold.source})")

    emit("[5/5] runtime on the test images replayed as a camera (folder source, once)")
    camera = root / "camera"
    truth = make_camera_folder(category, camera)
    correct, latencies = 0, []
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=opts.threads)) as model:
        model.warmup(2)
        for name in sorted(truth):
            frame = cv2.imread(str(camera / name), cv2.IMREAD_COLOR)
            if frame is None:
                raise ExportError(f"unreadable demo image: {camera / name}")
            pred = model.predict(frame)
            latencies.append(pred.timings_ms["total"])
            verdict = "NG" if pred.is_ng else "OK"
            ok = pred.is_ng == (truth[name] != "good")
            correct += ok
            emit(f"  {name:<18} score {pred.score:8.5f}  {verdict}  truth {truth[name]:<8}{'' if ok else '  (wrong)'}")
    lat = np.asarray(latencies)
    emit(
        f"summary: {correct}/{len(truth)} correct ({correct / len(truth):.1%}) at the calibrated threshold "
        f"{manifest.threshold.value:.5f}; latency per frame p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms (onnxruntime CPU, {opts.threads} threads)"
    )
    if hostport is not None:
        received = publish_through_service(bundle, camera, root, hostport, opts.threads, len(truth))
        emit(
            f"mqtt: the runtime service published {received}/{len(truth)} results to "
            f"{hostport[0]}:{hostport[1]} (topic rdedge/{DEMO_DEVICE_ID}/{DEMO_CAMERA}/result)"
        )
        if received < len(truth):
            emit("mqtt: not every result arrived; check the broker and the log above")
            return 1
    emit(f"report: {root / 'report' / 'index.html'}")
    emit(f"bundle: {bundle}")
    emit(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def publish_through_service(
    bundle: Path, camera: Path, root: Path, hostport: tuple[str, int], threads: int, expected: int
) -> int:
    """Run ``runtime.service.run_service`` on the camera folder; return how many results a subscriber received."""
    try:
        from runtime import service
    except ImportError as exc:
        raise ExportError(
            f"--mqtt needs the runtime service (runtime.service), which is not available: {exc}"
        ) from None
    import paho.mqtt.client as mqtt

    from runtime.config import (
        BackendConfig,
        CameraConfig,
        FolderSource,
        MqttConfig,
        RuntimeConfig,
        SpoolConfig,
    )

    host, port = hostport
    cfg = RuntimeConfig(
        bundle=bundle,
        backend=BackendConfig(kind="onnxruntime", threads=threads),
        cameras=[CameraConfig(name=DEMO_CAMERA, source=FolderSource(path=camera, loop=False, pattern="*.png"))],
        mqtt=MqttConfig(host=host, port=port, device_id=DEMO_DEVICE_ID, password_env=None, password_credential=None),
        spool=SpoolConfig(path=root / "spool.sqlite3"),
    )
    for stale in root.glob("spool.sqlite3*"):  # a fresh spool: count only this run's results
        stale.unlink()
    seqs: set[int] = set()
    done = threading.Event()
    topic = f"{cfg.mqtt.topic_prefix}/{DEMO_DEVICE_ID}/{DEMO_CAMERA}/result"  # type: ignore[union-attr]

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            seqs.add(int(json.loads(msg.payload)["seq"]))
        except (ValueError, KeyError, TypeError):
            log.warning("malformed result message on %s", msg.topic)
        if len(seqs) >= expected:
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rdedge-demo-subscriber")
    sub.on_message = on_message
    sub.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    try:
        sub.connect(host, port)
    except OSError as exc:
        raise ExportError(f"--mqtt {host}:{port}: cannot connect to the broker: {exc}") from None
    sub.loop_start()
    try:
        time.sleep(0.3)
        service.run_service(cfg)
        done.wait(timeout=10.0)
    finally:
        sub.loop_stop()
        sub.disconnect()
    return len(seqs)
