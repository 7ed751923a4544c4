"""The ``rdedge`` command: one entry point, verb subcommands.

The entry point lives in ``export`` because it is the only package allowed to see both ``training`` and ``runtime``
(imports point export -> training, export -> runtime). Each package registers its own verbs from its ``cli`` module,
and every verb imports its heavy dependencies (torch, onnx, tensorrt) only when it runs, so ``rdedge run`` on a
line box starts without torch installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from runtime.errors import RdedgeError
from training.errors import TrainingError

_EPILOG = """\
typical flow:
  rdedge make-demo-data ./demo                       # synthetic MVTec-layout category
  rdedge train --data ./demo/synthetic --out ./run   # Reverse Distillation on the good images
  rdedge evaluate --run ./run --data ./demo/synthetic --report ./report
  rdedge export --run ./run --out ./bundle           # ONNX parts + manifest.json (+ --trt engines)
  rdedge run --config /etc/rdedge/config.yaml        # camera -> model -> MQTT verdicts
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every package's verbs registered."""
    from export import commands as export_commands
    from runtime import cli as runtime_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="rdedge",
        description="Reverse Distillation anomaly inspection for factory lines: train on defect-free images, "
        "export to ONNX / TensorRT, and publish OK/NG verdicts over MQTT.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    training_cli.register(sub)
    export_commands.register(sub)
    runtime_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, run one verb and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (RdedgeError, TrainingError) as exc:
        print(f"rdedge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rdedge {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
