"""Runtime end to end on a real broker: cold start to first verdict, frame -> delivered latency, peak RSS.

Starts mosquitto on a free loopback port, a paho subscriber, and ``rdedge run`` as a real subprocess on an image
folder replayed as a camera at ``--fps`` (so frames are not queued), then reads every result message.

    python benchmarks/runtime_e2e.py --bundle BUNDLE --images DIR [--fps 10] [--threads 2] [--fused] [--spinning]

Latencies: ``latency_ms.total`` = preprocess + inference (decoded frame in, score out); ``frame_to_result`` = grab
-> verdict built; ``delivered`` = grab -> the subscriber received the message (on loopback the PUBACK reaches the
runtime about as fast). Cold start = process launch -> first result received. Peak RSS of the runtime process
from ``getrusage(RUSAGE_CHILDREN)``. Writes ``benchmarks/results/runtime_e2e.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.mqtt_broker import Broker, Collector  # noqa: E402  (real mosquitto helpers shared with the tests)


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q)) if a else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused", action="store_true", help="backend.fused: run the bundle's fused graph")
    ap.add_argument("--spinning", action="store_true", help="backend.spinning: ORT worker threads busy-wait")
    ap.add_argument("--stats-interval", type=float, default=2.0, help="mqtt.stats_interval_s of the service")
    ap.add_argument(
        "--broker-nagle",
        action="store_true",
        help="leave mosquitto's Nagle on (its default); without it the broker runs with set_tcp_nodelay true, as "
        "deploy/mosquitto.conf ships, and the subscriber's socket has TCP_NODELAY",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, Broker(Path(tmp) / "broker") as broker:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(
            f"bundle: {args.bundle.resolve()}\n"
            f"backend: {{kind: onnxruntime, threads: {args.threads}, fused: {str(args.fused).lower()}, "
            f"spinning: {str(args.spinning).lower()}}}\n"
            f"cameras:\n  - name: cam0\n    max_fps: {args.fps}\n"
            f"    source: {{kind: folder, path: {args.images.resolve()}, loop: false}}\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}, device_id: bench, "
            f"stats_interval_s: {args.stats_interval}}}\n"
            f"spool: {{path: {tmp}/spool.sqlite3}}\n"
        )
        if not args.broker_nagle:  # as deploy/mosquitto.conf: else a result after a stats message waits ~40 ms
            broker.stop()
            with open(broker.conf_path, "a") as f:
                f.write("set_tcp_nodelay true\n")
            broker.start()
        got: list[tuple[float, dict]] = []
        col = Collector(broker, ["rdedge/#"])
        if not args.broker_nagle:
            col.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        col_on_message = col._on_message

        def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
            if msg.topic.endswith("/result"):
                got.append((time.time(), json.loads(msg.payload)))
            col_on_message(client, userdata, msg)

        col.client.on_message = on_message
        time.sleep(0.5)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "export.cli", "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=900, cwd=REPO,
        )  # fmt: skip
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the `rdedge run` process (mosquitto still runs)
        rss_mb = usage.ru_maxrss / 1024
        service_wall_s = time.time() - t0
        service_cpu_s = usage.ru_utime + usage.ru_stime
        time.sleep(1.0)
        stats = [json.loads(p) for p in col.on("/stats")]
        col.client.disconnect()
        col.client.loop_stop()
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    n_images = len([p for p in args.images.iterdir() if p.is_file()])
    total = [m["latency_ms"]["total"] for _, m in got]
    f2r = [m["latency_ms"]["frame_to_result"] for _, m in got]
    delivered = [(t - m["frame_ts"]) * 1000 for t, m in got]
    res = {
        "date": time.strftime("%Y-%m-%d"), "bundle": str(args.bundle), "images": str(args.images),
        "n_images": n_images, "n_results": len(got), "seqs_unique": len({m["seq"] for _, m in got}),
        "fps_paced": args.fps, "threads": args.threads,
        "fused": args.fused, "spinning": args.spinning, "broker_tcp_nodelay": not args.broker_nagle,
        "cold_start_to_first_verdict_s": (got[0][0] - t0) if got else None,
        "inference_ms": {"p50": pct(total, 50), "p99": pct(total, 99)},
        "frame_to_result_ms": {"p50": pct(f2r, 50), "p99": pct(f2r, 99)},
        "frame_to_delivered_ms": {"p50": pct(delivered, 50), "p99": pct(delivered, 99)},
        "frame_to_delivered_after_first_5_ms": {"p50": pct(delivered[5:], 50), "p99": pct(delivered[5:], 99)},
        "frame_to_delivered_series_ms": [round(d, 3) for d in delivered],
        "peak_rss_mb": rss_mb, "service_wall_s": round(service_wall_s, 2), "service_cpu_s": round(service_cpu_s, 2),
        "service_cpu_ms_per_frame": round(1000 * service_cpu_s / max(1, len(got)), 1),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "last_stats": stats[-1] if stats else None,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_e2e.json").write_text(json.dumps(res, indent=2))
    md = [
        f"# Runtime end to end ({res['date']}, {res['cpu_count']} cores, onnxruntime CPU, {args.threads} threads)",
        "",
        f"bundle `{args.bundle.name}`, {n_images} images replayed at {args.fps} fps, real mosquitto on loopback; "
        f"{len(got)} results received ({res['seqs_unique']} distinct seq).",
        "",
        "| measure | p50 | p99 |",
        "|---|---|---|",
        f"| inference (preprocess + model, decoded frame in -> score) ms | {res['inference_ms']['p50']:.1f} | "
        f"{res['inference_ms']['p99']:.1f} |",
        f"| frame grabbed -> verdict ms | {res['frame_to_result_ms']['p50']:.1f} | "
        f"{res['frame_to_result_ms']['p99']:.1f} |",
        f"| frame grabbed -> delivered to a subscriber ms | {res['frame_to_delivered_ms']['p50']:.1f} | "
        f"{res['frame_to_delivered_ms']['p99']:.1f} |",
        f"| same, after the first 5 frames (the first waits for the broker connection) | "
        f"{res['frame_to_delivered_after_first_5_ms']['p50']:.1f} | "
        f"{res['frame_to_delivered_after_first_5_ms']['p99']:.1f} |",
        "",
        f"Cold start (process launch -> first result received): {res['cold_start_to_first_verdict_s']:.2f} s. "
        f"Peak RSS of the runtime process: {rss_mb:.0f} MB; its CPU time {service_cpu_s:.1f} s over "
        f"{service_wall_s:.1f} s ({res['service_cpu_ms_per_frame']} ms a verdict).",
    ]
    (args.out / "runtime_e2e.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
