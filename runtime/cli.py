"""Runtime verbs: ``run``, ``check-config``, ``bench``. No torch here.

Also runnable without the training/export packages: ``python -m runtime.cli run --config FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import ConfigError, RdedgeError

log = logging.getLogger(__name__)


def _cmd_run(args: argparse.Namespace) -> int:
    from runtime.config import load_config
    from runtime.logsetup import setup_logging
    from runtime.service import run_service

    cfg = load_config(args.config)
    setup_logging(cfg.logging, verbose=bool(getattr(args, "verbose", False)))
    return run_service(cfg)


def check_config(path: str | Path, strict: bool = False) -> tuple[list[str], list[str]]:
    """Validate a config file.

    Returns:
        ``(errors, warnings)``: schema errors (one line each, with the field path and value) and environment
        findings (bundle directory / manifest missing, TLS files missing). With ``strict`` the findings are errors.
    """
    from runtime.config import load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return str(exc).splitlines(), []
    findings: list[str] = []
    if not (cfg.bundle / "manifest.json").is_file():
        findings.append(f"{path}: bundle: {cfg.bundle}/manifest.json not found (got {str(cfg.bundle)!r})")
    if cfg.mqtt is not None and cfg.mqtt.tls is not None:
        tls = cfg.mqtt.tls
        for name, p in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
            if p is not None and not p.is_file():
                findings.append(f"{path}: mqtt.tls.{name}: file not found (got {str(p)!r})")
    for i, cam in enumerate(cfg.cameras):
        src = cam.source
        if src.kind in ("folder", "video") and not src.path.exists():
            findings.append(f"{path}: cameras.{i}.source.path: not found (got {str(src.path)!r})")
    if strict:
        return findings, []
    return [], findings


def _cmd_check_config(args: argparse.Namespace) -> int:
    errors, warnings = check_config(args.file, strict=args.strict)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"{args.file}: INVALID ({len(errors)} error(s))")
        return 1
    from runtime.config import load_config

    cfg = load_config(args.file)
    cams = ", ".join(f"{c.name} ({c.source.kind}, {c.mode})" for c in cfg.cameras)
    mqtt = f"{cfg.mqtt.host}:{cfg.mqtt.port}{' tls' if cfg.mqtt.tls else ''}" if cfg.mqtt else "disabled"
    print(f"{args.file}: OK -- bundle {cfg.bundle}, backend {cfg.backend.kind}, cameras: {cams}; mqtt {mqtt}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from runtime.bench import bench
    from runtime.config import BackendConfig

    try:
        backend = BackendConfig.model_validate(
            {"kind": args.backend, "device": args.device, "threads": args.threads, "fused": args.fused}
        )
    except ValueError as exc:
        raise ConfigError(f"bench: {exc}") from None
    result = bench(Path(args.bundle), backend, frames=args.frames, warmup=args.warmup, image=args.image)
    print(json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the runtime verbs to the ``rdedge`` parser."""
    p = sub.add_parser("run", help="run the inspection service (cameras -> model -> MQTT)")
    p.add_argument("--config", required=True, type=Path, help="runtime config YAML (e.g. /etc/rdedge/config.yaml)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "check-config",
        help="validate a runtime config; prints each error with its field path (exit 1) or an OK summary",
        description="Validates the schema. Missing files it points at (bundle, TLS files, folder/video sources) "
        "are warnings, or errors with --strict (use --strict on the target box, plain on a build machine).",
    )
    p.add_argument("file", type=Path, help="runtime config YAML")
    p.add_argument("--strict", action="store_true", help="treat missing bundle / TLS / source files as errors")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("bench", help="benchmark a bundle: per-stage p50/p99 latency, frames/s, cold start, RSS")
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device")
    p.add_argument("--frames", type=int, default=200, help="timed frames")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime CPU threads (0: default)")
    p.add_argument("--fused", action="store_true", help="run the fused model.onnx instead of the chain")
    p.add_argument("--image", type=Path, default=None, help="frame to feed (default: synthetic 1280x720)")
    p.set_defaults(func=_cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.cli VERB ...``: the runtime verbs without the training/export packages."""
    parser = argparse.ArgumentParser(prog="rdedge-runtime", description="rdedge runtime verbs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    try:
        return int(args.func(args) or 0)
    except RdedgeError as exc:
        print(f"rdedge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
