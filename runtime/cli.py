"""Runtime verbs: ``run``, ``check-config``, ``verify``, ``keygen``, ``bench``, ``spool``. No torch here.

Also runnable without the training/export packages: ``python -m runtime.cli run --config FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ConfigError, RdedgeError

if TYPE_CHECKING:
    from runtime.config import RuntimeConfig
    from runtime.spool import Spool

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

    With ``strict`` the bundle is also loaded and verified exactly as ``rdedge run`` does it
    (:class:`~runtime.engine.AnomalyModel`: manifest parsed and validated, every file's sha256 checked, the configured
    backend created, one warm-up inference), read-only, so a truncated manifest or a tampered ONNX file fails here
    and not at the first start on the line.

    Returns:
        ``(errors, warnings)``: schema errors (one line each, with the field path and value) and environment
        findings (bundle directory / manifest missing, TLS files missing). With ``strict`` the findings are errors,
        plus the bundle's load error (naming the file) when it does not load.
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
    for i, key in enumerate(cfg.trusted_keys or ()):
        if not key.is_file():
            findings.append(f"{path}: trusted_keys.{i}: file not found (got {str(key)!r})")
    for i, cam in enumerate(cfg.cameras):
        src = cam.source
        if src.kind in ("folder", "video") and not src.path.exists():
            findings.append(f"{path}: cameras.{i}.source.path: not found (got {str(src.path)!r})")
    if strict:
        if not findings:
            findings.extend(_load_bundle_errors(path, cfg))
        return findings, []
    return [], findings


def _load_bundle_errors(path: str | Path, cfg: RuntimeConfig) -> list[str]:
    """Load the bundle the way ``run`` does (``AnomalyModel(verify=True)`` + one warm-up); errors as lines."""
    from runtime.engine import AnomalyModel

    try:
        model = AnomalyModel(
            cfg.bundle, cfg.backend, verify=True, threshold=cfg.threshold, trusted_keys=cfg.trusted_keys
        )
    except RdedgeError as exc:  # BundleError names the file; MissingExtraError names the extra
        return [f"{path}: bundle: {exc}"]
    except Exception as exc:  # noqa: BLE001 - a backend that cannot parse a part raises its own types
        return [f"{path}: bundle: {cfg.bundle}: cannot load with backend {cfg.backend.kind}: {exc}"]
    try:
        model.warmup(1)
    except Exception as exc:  # noqa: BLE001
        return [f"{path}: bundle: {cfg.bundle}: warm-up inference failed: {exc}"]
    finally:
        model.close()
    return []


def verify_bundle(
    bundle: Path, trusted_keys: Sequence[Path] = (), calibration: bool = True, threads: int = 0
) -> tuple[bool, list[str]]:
    """Check a bundle the way the runtime loads it and say what was found.

    Checks: the manifest parses; every listed file's sha256; ``manifest.sig`` (a signature that does not match is
    a failure; with ``trusted_keys`` an unsigned bundle or one signed by another key is too); with ``calibration``
    the stored calibration frames through onnxruntime on the CPU.

    Returns:
        ``(ok, lines)``: one line per check, ``"<check>: <finding>"``.
    """
    from runtime.bundle import read_manifest, read_manifest_bytes, verify_files
    from runtime.signing import check_signature, load_public_keys

    keys = load_public_keys(trusted_keys)
    raw = read_manifest_bytes(bundle)
    manifest = read_manifest(bundle, raw)
    lines = [f"manifest: ok (model {manifest.model_id}, {manifest.backbone}, {len(manifest.files)} files)"]
    ok = True
    try:
        verify_files(bundle, manifest)
        lines.append(f"files: ok (sha256 of all {len(manifest.files)} files match the manifest)")
        files_ok = True
    except RdedgeError as exc:
        lines.append(f"files: FAILED: {exc}")
        ok = files_ok = False
    sig = check_signature(bundle, raw, keys)
    if sig.state == "invalid" or (keys and not sig.trusted):
        lines.append(f"signature: FAILED: {sig.detail}")
        ok = False
    elif sig.state == "valid" and not keys:
        lines.append(f"signature: valid, key {sig.key_id} (no --trusted-key given: who signed it is not checked)")
    else:
        lines.append(f"signature: {'ok, ' if sig.trusted else ''}{sig.detail}")
    if not calibration:
        lines.append("calibration: not checked (--no-calibration)")
    elif manifest.calibration is None:
        lines.append("calibration: skipped (the bundle ships no calibration frames)")
    elif not files_ok:
        lines.append("calibration: not checked (file hashes failed)")
    else:
        from runtime.config import BackendConfig
        from runtime.engine import AnomalyModel

        try:
            with AnomalyModel(bundle, BackendConfig(threads=threads), verify=True) as model:
                c = model.calibration
            if c is not None:  # always set here: verify=True and the manifest lists frames
                lines.append(
                    f"calibration: ok ({c.frames} frames reproduce their scores on onnxruntime/cpu, max |diff| "
                    f"{c.max_abs_diff:.3g} <= {c.tolerance:.3g}, {c.ms:.0f} ms)"
                )
        except RdedgeError as exc:
            lines.append(f"calibration: FAILED: {exc}")
            ok = False
    return ok, lines


def _cmd_verify(args: argparse.Namespace) -> int:
    ok, lines = verify_bundle(args.bundle, args.trusted_key, calibration=not args.no_calibration)
    for line in lines:
        print(line)
    print(f"{args.bundle}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import generate_keypair

    priv, pub, kid = generate_keypair(args.out)
    print(f"private key {priv} (keep it on the build machine; mode 0600)")
    print(f"public key  {pub} (list it under trusted_keys: on the line boxes)")
    print(f"key id      {kid}")
    return 0


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
    from runtime.bench import bench, compare, comparison_table
    from runtime.config import BackendConfig

    if args.compare:
        rows = compare(
            [Path(args.bundle), *args.also],
            frames=args.frames,
            warmup=args.warmup,
            image=args.image,
            threads=args.threads,
            allow_failed_int8=args.allow_failed_int8,
        )
        if args.json_out is not None:
            args.json_out.write_text(json.dumps(rows, indent=2))
        print(comparison_table(rows))
        return 0 if any("result" in r for r in rows) else 1
    try:
        backend = BackendConfig.model_validate(
            {
                "kind": args.backend,
                "device": args.device,
                "threads": args.threads,
                "fused": args.fused,
                "spinning": args.spinning,
                "allow_failed_int8": args.allow_failed_int8,
            }
        )
    except ValueError as exc:
        raise ConfigError(f"bench: {exc}") from None
    result = bench(Path(args.bundle), backend, frames=args.frames, warmup=args.warmup, image=args.image)
    print(json.dumps(result, indent=2))
    return 0


def _open_spool(config: Path) -> tuple[Path, Spool]:
    from runtime.config import load_config
    from runtime.spool import Spool

    cfg = load_config(config)
    path = cfg.spool.path
    if not path.is_file():
        raise RdedgeError(f"spool {path}: not found (spool.path in {config}; the service creates it on first run)")
    try:
        return path, Spool(path, cfg.spool.max_messages, cfg.spool.max_age_s)
    except Exception as exc:
        raise RdedgeError(f"spool {path}: cannot open: {exc}") from None


def _cmd_spool_status(args: argparse.Namespace) -> int:
    path, spool = _open_spool(args.config)
    try:
        cap = spool.capacity()
        doc = {
            "spool": str(path),
            "pending": spool.depth,
            "dead_letter": spool.dead,
            "dropped_total": spool.dropped_total,
            "next_seq": spool.peek_seq(),
            "free_bytes": cap.free_bytes,
            "refused": [{"topic": t, "reason": r, "count": n} for t, r, n in spool.dead_letter_summary()],
        }
    finally:
        spool.close()
    print(json.dumps(doc, indent=2))
    return 0


def _cmd_spool_replay_dead(args: argparse.Namespace) -> int:
    path, spool = _open_spool(args.config)
    try:
        summary = spool.dead_letter_summary()
        n = spool.replay_dead(topic=args.topic)
    finally:
        spool.close()
    for topic, reason, count in summary:
        if args.topic is None or topic == args.topic:
            print(f"{count} message(s) on {topic} (refused: {reason})")
    print(f"{path}: {n} dead letter(s) moved back to the outbox; a running service sends them within a second, "
          "otherwise the next 'rdedge run' does")  # fmt: skip
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
    p.add_argument(
        "--strict",
        action="store_true",
        help="treat missing bundle / TLS / source files as errors, and load + verify the bundle as 'run' does "
        "(manifest, sha256 of every file, backend, one warm-up inference)",
    )
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser(
        "verify",
        help="check a bundle: manifest, sha256 of every file, signature, calibration scores (exit 1 on failure)",
        description="Checks what the runtime checks at load: the manifest, every file's sha256, manifest.sig "
        "(ed25519; needs rdedge[sign] when the bundle is signed) and the stored calibration frames' scores "
        "(onnxruntime, CPU). With --trusted-key an unsigned bundle or one signed by another key fails.",
    )
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="public key file the signature must verify under (repeatable; as trusted_keys: in the config)",
    )
    p.add_argument("--no-calibration", action="store_true", help="skip the calibration-score check (no onnxruntime)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "keygen",
        help="make an ed25519 key pair for signing bundles (KEY and KEY.pub; needs rdedge[sign])",
        description="Writes the private key to --out (mode 0600, never overwritten) and the public key to "
        "--out.pub. Sign with 'rdedge export --sign KEY'; list KEY.pub under trusted_keys: on the line boxes.",
    )
    p.add_argument("--out", required=True, type=Path, help="private key file to create (public key: OUT.pub)")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("bench", help="benchmark a bundle: per-stage p50/p99 latency, frames/s, cold start, RSS")
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device")
    p.add_argument("--frames", type=int, default=200, help="timed frames")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime CPU threads (0: default)")
    p.add_argument("--fused", action="store_true", help="run the fused model.onnx instead of the chain")
    p.add_argument(
        "--spinning",
        action="store_true",
        help="onnxruntime CPU: let the worker threads busy-wait (backend.spinning); best with --fused",
    )
    p.add_argument("--image", type=Path, default=None, help="frame to feed (default: synthetic 1280x720)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="bench every backend this box can run (ORT CPU/CUDA, chain/fused, TensorRT +- CUDA graph), each in its "
        "own process, and print them side by side (--backend/--device/--fused/--spinning are then ignored; --threads "
        "applies)",
    )
    p.add_argument(
        "--also", type=Path, action="append", default=[], help="with --compare: another bundle (e.g. the int8 one)"
    )
    p.add_argument("--json-out", type=Path, default=None, help="with --compare: write the rows as JSON here")
    p.add_argument(
        "--allow-failed-int8",
        action="store_true",
        help="also load an int8 bundle that failed its export score-parity check (refused otherwise)",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "spool",
        help="inspect the verdict spool; replay messages the broker refused (dead letters)",
        description="The spool (spool.path) holds verdicts not yet acknowledged by the broker, and the dead-letter "
        "table: messages the broker refused with a failure PUBACK (e.g. 135 Not authorized: its ACL denies the "
        "topic). Safe to run while the service runs.",
    )
    spool_sub = p.add_subparsers(dest="spool_verb", metavar="SPOOL_VERB", required=True)
    q = spool_sub.add_parser("status", help="print pending / dead-letter counts and the refused topics as JSON")
    q.add_argument("--config", required=True, type=Path, help="runtime config YAML (its spool.path is used)")
    q.set_defaults(func=_cmd_spool_status)
    q = spool_sub.add_parser(
        "replay-dead",
        help="move dead letters back to the outbox (after fixing the broker's ACL)",
        description="Moves every dead letter (or those of --topic) back to the end of the outbox, oldest first, "
        "keeping seq, topic and payload. A running service publishes them within a second; a stopped one on its "
        "next start. If the broker still refuses them they return to the dead-letter table.",
    )
    q.add_argument("--config", required=True, type=Path, help="runtime config YAML (its spool.path is used)")
    q.add_argument("--topic", default=None, help="replay only messages for this exact topic")
    q.set_defaults(func=_cmd_spool_replay_dead)

    from runtime.station.cli import register as register_station  # argparse only; the extra is needed to run it

    register_station(sub)


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
