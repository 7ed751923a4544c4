"""Where the service's per-frame time goes: the model alone, paced like a camera, and beside a decoding grabber.

``rdedge bench`` runs one frame back to back; ``rdedge run`` sees frames at the camera's rate with a grabber thread
decoding each one. This benchmark scores the same decoded frames through the same :class:`AnomalyModel` (same
backend, threads and bundle) under conditions that add one difference at a time, and reports ``predict`` p50/p99
(preprocess + model) for each:

- ``rdedge_bench``: :func:`runtime.bench.bench` (what ``rdedge bench --image`` runs) on the first image;
- ``back_to_back``: decoded frames, no pause (what ``rdedge bench`` measures, on real frames instead of noise);
- ``paced``: the same frames at ``--fps`` (the CPU idles between frames, as on a line);
- ``paced_decoding``: paced, with a thread decoding the next image file with OpenCV meanwhile (what the folder
  source does in ``rdedge run``);
- ``paced_decoding_nice``: as above with the decoding thread at a lower scheduling priority;
- with ``--e2e``, ``service``: ``benchmarks/runtime_e2e.py`` on the same bundle and folder (real mosquitto, real
  ``rdedge run`` process); its ``inference`` figure is the same ``predict`` measured inside the service.

    python benchmarks/service_overhead.py --bundle BUNDLE --images DIR [--fps 10] [--threads 2] \
        [--fused] [--spinning] [--e2e]

Writes ``benchmarks/results/service_overhead_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.bench import bench  # noqa: E402
from runtime.config import BackendConfig  # noqa: E402
from runtime.engine import AnomalyModel  # noqa: E402

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3), "n": int(a.size)}  # fmt: skip


def _run(model: AnomalyModel, frames: list[np.ndarray], fps: float | None, decode: list[Path] | None,
         nice: bool, rounds: int) -> dict[str, Any]:  # fmt: skip
    stop = threading.Event()
    want = threading.Event()

    def decoder() -> None:
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        i = 0
        while not stop.is_set():
            if want.wait(0.05):
                want.clear()
                assert decode is not None
                cv2.imread(str(decode[i % len(decode)]), cv2.IMREAD_UNCHANGED)
                i += 1

    th = threading.Thread(target=decoder, daemon=True) if decode else None
    if th:
        th.start()
    total: list[float] = []
    model_ms: list[float] = []
    period = 1.0 / fps if fps else 0.0
    nxt = time.perf_counter()
    for _ in range(rounds):
        for f in frames:
            if period:
                nxt += period
                time.sleep(max(0.0, nxt - time.perf_counter()))
            if th:
                want.set()  # the grabber decodes the next frame while this one is scored
            t = model.predict(f).timings_ms
            total.append(t["total"])
            model_ms.append(t["total"] - t["preprocess"])
    stop.set()
    if th:
        th.join(1)
    return {"predict_ms": _stats(total), "model_ms": _stats(model_ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused", action="store_true", help="backend.fused: run the bundle's fused graph")
    ap.add_argument("--spinning", action="store_true", help="backend.spinning: ORT worker threads busy-wait")
    ap.add_argument("--frames", type=int, default=60, help="images used (each condition scores them --rounds times)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--e2e", action="store_true", help="also run benchmarks/runtime_e2e.py on the same inputs")
    ap.add_argument("--tag", default="128px")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_EXT)[: args.frames]
    if not paths:
        raise SystemExit(f"--images {args.images}: no images")
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]
    backend = BackendConfig(kind="onnxruntime", threads=args.threads, fused=args.fused, spinning=args.spinning)
    b = bench(args.bundle, backend, frames=300, image=paths[0])  # exactly `rdedge bench --image FIRST`
    model = AnomalyModel(args.bundle, backend)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "bundle": str(args.bundle), "images": str(args.images),
        "frame_hw": list(frames[0].shape[:2]), "fps": args.fps, "threads": args.threads,
        "fused": args.fused, "spinning": args.spinning, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "conditions": {"rdedge_bench": {"predict_ms": b["stages_ms"]["total"], "image": str(paths[0])}},
    }  # fmt: skip
    try:
        for _ in range(10):
            model.predict(frames[0])
        conds = {
            "back_to_back": (None, None, False),
            "paced": (args.fps, None, False),
            "paced_decoding": (args.fps, paths, False),
            "paced_decoding_nice": (args.fps, paths, True),
        }
        for name, (fps, dec, nice) in conds.items():
            out["conditions"][name] = r = _run(model, frames, fps, dec, nice, args.rounds)
            print(f"{name:22s} predict p50 {r['predict_ms']['p50']:.2f} p99 {r['predict_ms']['p99']:.2f} "
                  f"(model p50 {r['model_ms']['p50']:.2f})", flush=True)  # fmt: skip
    finally:
        model.close()
    if args.e2e:
        e2e_json = Path("/tmp") / f"service_overhead_e2e_{os.getpid()}"
        e2e_json.mkdir(exist_ok=True)
        cmd = [sys.executable, str(REPO / "benchmarks" / "runtime_e2e.py"), "--bundle", str(args.bundle),
               "--images", str(args.images), "--fps", str(args.fps), "--threads", str(args.threads),
               "--out", str(e2e_json)] + ["--fused"] * args.fused + ["--spinning"] * args.spinning  # fmt: skip
        subprocess.run(cmd, check=True)
        found = sorted(e2e_json.glob("runtime_e2e.json"))
        out["conditions"]["service"] = json.loads(found[-1].read_text()) if found else None
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"service_overhead_{args.tag}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
