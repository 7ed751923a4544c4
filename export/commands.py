"""Export verbs: ``export``, ``build-engines``, ``demo``. torch/onnx/tensorrt are imported when a verb runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_command(args: argparse.Namespace) -> int:
    """``rdedge export``: parse -> :func:`export.pipeline.export_bundle` -> print the bundle path."""
    from export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(
        run=args.run,
        out=args.out,
        calib_data=args.calib_data,
        image_size=args.image_size,
        opset=args.opset,
        trt=args.trt,
        precision=args.precision,
        fused=args.fused,
        target_far=args.target_far,
        max_batch=args.max_batch,
        force=args.force,
        sign=args.sign,
        int8_calib_images=args.int8_calib_images,
    )
    if args.parity_tol is not None:
        opts.parity_tol = args.parity_tol
    from training.fewshot import is_fewshot_run

    if is_fewshot_run(args.run):  # rdedge train --shots K: teacher, density, score
        from export.fewshot_export import export_fewshot

        out, manifest = export_fewshot(opts)
    else:
        out, manifest = export_bundle(opts)
    thr = manifest.threshold
    print(f"model {manifest.model_id}: threshold {thr.value:.6g} ({thr.source})")
    if thr.f1_optimal:
        f1 = thr.f1_optimal
        print(
            f"F1-optimal on labelled data (information only): threshold {f1['threshold']:.6g}, "
            f"F1 {f1['f1']:.3f}, precision {f1['precision']:.3f}, recall {f1['recall']:.3f}"
        )
    if manifest.int8 is not None:
        q = manifest.int8
        print(f"int8 {'+'.join(q.parts)}: {q.verdict}", file=sys.stdout if q.accepted else sys.stderr)
    if args.sign is not None:
        print(f"signed with {args.sign} (manifest.sig)")
    print(out)
    return 0


def build_engines_command(args: argparse.Namespace) -> int:
    """``rdedge build-engines``: TensorRT engines for this device, recorded in the bundle's manifest."""
    from export.tensorrt_build import build_engines
    from runtime.signing import SIGNATURE_NAME, check_private_key, sign_bundle

    if args.sign is not None:
        check_private_key(args.sign)  # before the long build
    manifest = build_engines(args.bundle, precision=args.precision, max_batch=args.max_batch, gpu_id=args.gpu_id)
    for e in manifest.engines:
        print(f"{e.part:<10} {e.precision}  {e.file}")
    sig = Path(args.bundle) / SIGNATURE_NAME
    if args.sign is not None:
        print(f"signed with key {sign_bundle(args.bundle, args.sign)} ({sig})")
    elif sig.is_file():
        sig.unlink()  # it covered the manifest before the engines were added: no longer true
        print(
            f"warning: {sig} removed: manifest.json changed; re-sign (--sign KEY) or trusted_keys will refuse it",
            file=sys.stderr,
        )
    return 0


