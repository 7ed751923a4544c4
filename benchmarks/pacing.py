"""Does pacing frames like a camera slow ``predict`` down, and is it ONNX Runtime's thread pool or the idle CPU?

Scores the same decoded frames back to back, paced at ``--fps`` with a sleep between frames, and paced with a
busy-wait instead, at 2 and 1 ONNX Runtime threads, through the part chain and (``--fused``, when the bundle has
``model.onnx``) the one-graph model too; ``--spin`` adds the fused graph in a bare session with ONNX Runtime's
spinning off and on. Writes ``benchmarks/results/pacing_<tag>.json``.

    python benchmarks/pacing.py --bundle BUNDLE --images DIR [--fps 10] [--tag 256px] [--fused] [--spin]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.config import BackendConfig  # noqa: E402
from runtime.engine import AnomalyModel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--tag", default="256px")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--fused", action="store_true", help="also the fused one-graph model (model.onnx)")
    ap.add_argument("--spin", action="store_true",
                    help="also model.onnx alone in a bare ORT session, 2 threads, spinning off and on")  # fmt: skip
    args = ap.parse_args()
    paths = sorted(p for p in args.images.iterdir() if p.is_file())[: args.frames]
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]
    rows = []
    variants = [(t, f) for t in (2, 1) for f in ((False, True) if args.fused else (False,))]
    for threads, fused in variants:
        model = AnomalyModel(args.bundle, BackendConfig(threads=threads, fused=fused))
        try:
            for _ in range(10):
                model.predict(frames[0])
            for mode in ("back_to_back", "paced_sleep", "paced_busy_wait"):
                ms: list[float] = []
                nxt = time.perf_counter()
                for _ in range(2):
                    for f in frames:
                        if mode != "back_to_back":
                            nxt += 1.0 / args.fps
                            if mode == "paced_sleep":
                                time.sleep(max(0.0, nxt - time.perf_counter()))
                            else:
                                while time.perf_counter() < nxt:
                                    pass
                        ms.append(model.predict(f).timings_ms["total"])
                row = {"threads": threads, "fused": fused, "mode": mode, "p50": float(np.percentile(ms, 50)),
                       "p99": float(np.percentile(ms, 99)), "n": len(ms)}  # fmt: skip
                print(row, flush=True)
                rows.append(row)
        finally:
            model.close()
    if args.spin:
        rows += spin_rows(args.bundle / "model.onnx", args.fps, 2 * len(frames))
    doc = {"date": time.strftime("%Y-%m-%d"), "bundle": str(args.bundle), "images": str(args.images),
           "fps": args.fps, "rows": rows}  # fmt: skip
    (args.results / f"pacing_{args.tag}.json").write_text(json.dumps(doc, indent=1))
    return 0


def spin_rows(model_path: Path, fps: float, n: int) -> list[dict]:
    """The fused graph alone (no preprocessing), ORT spinning off (the runtime's setting) and on, each pacing mode."""
    import onnxruntime as ort

    rows = []
    for spin in ("0", "1"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(10):
            sess.run(None, {inp.name: x})
        for mode in ("back_to_back", "paced_sleep", "paced_busy_wait"):
            ms: list[float] = []
            nxt = time.perf_counter()
            for _ in range(n):
                if mode != "back_to_back":
                    nxt += 1.0 / fps
                    if mode == "paced_sleep":
                        time.sleep(max(0.0, nxt - time.perf_counter()))
                    else:
                        while time.perf_counter() < nxt:
                            pass
                t0 = time.perf_counter()
                sess.run(None, {inp.name: x})
                ms.append((time.perf_counter() - t0) * 1e3)
            row = {"threads": 2, "fused": True, "bare_session": True, "allow_spinning": int(spin), "mode": mode,
                   "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "n": len(ms)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
