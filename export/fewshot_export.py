"""``rdedge export`` of a few-shot run (``rdedge train --shots K``): three ONNX parts the runtime chains as it does RD.

Parts (``runtime.bundle.CHAIN_FEWSHOT``):

    teacher.onnx   image -> f1, f2, f3                          the contrastively fine-tuned teacher
    density.onnx   f1, f2, f3 -> density_map (B,1,H/8,W/8)      per-position Gaussian (training.scoring.DensityHead)
    score.onnx     f1, f2, f3, density_map -> anomaly_map (B,1,H,W), score (B,)
                   anomaly_map: the density map upsampled and blurred; score: Mahalanobis distance of the
                   L2-normalised pooled embedding (training.fewshot.EmbeddingGaussian)

Each part is checked against torch on two inputs, the chain's scores on the K images (ORT vs torch), the K images
become the calibration frames, and the threshold is the run's (leave-one-out or augmentation on the K images,
stated in ``manifest.threshold``). Everything else (atomic write, hashes, signature) is the RD export's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle_writer import check_target, finalize_manifest, model_id, staging, tool_versions, utc_now
from export.errors import ExportError, require
from runtime.bundle import CHAIN_FEWSHOT, InputSpec, Manifest, PartSpec, PreprocessSpec, ThresholdSpec

log = logging.getLogger(__name__)

PART_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "teacher": (("image",), ("f1", "f2", "f3")),
    "density": (("f1", "f2", "f3"), ("density_map",)),
    "score": (("f1", "f2", "f3", "density_map"), ("anomaly_map", "score")),
}


def _modules(model: Any) -> dict[str, Any]:
    from torch import Tensor, nn

    class Teacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = model.trunk

        def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            f1, f2, f3 = self.trunk(image)
            return f1, f2, f3

    class Density(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.density = model.density

        def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> tuple[Tensor]:
            return (self.density(f1, f2, f3),)

    class Score(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, f1: Tensor, f2: Tensor, f3: Tensor, density_map: Tensor) -> tuple[Tensor, Tensor]:
            return self.model.amap(density_map), self.model.gaussian(f1, f2, f3)

    return {"teacher": Teacher().eval(), "density": Density().eval(), "score": Score().eval()}


def _reference(mods: dict[str, Any], x: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        t: dict[str, Any] = {"image": torch.from_numpy(x)}
        for name in CHAIN_FEWSHOT:
            ins, outs = PART_IO[name]
            t.update(zip(outs, mods[name](*(t[k] for k in ins)), strict=True))
    return {k: v.numpy().astype(np.float32) for k, v in t.items()}


def export_fewshot(opts: Any) -> tuple[Path, Manifest]:
    """Export the few-shot run ``opts.run`` (an :class:`export.pipeline.ExportOptions`) to the bundle ``opts.out``.

    ``image_size``, ``calib_data``, ``fused``, ``trt`` and ``precision=fp16`` do not apply (logged when set).

    Raises:
        ExportError / ParityError: existing bundle, bad options, parity beyond tolerance.
        CheckpointError: missing or foreign few-shot checkpoint.
    """
    require("torch", "export", "export")
    require("onnx", "export", "ONNX export")
    require("onnxruntime", "export", "parity checks")
    import torch

    from export import onnx_parts, parity
    from export.pipeline import load_images, write_calibration_frames
    from training.backbones import get_spec
    from training.fewshot import load_fewshot

    out = Path(opts.out)
    check_target(out, opts.force)
    if opts.image_size or opts.calib_data or opts.fused or opts.trt:
        log.warning("few-shot export: --image-size, --calib-data, --fused and --trt do not apply; ignored")
    model, cfg, ckpt = load_fewshot(opts.run)
    spec = get_spec(cfg.backbone)
    hw = cfg.input_hw()
    shots = [Path(p) for p in ckpt["shots"]]
    missing = [p for p in shots if not p.is_file()]
    if missing:
        raise ExportError(f"few-shot image {missing[0]} recorded by the run is missing; export where the data is")
    images = load_images(shots, hw, spec.mean, spec.std)
    mods = _modules(model)
    rng = np.random.default_rng(opts.seed)
    refs = [_reference(mods, rng.standard_normal((2, 3, *hw)).astype(np.float32)), _reference(mods, images[:1])]
    par: dict[str, float] = {}
    with staging(out, opts.force) as tmp:
        specs, sessions = {}, []
        for name in CHAIN_FEWSHOT:
            ins, outs = PART_IO[name]
            path = tmp / f"{name}.onnx"
            example = tuple(torch.from_numpy(refs[0][k]) for k in ins)
            onnx_parts.export_torch_part(mods[name], name, example, path, opts.opset, (ins, outs))
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
                inputs=onnx_parts.tensor_specs(ins, [refs[0][k] for k in ins]),
                outputs=onnx_parts.tensor_specs(outs, [refs[0][k] for k in outs]),
            )
            sessions.append(sess)
        ort_scores, _ = parity.chain_scores(sessions, images)
        ref_scores = _reference(mods, images)["score"]
        err = parity.errors([ref_scores], [ort_scores])
        parity.check(f"K-image scores (n={len(images)})", *err, opts.score_tol)
        par["calib_score_max_abs"], par["calib_score_max_rel"] = err
        input_spec = InputSpec(name="image", height=hw[0], width=hw[1], max_batch=opts.max_batch)
        preprocess = PreprocessSpec(mean=list(spec.mean), std=list(spec.std))
        calibration = write_calibration_frames(
            tmp, shots, ort_scores, sessions, preprocess, input_spec, opts.calib_frames
        )
        thr = ckpt["threshold"]
        held = np.asarray(thr["scores"], np.float64)
        threshold = ThresholdSpec(
            value=float(thr["value"]),
            rule=thr["rule"],
            source=f"the K = {len(shots)} few-shot images of the run (no other image seen)",
            stats={
                "n": float(held.size),
                "min": float(held.min()),
                "median": float(np.median(held)),
                "max": float(held.max()),
            },  # fmt: skip
        )
        extra: dict[str, str | float | int | bool] = {
            "exporter": "torch.onnx (TorchScript, dynamo=False)",
            "opset": opts.opset,
            "objective": "fewshot",
            "fewshot.shots": len(shots),
            "fewshot.negatives": cfg.negatives,
            "fewshot.steps": cfg.steps,
            "fewshot.image_score": "Mahalanobis distance of the L2-normalised pooled teacher embedding (Ledoit-Wolf)",
            "fewshot.anomaly_map": f"per-position Gaussian at stride 8 ({cfg.density_dims} PCA dims), sigma "
            f"{cfg.sigma:g} px blur",
            "train_image_size": cfg.image_size,
            "train_input_hw": f"{hw[0]}x{hw[1]}",
            "parity_tolerance_part_rel": opts.parity_tol,
            "parity_tolerance_score_rel": opts.score_tol,
        }
        from export.bundle_writer import file_hashes

        files = file_hashes(tmp)
        manifest = Manifest(
            model_id=model_id(f"fewshot{len(shots)}-{cfg.backbone}", [files[specs[p].file] for p in CHAIN_FEWSHOT]),
            created=utc_now(),
            backbone=cfg.backbone,
            input=input_spec,
            preprocess=preprocess,
            parts=[specs[p] for p in CHAIN_FEWSHOT],
            threshold=threshold,
            parity=par,
            files=files,
            versions=tool_versions(),
            extra=extra,
            calibration=calibration,
        )
        manifest = finalize_manifest(tmp, manifest)
        if opts.sign is not None:
            from runtime.signing import sign_bundle

            log.info("signed manifest.json with key %s", sign_bundle(tmp, opts.sign))
    log.info("few-shot bundle %s: model %s, threshold %.6g (%s)", out, manifest.model_id, threshold.value, thr["rule"])
    return out, manifest
