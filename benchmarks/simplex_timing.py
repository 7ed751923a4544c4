"""Share of an RD++ training step spent making simplex-noise pseudo-anomalies: seeded tile bank vs fresh noise.

    python benchmarks/simplex_timing.py          # 128 px, batch 16, efficientnet_lite0, 1 thread

Times (median of ``--steps``) one full RD++ step (noise, teacher on clean and noisy images, projection, OCBE, decoder,
losses, backward, both Adam steps) and, separately, the noise for one batch from the bank (the default) and freshly
generated (``extra.rdpp.noise_bank: 0``). Writes ``benchmarks/results/simplex_timing.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "simplex_timing.json")
    args = p.parse_args(argv)

    import torch

    from training.build import build_model
    from training.config import parse_train_config
    from training.objectives import RDPPObjective
    from training.simplex import PseudoAnomaly

    torch.set_num_threads(args.threads)
    cfg = parse_train_config({"data": {"image_size": args.image_size}, "model": {"projection": "rdpp"}})
    model = build_model(cfg).train()
    t0 = time.perf_counter()
    obj = RDPPObjective(cfg, model)
    bank_build_s = time.perf_counter() - t0
    opts = obj.parameters_groups(model, cfg)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    def timed(fn: object, n: int) -> float:
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    def step() -> None:
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss, _ = obj.loss(model, x)
        loss.backward()
        for o in opts:
            o.step()

    step()  # warm-up
    step_ms = timed(step, args.steps)
    fresh = PseudoAnomaly(args.image_size, bank=0, seed=1)
    res = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "step_ms": step_ms,
        "bank_noise_ms": timed(lambda: obj.noise(args.batch_size), 20),
        "fresh_noise_ms": timed(lambda: fresh(args.batch_size), max(3, args.steps)),
        "bank_build_s": bank_build_s,
        "bank_tiles": cfg.extra.rdpp.noise_bank,
    }
    res["bank_share"] = res["bank_noise_ms"] / step_ms
    res["fresh_share"] = res["fresh_noise_ms"] / (step_ms - res["bank_noise_ms"] + res["fresh_noise_ms"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
