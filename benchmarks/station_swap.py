"""Hot swap under load: verdict latency while the station swaps the model, and every seq exactly once.

Runs the service in-process with the station page on (real mosquitto on a free loopback port, a paho subscriber,
an image folder replayed as a camera at ``--fps``), logs in as an engineer over HTTP and swaps between two bundles
``--swaps`` times, ``--gap`` seconds apart (each swap: load + verify + calibration check + warm-up on a worker
thread, then the replacement between two frames). Every result message is read back.

    python benchmarks/station_swap.py --bundle-a A --bundle-b B --images DIR [--fps 10] [--swaps 10]

``frame_to_result`` (grab -> verdict built, from the result messages) is split into frames grabbed during a swap
(from the swap request until the first verdict of the new model) and the others. Writes
``benchmarks/results/station_swap.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.config import parse_config  # noqa: E402
from runtime.service import run_service  # noqa: E402
from runtime.station.auth import UserStore  # noqa: E402
from tests.mqtt_broker import Broker, Collector, free_port  # noqa: E402


def pct(a: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(a), q)), 3) if a else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle-a", type=Path, required=True, help="the bundle the service starts with")
    ap.add_argument("--bundle-b", type=Path, required=True, help="the bundle swapped in (then back, and so on)")
    ap.add_argument("--images", type=Path, required=True, help="image folder replayed in a loop as the camera")
    ap.add_argument("--fps", type=float, default=10.0, help="camera rate (max_fps)")
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--gap", type=float, default=2.0, help="seconds between the end of a swap and the next request")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "station_swap.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s, Broker(Path(tmp_s) / "broker") as broker:
        tmp = Path(tmp_s)
        bundles = tmp / "bundles"
        shutil.copytree(args.bundle_a, bundles / "a")
        shutil.copytree(args.bundle_b, bundles / "b")
        port = free_port()
        cfg = parse_config({
            "bundle": str(bundles / "a"), "backend": {"threads": args.threads},
            "cameras": [{"name": "cam0", "max_fps": args.fps,
                         "source": {"kind": "folder", "path": str(args.images.resolve()), "loop": True}}],
            "mqtt": {"host": broker.host, "port": broker.port, "device_id": "bench", "stats_interval_s": 5},
            "spool": {"path": str(tmp / "spool.sqlite3"), "min_free_mb": 0},
            "ui": {"enabled": True, "port": port, "state_dir": str(tmp / "state"), "bundles_dir": str(bundles),
                   "archive": {"dir": str(tmp / "archive")}},
        })  # fmt: skip
        users = UserStore(cfg.ui.state_dir / "users.sqlite3")
        users.add("bench", "engineer", "bench-password")
        users.close()
        col = Collector(broker, ["rdedge/bench/+/result"])
        stop = threading.Event()
        svc = threading.Thread(target=run_service, args=(cfg, stop), daemon=True)
        svc.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/login", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the station page did not come up")
            time.sleep(0.2)
        c = httpx.Client(base_url=url, timeout=30)
        r = c.post("/api/login", json={"user": "bench", "password": "bench-password"})
        c.headers["X-CSRF-Token"] = r.json()["csrf"]
        time.sleep(args.gap * 2)  # steady state first
        windows: list[tuple[float, float]] = []  # wall-clock (request, first verdict of the new model)
        swap_ms: list[float] = []
        for i in range(args.swaps):
            target = "b" if i % 2 == 0 else "a"
            want = c.get("/api/models").json()["bundles"]
            want_id = next(b["model_id"] for b in want if b["name"] == target)
            n0 = len(col.on("/result"))
            t_req = time.time()
            assert c.post("/api/models/swap", json={"name": target}).status_code == 200
            while c.get("/api/models").json()["state"] != "idle":
                time.sleep(0.02)
            swap_ms.append((time.time() - t_req) * 1e3)
            while True:  # first verdict of the new model (same model id when a and b are copies: the next one)
                new = [json.loads(p) for p in col.on("/result")[n0:]]
                hit = [m for m in new if m["model_id"] == want_id and m["ts"] > t_req + swap_ms[-1] / 1e3]
                if hit:
                    windows.append((t_req, hit[0]["ts"]))
                    break
                time.sleep(0.02)
            time.sleep(args.gap)
        live = c.get("/api/live").json()
        last = live["cameras"]["cam0"]["last"]["seq"]
        deadline = time.monotonic() + 30
        while max((json.loads(p)["seq"] for p in col.on("/result")), default=0) < last:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stop.set()
        svc.join(15)
        col.close()

    results = [json.loads(p) for p in col.on("/result")]
    results = [m for m in results if m["seq"] <= last]
    counts = collections.Counter(m["seq"] for m in results)
    during, steady = [], []
    for m in results:
        lat = m["latency_ms"]["frame_to_result"]
        (during if any(a <= m["frame_ts"] <= b for a, b in windows) else steady).append(lat)
    by_seq = [m["model_id"] for m in sorted(results, key=lambda m: m["seq"])]
    doc = {
        "date": dt.date.today().isoformat(),
        "bundle_a": str(args.bundle_a), "bundle_b": str(args.bundle_b), "images": str(args.images),
        "fps_paced": args.fps, "threads": args.threads, "swaps": args.swaps, "gap_s": args.gap,
        "verdicts": len(results), "last_seq": last,
        "every_seq_once": sorted(counts) == list(range(1, last + 1)) and max(counts.values()) == 1,
        "missing": sorted(set(range(1, last + 1)) - set(counts)),
        "duplicated": sorted(s for s, n in counts.items() if n > 1),
        "model_id_changes": sum(1 for i in range(1, len(by_seq)) if by_seq[i] != by_seq[i - 1]),
        "swap_request_to_idle_ms": {"p50": pct(swap_ms, 50), "max": round(max(swap_ms), 1) if swap_ms else None},
        "frame_to_result_ms_during_swaps": {"p50": pct(during, 50), "p99": pct(during, 99), "max": pct(during, 100),
                                            "n": len(during)},
        "frame_to_result_ms_steady": {"p50": pct(steady, 50), "p99": pct(steady, 99), "n": len(steady)},
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0 if doc["every_seq_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
