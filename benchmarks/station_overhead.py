"""What the station costs the scoring thread: time of ``Station.on_verdict`` per verdict (counters, Prometheus
series, latest-value slot, archive queue offer), with the worker threads running.

    python benchmarks/station_overhead.py [--n 20000] [--size 640x480] [--ng-every 10]

Writes ``benchmarks/results/station_overhead.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.config import parse_config  # noqa: E402
from runtime.outputs import VerdictEvent  # noqa: E402
from runtime.station.output import Station  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--ng-every", type=int, default=10, help="one NG (archived) verdict per this many")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "station_overhead.json")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config({"bundle": "b", "mqtt": None, "cameras": [{"name": "cam0", "source": {"kind": "folder",
                            "path": "."}}], "ui": {"enabled": True, "state_dir": f"{tmp}/st", "live_fps": 5,
                            "archive": {"dir": f"{tmp}/a", "max_mb": 64}}})  # fmt: skip
        st = Station(cfg)
        st.live.start()
        st.archive.start()
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        amap = rng.random((256, 256), dtype=np.float32)
        per: list[float] = []
        t_start = time.perf_counter()
        for i in range(args.n):
            ng = i % args.ng_every == 0
            ev = VerdictEvent("cam0", i + 1, i, time.time(), time.time(), 2.0 if ng else 0.5, 1.0, ng, "m", None,
                              {"total": 10.0}, img, amap)  # fmt: skip
            t0 = time.perf_counter()
            st.on_verdict(ev)
            per.append((time.perf_counter() - t0) * 1e6)
            time.sleep(0.0005)  # a verdict stream, not a tight loop: let the worker threads run
        wall = time.perf_counter() - t_start
        a = np.asarray(per)
        doc = {"date": dt.date.today().isoformat(), "verdicts": args.n, "frame": args.size, "ng_every": args.ng_every,
               "on_verdict_us": {"p50": round(float(np.percentile(a, 50)), 2),
                                 "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 1)},
               "live_frames_encoded": st.live.cams["cam0"].frames_encoded, "archive_written": st.archive.written,
               "archive_dropped": st.archive.dropped, "wall_s": round(wall, 2), "cpu_count": os.cpu_count(),
               "load_average": list(os.getloadavg())}  # fmt: skip
        st.live.close()
        st.archive.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
