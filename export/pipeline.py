"""``rdedge export``: training run -> bundle. One typed entry point, :func:`export_bundle`.

Steps: load the run (``training.build.load_model``; every weight, teacher included, comes from the checkpoint's
``model`` entry and none from ``aux``) -> export the five parts (+ fused graph) and check each against torch on two
inputs -> FP16 copies of the four FP16-able parts (or, with ``--precision int8``, INT8 QDQ parts in their place, see
:mod:`export.int8`) -> score the calibration images through the exported ONNX chain
with ONNX Runtime (what the runtime runs) and check them against torch -> a few of them kept as calibration frames
(``calib.npy``, scores in ``manifest.calibration``; the runtime reproduces them at load) -> threshold ->
``manifest.json`` through ``runtime.bundle`` -> optional TensorRT engines -> optional ed25519 signature
(``manifest.sig``, :mod:`runtime.signing`) -> rename into place. See :mod:`export.bundle_writer` for the
all-or-nothing write and :mod:`export.parity` for the error measures and tolerances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.bundle_writer import check_target, finalize_manifest, model_id, staging, tool_versions, utc_now
from export.errors import ExportError, require
from export.int8 import INT8_SCORE_FRAC
from export.parity import FP16_SCORE_TOL, PART_TOL, SCORE_TOL
from runtime.bundle import (
    CHAIN,
    CHAIN_WITH_DENSITY,
    CalibrationSpec,
    InputSpec,
    Int8Spec,
    Manifest,
    PartSpec,
    PreprocessSpec,
    ThresholdSpec,
)

log = logging.getLogger(__name__)

FP16_PARTS = ("teacher", "projection", "ocbe", "decoder")
CALIB_FILE = "calib.npy"


@dataclass
class ExportOptions:
    """Options of ``rdedge export`` (see ``rdedge export --help``)."""

    run: Path
    out: Path
    calib_data: Path | None = None
    image_size: int | None = None
    opset: int = 17
    trt: bool = False
    precision: Literal["fp16", "fp32", "int8"] = "fp16"
    fused: bool = False
    target_far: float = 0.01
    max_batch: int = 4
    force: bool = False
    parity_tol: float = PART_TOL
    score_tol: float = SCORE_TOL
    fp16_score_tol: float = FP16_SCORE_TOL
    seed: int = 0
    sign: Path | None = None
    calib_frames: int = 4
    int8_calib_images: int = 64
    int8_score_frac: float = INT8_SCORE_FRAC


@dataclass
class CalibrationSet:
    """Defect-free images that set the threshold, and optional labelled images for the F1-optimal figure."""

    good: list[Path]
    source: str
    labelled: list[tuple[Path, int]] = field(default_factory=list)
    labelled_source: str = ""


def _flatten_keys(obj: Any, prefix: str = "") -> set[str]:
    if isinstance(obj, dict):
        out: set[str] = set()
        for k, v in obj.items():
            out |= _flatten_keys(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip(".")} if prefix else set()


def check_no_aux(model: Any, ckpt: dict[str, Any]) -> None:
    """Every exported weight comes from ``ckpt["model"]``; none from the training-only ``ckpt["aux"]``.

    Raises:
        ExportError: an exported state key is missing from ``ckpt["model"]`` or also present in ``ckpt["aux"]``.
    """
    exported = set(model.state_dict())
    not_from_model = sorted(exported - set(ckpt.get("model", {})))
    if not_from_model:
        raise ExportError(f"exported weights not in the checkpoint's model state: {not_from_model[:3]}")
    overlap = sorted(exported & _flatten_keys(ckpt.get("aux") or {}))
    if overlap:
        raise ExportError(f"refusing to export auxiliary (training-only) weights: {overlap[:3]}")


def calibration_set(ckpt: dict[str, Any], cfg: Any, calib_data: Path | None) -> CalibrationSet:
    """Resolve the threshold images: ``--calib-data`` (MVTec category -> its validation split, or a folder of good
    images), else the validation files the training run kept aside (``ckpt["split"]["val"]``) and the train/good
    images its ``max_images`` left out (``ckpt["split"]["unused"]``), at most
    :data:`training.data.CALIB_MAX_IMAGES` in all."""
    from training.data import calibration_samples, discover, list_images

    if calib_data is not None:
        calib_data = Path(calib_data)
        if (calib_data / "train" / "good").is_dir():
            splits = discover(calib_data, cfg.data.val_fraction, cfg.seed)
            if not splits.val:
                raise ExportError(f"{calib_data}: the validation split is empty (data.val_fraction is 0?)")
            labelled = [(s.path, s.label) for s in splits.test]
            has_defects = any(lab for _, lab in labelled)
            return CalibrationSet(
                [s.path for s in splits.val],
                f"validation split of {calib_data}/train/good (n={len(splits.val)}, seed {cfg.seed})",
                labelled if has_defects else [],
                f"labelled test split of {calib_data} (n={len(labelled)})" if has_defects else "",
            )
        good = list_images(calib_data, strict=False)
        return CalibrationSet(good, f"defect-free folder {calib_data} (n={len(good)})")
    val = [Path(p) for p in (ckpt.get("split") or {}).get("val", [])]
    if not val:
        raise ExportError(
            "the training run kept no validation images for the threshold (data.val_fraction 0?); "
            "pass --calib-data DIR (a folder of defect-free images or an MVTec category)"
        )
    missing = [p for p in val if not p.is_file()]
    if missing:
        raise ExportError(
            f"validation image {missing[0]} recorded by the training run is missing ({len(missing)} of {len(val)}); "
            "run export where the training data is, or pass --calib-data DIR"
        )
    unused = [Path(p) for p in (ckpt.get("split") or {}).get("unused", [])]
    gone = [p for p in unused if not p.is_file()]
    if gone:
        raise ExportError(
            f"train/good image {gone[0]} that training left out (max_images) is missing ({len(gone)} of "
            f"{len(unused)}); run export where the training data is, or pass --calib-data DIR"
        )
    good = calibration_samples(val, unused)
    source = f"validation split kept aside by training (train/good, n={len(val)})"
    if len(good) > len(val):
        source += f" + train/good images training left out (max_images, n={len(good) - len(val)})"
    out = CalibrationSet(good, source)
    root = val[0].parent.parent.parent
    if val[0].parent.name == "good" and val[0].parent.parent.name == "train" and (root / "test").is_dir():
        splits = discover(root, cfg.data.val_fraction, cfg.seed)
        labelled = [(s.path, s.label) for s in splits.test]
        if any(lab for _, lab in labelled):
            out.labelled, out.labelled_source = labelled, f"labelled test split of {root} (n={len(labelled)})"
    return out


def load_images(paths: list[Path], hw: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Training's preprocessing (== the runtime's) of image files -> ``(N, 3, H, W)`` float32."""
    from training.data import preprocess, read_image

    return np.stack([preprocess(read_image(p), hw, mean, std) for p in paths]).astype(np.float32)