def label_tune_command(args: argparse.Namespace) -> int:
    """``rdedge label-tune``: labelled good/defect images -> a bundle with a calibrated classifier part."""
    from export.label_tune import LabelTuneOptions, label_tune

    opts = LabelTuneOptions(
        run=args.run,
        labelled=args.labelled,
        out=args.out,
        bundle=args.bundle,
        classifier=args.classifier,
        decision=args.decision,
        probability_threshold=args.probability_threshold,
        seed=args.seed,
        force=args.force,
        sign=args.sign,
    )
    out, manifest = label_tune(opts)
    clf = manifest.classifier
    assert clf is not None
    print(f"model {manifest.model_id}: {clf.model}")
    print(f"cross-validated on {clf.source}: AUROC {clf.stats['cv_auroc']:.3f}, F1 {clf.stats['cv_f1_at_0.5']:.3f}")
    print(f"decision: {clf.rule}")
    print(out)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``rdedge demo``: the README's first command."""
    from export.demo import DemoOptions, run_demo

    opts = DemoOptions(dir=args.dir, mqtt=args.mqtt, epochs=args.epochs, image_size=args.image_size)
    return run_demo(opts)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the export verbs to the ``rdedge`` parser."""
    p = sub.add_parser(
        "export",
        help="turn a training run into a bundle (ONNX parts, manifest.json, optional TensorRT engines)",
        description="Export teacher, projection, OCBE, decoder and score as separate ONNX graphs (dynamic batch), "
        "check each against torch, calibrate the OK/NG threshold on the defect-free validation images through the "
        "exported chain (onnxruntime) and write BUNDLE_DIR atomically. The auxiliary training backbone is never "
        "exported.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from 'rdedge train'")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument(
        "--calib-data",
        type=Path,
        help="threshold images: a folder of defect-free images, or an MVTec category (its validation split; "
        "labelled test defects add the F1-optimal figure). Default: the validation split the run kept aside plus "
        "the train/good images --max-images left out, at most 300. About 300 defect-free images are what it takes "
        "to confirm a 1%% false-alarm rate",
    )
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the training size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; 14..20)")
    p.add_argument("--trt", action="store_true", help="also build TensorRT engines on this machine's GPU")
    p.add_argument(
        "--precision",
        choices=["fp16", "fp32", "int8"],
        default="fp16",
        help="fp16 (default): also write <part>.fp16.onnx and build FP16 engines; score stays FP32. int8: a CPU "
        "bundle whose teacher/projection/ocbe/decoder are ONNX Runtime INT8 QDQ graphs calibrated on defect-free "
        "images (score FP32); its score parity against FP32 goes into manifest.int8, and a bundle failing the rule "
        "(max deviation > 1%% of the threshold on the validation images) is written but refused by the runtime "
        "unless backend.allow_failed_int8 is set",
    )
    p.add_argument(
        "--int8-calib-images",
        type=int,
        default=64,
        metavar="N",
        help="with --precision int8: defect-free images that set the activation ranges (the run's training images, "
        "spread evenly; default 64)",
    )
    p.add_argument("--fused", action="store_true", help="also write model.onnx (image -> anomaly_map, score)")
    p.add_argument("--target-far", type=float, default=0.01, help="target false-alarm rate of the threshold (0.01)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the bundle declares (default 4)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle (atomically)")
    p.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        help="sign manifest.json with this ed25519 private key ('rdedge keygen'; needs rdedge[sign]): writes "
        "manifest.sig, which a runtime with trusted_keys: requires",
    )
    p.add_argument("--parity-tol", type=float, help=argparse.SUPPRESS)  # tests: force a parity failure
    p.set_defaults(func=export_command)

    p = sub.add_parser(
        "build-engines",
        help="build TensorRT engines for a bundle on this device (needs rdedge[trt])",
        description="Build engines for the five parts (FP16, score FP32) keyed by TensorRT version, GPU and ONNX "
        "sha256, and record them in manifest.json. Engines are device-specific: run this on the target box.",
    )
    p.add_argument("bundle", type=Path, help="bundle folder written by 'rdedge export'")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="default fp16")
    p.add_argument("--max-batch", type=int, help="top of the optimisation profile (default: the bundle's max_batch)")
    p.add_argument("--gpu-id", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        help="re-sign the rewritten manifest.json (without it an existing manifest.sig is removed: it no longer "
        "matches)",
    )
    p.set_defaults(func=build_engines_command)

    p = sub.add_parser(
        "label-tune",
        help="fit a calibrated classifier on a few labelled good/defect images and add it to the bundle",
        description="Describe each labelled image by the teacher's embedding and the bundle's anomaly-map "
        "statistics, fit a class-balanced logistic regression or linear SVM (chosen and Platt-calibrated by "
        "cross-validation on the labelled images only), export it as classifier.onnx and write a new bundle whose "
        "verdicts carry the anomaly score and the defect probability; the decision rule is in manifest.classifier.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder from 'rdedge train' (its teacher is reused)")
    p.add_argument("--labelled", required=True, type=Path, help="folder with good/ and defect/ image folders")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument("--bundle", type=Path, help="base bundle of the run (default: export the run with defaults)")
    p.add_argument(
        "--classifier",
        choices=["auto", "logreg", "svm"],
        default="auto",
        help="auto (default): logistic regression or linear SVM by CV, the features by the one-standard-error rule, "
        "and the bundle's threshold rule when the labels carry no signal; logreg / svm: that model, fitted as asked",
    )
    p.add_argument(
        "--decision",
        choices=["classifier", "either"],
        default="classifier",
        help="classifier (default): NG iff probability >= --probability-threshold; either: that or score >= the "
        "anomaly threshold",
    )
    p.add_argument("--probability-threshold", type=float, default=0.5, help="NG probability (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="cross-validation folds seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle (atomically)")
    p.add_argument("--sign", type=Path, metavar="KEY", help="sign the new manifest.json (rdedge[sign])")
    p.set_defaults(func=label_tune_command)

    p = sub.add_parser(
        "demo",
        help="synthetic data -> train -> evaluate -> export -> runtime verdicts (a few minutes on a CPU)",
        description="The end-to-end tour on two CPU cores: outputs under --dir (default ./rdedge-demo).",
    )
    p.add_argument("--dir", type=Path, default=Path("rdedge-demo"), help="output folder (default ./rdedge-demo)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="also publish the verdicts through the runtime service")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    p.set_defaults(func=demo_command)
