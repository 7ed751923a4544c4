"""Teach -> train + export on this box (nice 19) -> hot swap, end to end through the station's HTTP API.

The service runs a bundle on a looping folder of good images (the camera); the script logs in as an engineer,
collects ``--n`` frames, starts the on-box train + export, measures the verdict latency while training runs beside
scoring, then swaps the new bundle in and checks the verdicts carry its model id.

    rdedge demo --dir /tmp/demo     # a bundle + synthetic MVTec data
    python benchmarks/station_teach.py --bundle /tmp/demo/bundle --good /tmp/demo/data/synthetic/train/good

Writes ``benchmarks/results/station_teach.json``.
"""

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import httpx  # noqa: E402
import numpy as np  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--bundle", type=Path, required=True)
ap.add_argument("--good", type=Path, required=True, help="folder of good images replayed as the camera")
ap.add_argument("--n", type=int, default=60, help="frames to collect")
ap.add_argument("--steps", type=int, default=24, help="training steps")
ap.add_argument("--image-size", type=int, default=128)
ap.add_argument("--fps", type=float, default=5.0)
ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "station_teach.json")
args = ap.parse_args()
from runtime.config import parse_config  # noqa: E402
from runtime.service import run_service  # noqa: E402
from runtime.station.auth import UserStore  # noqa: E402
from tests.mqtt_broker import Broker, Collector, free_port  # noqa: E402

out = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "bundle": str(args.bundle),
    "good": str(args.good),
    "n": args.n,
    "steps": args.steps,
    "image_size": args.image_size,
    "fps": args.fps,
}
tmp = Path(tempfile.mkdtemp(prefix="ui_teach_"))
with Broker(tmp / "broker") as broker:
    port = free_port()
    cfg = parse_config(
        {
            "bundle": str(args.bundle),
            "backend": {"threads": 2},
            "cameras": [
                {
                    "name": "cam0",
                    "max_fps": args.fps,
                    "source": {"kind": "folder", "path": str(args.good.resolve()), "loop": True},
                }
            ],
            "mqtt": {"host": broker.host, "port": broker.port, "device_id": "teach"},
            "spool": {"path": str(tmp / "spool.sqlite3"), "min_free_mb": 0},
            "ui": {
                "enabled": True,
                "port": port,
                "state_dir": str(tmp / "st"),
                "teach_image_size": args.image_size,
                "teach_steps": args.steps,
                "archive": {"dir": str(tmp / "a")},
            },
        }
    )
    u = UserStore(cfg.ui.state_dir / "users.sqlite3")
    u.add("erik", "engineer", "engineer-pw")
    u.close()
    col = Collector(broker, ["rdedge/teach/+/result"])
    stop = threading.Event()
    t = threading.Thread(target=run_service, args=(cfg, stop), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/login", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    c = httpx.Client(base_url=url, timeout=30)
    c.headers["X-CSRF-Token"] = c.post("/api/login", json={"user": "erik", "password": "engineer-pw"}).json()["csrf"]
    t0 = time.time()
    assert (
        c.post(
            "/api/teach/collect", json={"camera": "cam0", "n": args.n, "name": "demo-teach", "interval_s": 0}
        ).status_code
        == 200
    )
    while c.get("/api/teach").json()["state"] == "collecting":
        time.sleep(0.2)
    out["collect_s"] = round(time.time() - t0, 1)
    out["collected"] = c.get("/api/teach").json()["collected"]
    t1 = time.time()
    r = c.post("/api/teach/train")
    assert r.status_code == 200, r.text
    n_before = len(col.on("/result"))
    while c.get("/api/teach").json()["state"] == "training":
        time.sleep(1)
    st = c.get("/api/teach").json()
    out["train_export_s"] = round(time.time() - t1, 1)
    out["teach_state"] = st["state"]
    out["teach_error"] = st["error"]
    res = [json.loads(p) for p in col.on("/result")]
    during = [m["latency_ms"]["frame_to_result"] for m in res[n_before:]]
    out["verdicts_while_training"] = len(during)
    if during:
        out["frame_to_result_ms_while_training"] = {
            "p50": float(np.percentile(during, 50)),
            "p99": float(np.percentile(during, 99)),
        }
    out["log_tail"] = st["log"][-1500:]
    if st["state"] == "exported":
        old_id = c.get("/api/models").json()["model_id"]
        assert c.post("/api/models/swap", json={"name": "demo-teach"}).status_code == 200
        while c.get("/api/models").json()["state"] != "idle":
            time.sleep(0.2)
        m = c.get("/api/models").json()
        out["swap"] = {"old": old_id, "new": m["model_id"], "error": m["last_error"]}
        time.sleep(2)
        out["last_verdict_model"] = json.loads(col.on("/result")[-1])["model_id"]
    stop.set()
    t.join(15)
    col.close()
import os  # noqa: E402

out["cpu_count"], out["load_average"] = os.cpu_count(), list(os.getloadavg())
print(json.dumps(out, indent=2))
args.out.write_text(json.dumps(out, indent=2) + "\n")