def _torch_chain(model: Any, scoring: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named tensor of the chain, computed by the torch model on ``x`` (reference for parity)."""
    import torch

    from export import onnx_parts

    with torch.no_grad():
        t: dict[str, Any] = {"image": torch.from_numpy(x)}
        f = model.teacher(t["image"])
        p = model.projection(*f)
        z = model.ocbe(*p)
        d = onnx_parts.decode(model, z, f)
        if scoring.density is not None:  # computed once: it is a tensor of the chain and an input of the score
            t["density_map"] = scoring.density(*f)
            amap, score = scoring.scorer(*f, *d, t["density_map"])
        else:
            amap, score = scoring.scorer(*f, *d)
        t.update(zip(("f1", "f2", "f3"), f, strict=True))
        t.update(zip(("p1", "p2", "p3"), p, strict=True))
        t["z"] = z
        t.update(zip(("d1", "d2", "d3"), d, strict=True))
        t["anomaly_map"], t["score"] = amap, score
    return {k: v.detach().numpy().astype(np.float32) for k, v in t.items()}


def write_calibration_frames(
    bundle_dir: Path,
    paths: list[Path],
    scores: np.ndarray,
    chain: list[Any],
    preprocess: PreprocessSpec,
    input_spec: InputSpec,
    n: int,
) -> CalibrationSpec:
    """Keep ``n`` calibration images, spread over their scores (lowest .. highest), as ``calib.npy``.

    Frames are stored as the runtime receives them, uint8 BGR ``(n, H, W, 3)`` already at the input size, and scored
    through the runtime's own :class:`~runtime.preprocess.Preprocessor` and the exported FP32 chain (ORT), so the
    load-time check compares like with like. Size: ``n * H * W * 3`` bytes (196 KB for 4 frames at 128 px).
    """
    import cv2

    from export import parity
    from runtime.preprocess import Preprocessor
    from training.data import evenly, read_image

    order = np.argsort(scores, kind="stable")
    idx = sorted(int(order[i]) for i in evenly(len(order), n))
    size = (input_spec.width, input_spec.height)
    frames = np.stack([cv2.resize(read_image(paths[i]), size, interpolation=cv2.INTER_LINEAR) for i in idx])
    pre = Preprocessor(preprocess, input_spec)
    x = np.concatenate([pre(f) for f in frames])
    got, _ = parity.chain_scores(chain, x)
    np.save(bundle_dir / CALIB_FILE, np.ascontiguousarray(frames, dtype=np.uint8))
    return CalibrationSpec(
        file=CALIB_FILE,
        scores=[float(v) for v in got],
        source=f"{len(idx)} of the {len(paths)} threshold images, spread over their scores "
        f"(ranks {', '.join(str(int(np.where(order == i)[0][0])) for i in idx)})",
    )


def export_shape(trained: tuple[int, int], side: int | None) -> tuple[int, int]:
    """The exported input ``(height, width)``: the run's own, or for ``--image-size side`` the run's aspect at about
    ``side^2`` pixels (``side x side`` for a square run)."""
    if side is None:
        return trained
    if side % 32 or side < 32:
        raise ExportError(f"--image-size must be a multiple of 32 (>= 32), got {side}")
    from training.data import input_shape

    return input_shape(side, trained[0] / trained[1])


def int8_calibration_images(ckpt: dict[str, Any], calib: CalibrationSet, n: int) -> tuple[list[Path], str]:
    """Defect-free images for the INT8 activation ranges: ``n`` of the run's training images spread evenly over the
    list (``ckpt["split"]["train"]``, train/good) when they are on disk, else the threshold images; and a description.
    """
    from training.data import evenly

    train = [Path(p) for p in (ckpt.get("split") or {}).get("train", [])]
    if train and all(p.is_file() for p in train):
        pool, what = train, "training images (train/good)"
    else:
        pool, what = list(calib.good), f"threshold images ({calib.source}; the run's training images are not here)"
    idx = evenly(len(pool), n)
    return [pool[i] for i in idx], f"{len(idx)} of the {len(pool)} {what}, spread evenly over the list"


def _student_choice(record: dict[str, Any] | None) -> dict[str, str]:
    """Manifest lines for a run that chose its student (``model.projection: auto``); empty for a pinned one."""
    if not record:
        return {}
    signals = ", ".join(
        f"{name} {row['best_signal']:.4f}" if row.get("best_signal") is not None else f"{name} n/a"
        for name, row in record["candidates"].items()
    )
    return {"student.chosen": str(record["chosen"]), "student.signals": signals, "student.rule": str(record["rule"])}


def _density_choice(record: dict[str, Any] | None, uses_density: bool) -> dict[str, str]:
    """Manifest lines for the density head's kNN blend (chosen in training); empty without one."""
    if not record or not uses_density:
        return {}
    signals = ", ".join(f"share {b}: {v:.4f}" for b, v in record["signals"].items())
    return {
        "density.knn_share": f"{float(record['chosen']):g}",
        "density.knn_bank": str(record["bank"]) if float(record["chosen"]) > 0 else "0 (Gaussian alone)",
        "density.knn_signals": signals,
    }


def _wide_choice(record: dict[str, Any] | None, uses_density: bool) -> dict[str, str]:
    """Manifest lines for the density head's wide-Gaussian blend (chosen in training); empty without one."""
    if not record or not uses_density:
        return {}
    k = int(record["window"])
    return {
        "density.wide_share": f"{float(record['chosen']):g}",
        "density.wide_window": f"{k}x{k}" if float(record["chosen"]) > 0 else "none (plain Gaussian)",
        "density.wide_signal_gain": f"{record['gain']:+.4f} (se {record['se']:.4f})",
    }


def _centre_choice(record: dict[str, Any] | None) -> dict[str, str]:
    """Manifest lines for the per-image centring choice (made in training); empty for older runs."""
    if not record:
        return {}
    out = {"scoring.centre": "on" if record["chosen"] else "off", "scoring.centre_rule": str(record["rule"])}
    if "gain" in record:
        out["scoring.centre_gain"] = f"{record['gain']:+.4f} (se {record['se']:.4f})"
    return out


def _torch_scores(model: Any, scoring: Any, images: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate(
        [_torch_chain(model, scoring, images[i : i + batch])["score"] for i in range(0, len(images), batch)]
    )


def export_bundle(opts: ExportOptions) -> tuple[Path, Manifest]:
    """Export ``opts.run`` to the bundle ``opts.out``; returns ``(bundle path, manifest)``.

    Raises:
        ExportError / ParityError: bad options, existing bundle, parity beyond tolerance.
        training.errors.CheckpointError: missing, foreign or mismatched checkpoint.
        MissingExtraError: onnx / onnxruntime (``rdedge[export]``) or tensorrt (``rdedge[trt]``) missing.
    """
    require("torch", "export", "export")
    require("onnx", "export", "ONNX export")
    require("onnxruntime", "export", "parity checks and threshold calibration")
    from export import onnx_parts, parity
    from export.fp16 import convert_file
    from training.backbones import get_spec
    from training.build import load_model
    from training.rde import takes_teacher
    from training.threshold import calibrate_threshold, describe_rule, f1_optimal, images_to_confirm

    onnx_parts.check_opset(opts.opset)
    out = Path(opts.out)
    check_target(out, opts.force)
    if not 0.0 < opts.target_far < 1.0:
        raise ExportError(f"--target-far must be in (0, 1), got {opts.target_far}")
    if opts.max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {opts.max_batch}")
    if opts.calib_frames < 1:
        raise ExportError(f"calib_frames must be >= 1, got {opts.calib_frames}")
    if opts.precision not in ("fp16", "fp32", "int8"):
        raise ExportError(f"--precision must be fp16, fp32 or int8, got {opts.precision!r}")
    if opts.precision == "int8":
        if opts.trt:
            raise ExportError(
                "--precision int8 makes ONNX Runtime CPU parts; TensorRT engines are built from an fp16 or fp32 "
                "export (drop --trt, or export with --precision fp16 --trt)"
            )
        if opts.fused:
            raise ExportError("--precision int8: the fused graph is not quantised; export int8 without --fused")
        if opts.int8_calib_images < 1:
            raise ExportError(f"--int8-calib-images must be >= 1, got {opts.int8_calib_images}")
        if not 0.0 < opts.int8_score_frac < 1.0:
            raise ExportError(f"int8_score_frac must be in (0, 1), got {opts.int8_score_frac}")
    if opts.sign is not None:
        from runtime.signing import check_private_key

        log.info("the bundle will be signed with key %s (%s)", check_private_key(opts.sign), opts.sign)
    if opts.trt:
        from export.tensorrt_build import import_tensorrt

        import_tensorrt()  # fail before the long part of the export

    model, cfg, ckpt = load_model(opts.run)
    check_no_aux(model, ckpt)
    trained = cfg.data.input_hw()
    hw = export_shape(trained, opts.image_size)
    spec = get_spec(cfg.model.backbone)
    from training.scoring import build_scoring

    stored = ckpt.get("scoring")
    if stored and hw != trained and float(stored["recipe"].get("density_weight", 0)) > 0:
        raise ExportError(
            f"--image-size {opts.image_size}: the run's scoring recipe has a density head fitted at "
            f"{trained[0]} x {trained[1]} px (one Gaussian per position); export at the training size or retrain "
            "at this size"
        )
    scoring = build_scoring(stored, spec.channels, hw, cfg.model.sigma)
    scorer = scoring.scorer.eval()
    chain_names = CHAIN_WITH_DENSITY if scoring.density is not None else CHAIN
    calib = calibration_set(ckpt, cfg, opts.calib_data)
    calib_images = load_images(calib.good, hw, spec.mean, spec.std)
    log.info("exporting %s (%s, %dx%d); threshold from %s", opts.run, cfg.model.backbone, *hw, calib.source)

    rng = np.random.default_rng(opts.seed)
    sets = [rng.standard_normal((2, 3, *hw)).astype(np.float32), calib_images[:1]]
    refs = [_torch_chain(model, scoring, x) for x in sets]
    modules = onnx_parts.part_modules(model, scorer, hw, scoring.density)
    par: dict[str, float] = {}

    with staging(out, opts.force) as tmp:
        import torch

        specs: dict[str, PartSpec] = {}
        sessions: dict[str, Any] = {}
        for name in (*chain_names, *(("fused",) if opts.fused else ())):
            ins, outs = onnx_parts.part_io(name, scoring.density is not None, takes_teacher(model.decoder))
            path = tmp / ("model.onnx" if name == "fused" else f"{name}.onnx")
            if name == "projection" and onnx_parts.is_identity_projection(model.projection):
                onnx_parts.write_identity_projection(path, onnx_parts.tensor_specs(ins, [refs[0][k] for k in ins]))
            else:
                example = tuple(torch.from_numpy(refs[0][k]) for k in ins)
                onnx_parts.export_torch_part(modules[name], name, example, path, opts.opset, (ins, outs))
            sess = parity.session(path)
            worst = (0.0, 0.0)
            for ref in refs:
                got = parity.run_session(sess, {k: ref[k] for k in ins})
                err = parity.errors([ref[k] for k in outs], got)
                worst = (max(worst[0], err[0]), max(worst[1], err[1]))
            parity.check(f"{name} (2 inputs)", *worst, opts.parity_tol)
            par[f"{name}_max_abs"], par[f"{name}_max_rel"] = worst
            specs[name] = PartSpec(
                name=name,
                file=path.name,
                precision="fp32",
                inputs=onnx_parts.tensor_specs(ins, [refs[0][k] for k in ins]),
                outputs=onnx_parts.tensor_specs(outs, [refs[0][k] for k in outs]),
            )
            sessions[name] = sess

        # Image scores of the calibration images: exported ONNX chain (ORT) vs torch.
        chain = [sessions[p] for p in chain_names]
        ort_scores, _ = parity.chain_scores(chain, calib_images)
        ref_scores = _torch_scores(model, scoring, calib_images)
        err = parity.errors([ref_scores], [ort_scores])
        parity.check(f"calibration scores (n={len(calib_images)})", *err, opts.score_tol)
        par["calib_score_max_abs"], par["calib_score_max_rel"] = err

        extra: dict[str, str | float | int | bool] = {
            "exporter": "torch.onnx (TorchScript, dynamo=False)",
            "opset": opts.opset,
            "projection": cfg.model.projection,
            "objective": cfg.model.objective,
            **({"rde.gii": cfg.extra.rde.gii} if cfg.model.objective == "rde" else {}),
            "sigma": float(cfg.model.sigma),
            "train_image_size": int(cfg.data.image_size),
            "train_input_hw": f"{trained[0]}x{trained[1]}",
            "checkpoint_epoch": int(ckpt.get("epoch", -1)) + 1,
            "checkpoint_step": int(ckpt.get("step", 0)),
            "scoring.recipe": scoring.recipe.name(),
            "scoring.chosen_by": "synthetic defects on held-out good images (validation signal)"
            if stored
            else "fixed: the RD paper's scoring (no validation split)",
            **({"scoring.signal": float(scoring.info["signal"])} if "signal" in scoring.info else {}),
            **({"scoring.candidates": len(scoring.info["candidates"])} if "candidates" in scoring.info else {}),
            **_student_choice(scoring.info.get("projection")),
            **_density_choice(scoring.info.get("density_knn"), scoring.density is not None),
            **_wide_choice(scoring.info.get("density_wide"), scoring.density is not None),
            **_centre_choice(scoring.info.get("centre")),
            "parity_tolerance_part_rel": opts.parity_tol,
            "parity_tolerance_score_rel": opts.score_tol,
        }
        if opts.precision == "fp16":
            for name in FP16_PARTS:
                convert_file(tmp / f"{name}.onnx", tmp / f"{name}.fp16.onnx")
                extra[f"fp16_onnx.{name}"] = f"{name}.fp16.onnx"
            try:
                fp16_chain = [parity.session(tmp / f"{p}.fp16.onnx") for p in FP16_PARTS] + [
                    sessions[p] for p in chain_names if p not in FP16_PARTS
                ]
                fp16_scores, _ = parity.chain_scores(fp16_chain, calib_images)
            except Exception as exc:  # noqa: BLE001 - ORT builds without FP16 CPU kernels raise their own types
                log.warning("onnxruntime cannot run the FP16 graphs on this CPU (%s); FP16 parity not measured", exc)
            else:
                err = parity.errors([ort_scores], [fp16_scores])
                parity.check("fp16 chain scores vs fp32", *err, opts.fp16_score_tol)
                par["fp16_score_max_abs"], par["fp16_score_max_rel"] = err
                extra["parity_tolerance_fp16_score_rel"] = opts.fp16_score_tol

        input_spec = InputSpec(name="image", height=hw[0], width=hw[1], max_batch=opts.max_batch)
        preprocess = PreprocessSpec(
            color="rgb", interpolation="linear", scale=1.0 / 255.0, mean=list(spec.mean), std=list(spec.std)
        )
        thr = calibrate_threshold(ort_scores, opts.target_far)
        confirmed = thr.stats["val_far_upper_95"]
        if confirmed > 2 * opts.target_far:
            log.warning(
                "the threshold rests on %d defect-free images: they confirm a false-alarm rate of at most %.1f%% "
                "(95%%), not the %.1f%% target. Defect-free scores are heavy-tailed; pass --calib-data with at least "
                "%d defect-free images of the part",
                len(ort_scores), 100 * confirmed, 100 * opts.target_far,
                images_to_confirm(opts.target_far),
            )  # fmt: skip
        lab_images = labels = lab_scores = None
        if calib.labelled:  # scored once by the FP32 chain: the F1 threshold below and the int8 AUROC use it
            lab_images = load_images([p for p, _ in calib.labelled], hw, spec.mean, spec.std)
            labels = np.array([lab for _, lab in calib.labelled])
            lab_scores, _ = parity.chain_scores(chain, lab_images)
        int8: Int8Spec | None = None
        served = chain  # the chain the runtime will run: its scores go with the calibration frames
        if opts.precision == "int8":
            q_paths, q_source = int8_calibration_images(ckpt, calib, opts.int8_calib_images)
            int8, served = _int8_parts(
                tmp, opts, chain_names, specs, sessions, load_images(q_paths, hw, spec.mean, spec.std), q_source,
                calib_images, ort_scores, float(thr.value), calib.source, lab_images, lab_scores, labels,
                calib.labelled_source,
            )  # fmt: skip
            extra["int8.accepted"] = int8.accepted
        calibration = write_calibration_frames(
            tmp, calib.good, ort_scores, served, preprocess, input_spec, opts.calib_frames
        )

        q = 1.0 - opts.target_far
        f1: dict[str, float] | None = None
        if lab_scores is not None and labels is not None:
            f1 = {k: float(v) for k, v in f1_optimal(lab_scores, labels).items()}
            f1.update({"n_images": float(len(labels)), "n_defective": float(labels.sum())})
            extra["threshold.f1_optimal_source"] = (
                f"{calib.labelled_source}; reported for information only, the operating threshold is the "
                "defect-free rule"
            )
        threshold = ThresholdSpec(
            value=float(thr.value),
            rule=f"{describe_rule(thr.rule, q, thr.margin)}, target false-alarm rate {opts.target_far:g}, scores "
            "from the exported ONNX chain (onnxruntime)",
            source=calib.source,
            stats={**thr.stats, "target_false_alarm_rate": opts.target_far, "margin": thr.margin},
            f1_optimal=f1,
        )
        from export.bundle_writer import file_hashes

        files = file_hashes(tmp)
        manifest = Manifest(
            model_id=model_id(cfg.model.backbone, [files[specs[p].file] for p in chain_names]),
            created=utc_now(),
            backbone=cfg.model.backbone,
            input=input_spec,
            preprocess=preprocess,
            parts=[specs[p] for p in chain_names],
            fused=specs.get("fused"),
            threshold=threshold,
            parity=par,
            files=files,
            versions=tool_versions(),
            extra=extra,
            calibration=calibration,
            int8=int8,
        )
        manifest = finalize_manifest(tmp, manifest)
        if opts.trt:
            from export.tensorrt_build import build_engines

            manifest = build_engines(tmp, precision=opts.precision, max_batch=opts.max_batch)
        if opts.sign is not None:
            from runtime.signing import sign_bundle

            log.info("signed manifest.json with key %s", sign_bundle(tmp, opts.sign))
    log.info("bundle %s: model %s, threshold %.6g (%s)", out, manifest.model_id, manifest.threshold.value, calib.source)
    if manifest.int8 is not None and not manifest.int8.accepted:
        log.warning("%s: %s", out, manifest.int8.verdict)
    return out, manifest


def _int8_parts(
    tmp: Path,
    opts: ExportOptions,
    chain_names: tuple[str, ...],
    specs: dict[str, PartSpec],
    sessions: dict[str, Any],
    quant_images: np.ndarray,
    quant_source: str,
    val_images: np.ndarray,
    val_scores: np.ndarray,
    threshold: float,
    val_source: str,
    lab_images: np.ndarray | None,
    lab_scores: np.ndarray | None,
    labels: np.ndarray | None,
    lab_source: str,
) -> tuple[Int8Spec, list[Any]]:
    """Replace the INT8-able parts in ``tmp`` and ``specs`` by INT8 QDQ graphs; measure their score parity.

    ``quant_images`` (defect-free) set the activation ranges; ``val_images`` with the FP32 chain's ``val_scores``
    measure the deviation against ``threshold`` (the FP32 one, which the bundle keeps). Each FP32 file replaced is
    removed from the bundle. Returns the manifest record and the chain of sessions the bundle now runs.
    """
    from export import int8 as q8
    from export import parity
    from training.metrics import auroc

    fp32_chain = [sessions[p] for p in chain_names]
    feeds = q8.chain_tensors(fp32_chain, quant_images)
    quantized: dict[str, tuple[q8.QuantizedPart, Any]] = {}
    for name in chain_names:
        if name not in q8.INT8_PARTS:
            continue
        part = q8.quantize_part(name, tmp / specs[name].file, tmp / f"{name}.int8.onnx", feeds)
        if part is not None:
            quantized[name] = (part, parity.session(tmp / part.file))
    if not quantized:
        raise ExportError("--precision int8: no part of this model has weights to quantise")

    def chain_with(int8_parts: list[str]) -> list[Any]:
        return [quantized[p][1] if p in int8_parts else sessions[p] for p in chain_names]

    def parity_of(int8_parts: list[str]) -> Any:
        scores, _ = parity.chain_scores(chain_with(int8_parts), val_images)
        return q8.score_parity(val_scores, scores, threshold, opts.int8_score_frac)

    kept = list(quantized)
    par = parity_of(kept)
    solo: dict[str, float] | None = None
    if not par.accepted and len(quantized) > 1:
        # Per-part sensitivity: each part alone in INT8, then the least sensitive parts added one at a time while
        # the whole chain still holds the rule. Nothing passes -> every part stays INT8 and the bundle is marked
        # failed, as before.
        solo_par = {n: parity_of([n]) for n in quantized}
        solo = {n: float(sp.max_frac) for n, sp in solo_par.items()}
        trial_kept: list[str] = []
        trial_par = None
        for n in sorted(quantized, key=lambda n: solo_par[n].max_frac):
            cand = [*trial_kept, n]
            cand_par = solo_par[n] if len(cand) == 1 else parity_of(cand)
            if cand_par.accepted:
                trial_kept, trial_par = cand, cand_par
        each = ", ".join(f"{n} {100 * f:.2f}%" for n, f in solo.items())
        log.info("int8 sensitivity (max deviation, %% of the threshold, each part alone): %s; kept INT8: %s",
                 each, ", ".join(trial_kept) or "none")  # fmt: skip
        if trial_par is not None:
            kept, par = trial_kept, trial_par
    done: list[q8.QuantizedPart] = []
    for name, (part, _) in quantized.items():
        if name in kept:
            (tmp / specs[name].file).unlink()
            specs[name] = specs[name].model_copy(update={"file": part.file, "precision": "int8"})
            done.append(part)
        else:
            (tmp / part.file).unlink()
    chain = chain_with(kept)
    log.info(
        "parity int8 chain vs fp32 (n=%d): max |diff| %.3g = %.2f%% of the threshold, p99 %.3g (rule: <= %.2f%%)",
        par.n_images, par.max_abs, 100 * par.max_frac, par.p99_abs, 100 * par.tolerance_frac,
    )  # fmt: skip
    au32 = au8 = None
    if lab_images is not None and lab_scores is not None and labels is not None:
        au32 = float(auroc(lab_scores, labels))
        au8 = float(auroc(parity.chain_scores(chain, lab_images)[0], labels))
        log.info("int8 image AUROC %.4f vs fp32 %.4f on %s (information only)", au8, au32, lab_source)
    if par.accepted:
        verdict = (
            f"accepted: max |int8 - fp32| score {par.max_abs:.3g} is {par.max_frac:.2%} of the threshold "
            f"(rule <= {par.tolerance_frac:.2%}) on {par.n_images} validation images"
        )
        if solo is not None:
            left = [n for n in quantized if n not in kept]
            verdict += f"; {', '.join(left)} kept FP32 by the per-part sensitivity search (INT8 there broke the rule)"
    else:
        verdict = (
            f"FAILED the parity rule: max |int8 - fp32| score {par.max_abs:.3g} is {par.max_frac:.2%} of the "
            f"threshold (rule <= {par.tolerance_frac:.2%}) on {par.n_images} validation images; the runtime refuses "
            "this bundle unless backend.allow_failed_int8 is set: use the fp32 or fp16 export"
        )
    spec = Int8Spec(
        method=q8.method(len(quant_images)),
        parts=sorted(p.name for p in done),
        fp32_parts=[p for p in chain_names if p not in {d.name for d in done}],
        fp32_nodes=[f"{p.name}/{n}" for p in done for n in p.fp32_nodes],
        calibration_source=quant_source,
        parity_source=val_source,
        n_images=par.n_images,
        threshold=threshold,
        score_max_abs_diff=par.max_abs,
        score_p99_abs_diff=par.p99_abs,
        max_frac_of_threshold=par.max_frac,
        p99_frac_of_threshold=par.p99_frac,
        tolerance_frac_of_threshold=par.tolerance_frac,
        auroc_fp32=au32,
        auroc_int8=au8,
        auroc_source=f"{lab_source} (evaluation only, nothing chosen on it)" if au32 is not None else None,
        part_max_frac=solo,
        accepted=par.accepted,
        verdict=verdict,
    )
    return spec, chain
