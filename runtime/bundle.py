"""The bundle: the only contract between ``export`` (writer) and ``runtime`` (reader).

A bundle is a directory::

    manifest.json        this schema (versioned)
    teacher.onnx         image -> f1, f2, f3              (frozen ImageNet teacher)
    projection.onnx      f1, f2, f3 -> p1, p2, p3         (identity or trained projection)
    ocbe.onnx            p1, p2, p3 -> z                  (one-class bottleneck embedding)
    decoder.onnx         z -> d1, d2, d3                  (student)
                         z, f1, f2, f3 -> d1, d2, d3      (RD-E student with guided information injection)
    density.onnx         f1, f2, f3 -> density_map (B,1,H/8,W/8)   (optional: per-position Gaussian, FP32)
    score.onnx           f1, f2, f3, d1, d2, d3 [, density_map] -> anomaly_map (B,1,H,W), score (B,)   (FP32)
    model.onnx           optional fused graph image -> anomaly_map, score
    <part>.int8.onnx     instead of teacher/projection/ocbe/decoder.onnx in an INT8 bundle (``--precision int8``):
                         QDQ graphs with FP32 inputs/outputs; ``manifest.int8`` records their score parity
    classifier.onnx      optional (``rdedge label-tune``): image, anomaly_map, score -> probability (B,)  (FP32)
    engines/*.engine     optional TensorRT engines, keyed by TensorRT version, GPU name and ONNX sha256
    calib.npy            optional: a few calibration frames, uint8 BGR (N, H, W, 3), with their scores in the manifest
    manifest.sig         optional ed25519 signature over manifest.json's bytes (``runtime.signing``)

A few-shot bundle (``rdedge train --shots K``) has the chain ``teacher, density, score`` instead: the fine-tuned
teacher, the per-position density, and a score part whose ``score`` is the Mahalanobis distance of the pooled
embedding (inputs ``f1, f2, f3, density_map``).

Parts run in ``chain`` order; each part reads its inputs by name from the tensors produced so far (checked when the
manifest is read), so the runtime can keep every intermediate tensor on the device. An RD-E bundle has the same
parts; its ``teacher.onnx`` is the fine-tuned teacher (the frozen expert of training is never exported) and its
decoder also reads ``f1, f2, f3``; ``extra["objective"]`` says which (absent in bundles older than RD-E: ``rd``).
Export writes ``manifest.json`` through :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.errors import BundleError

if TYPE_CHECKING:
    from runtime.signing import PublicKey

SCHEMA_VERSION: Final = 1
MANIFEST_NAME = "manifest.json"
CHAIN = ("teacher", "projection", "ocbe", "decoder", "score")
#: The chain with the optional density head (its map is fused into the score part's).
CHAIN_WITH_DENSITY = ("teacher", "projection", "ocbe", "decoder", "density", "score")
#: The few-shot chain (``rdedge train --shots K``): fine-tuned teacher, per-position density, score (the image score
#: is the Mahalanobis distance of the pooled embedding, computed in the score part from f1..f3).
CHAIN_FEWSHOT = ("teacher", "density", "score")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A named tensor; ``-1`` in ``shape`` marks the dynamic batch axis."""

    name: str
    shape: list[int]
    dtype: Literal["float32", "float16"] = "float32"


class PartSpec(_Strict):
    """One ONNX graph of the chain."""

    name: str = Field(..., description="teacher | projection | ocbe | decoder | density | score | fused")
    file: str = Field(..., description="ONNX file, relative to the bundle")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="precision the ONNX graph's weights are stored in (int8: QDQ graph, see Manifest.int8)"
    )
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class EngineSpec(_Strict):
    """A TensorRT engine built for one part on one device."""

    part: str
    file: str = Field(..., description="engine file, relative to the bundle")
    precision: Literal["fp32", "fp16"]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str | None = Field(
        None, description="CUDA compute capability of the build GPU, 'major.minor' (e.g. '8.7' for every Orin)"
    )
    sm_count: int | None = Field(
        None, ge=1, description="streaming multiprocessors of the build GPU (tells AGX Orin / NX / Nano apart)"
    )
    onnx_sha256: str = Field(..., description="sha256 of the ONNX file the engine was built from")
    max_batch: int = Field(1, ge=1, description="top of the engine's optimisation profile (batch axis)")


class InputSpec(_Strict):
    name: str = "image"
    height: int = Field(..., gt=0)
    width: int = Field(..., gt=0)
    channels: Literal[3] = 3
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    max_batch: int = Field(1, ge=1)


class PreprocessSpec(_Strict):
    """Frame (uint8 BGR, as OpenCV decodes) -> model input. Training uses the same steps.

    Steps: grey -> 3 channels; BGR -> ``color``; ``cv2.resize`` to (width, height) with ``interpolation``;
    float32 * ``scale``; ``(x - mean) / std`` per channel; HWC -> CHW; add batch axis.
    """

    color: Literal["rgb", "bgr"] = "rgb"
    interpolation: Literal["linear", "area", "nearest", "cubic"] = "linear"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(..., min_length=3, max_length=3)
    std: list[float] = Field(..., min_length=3, max_length=3)


class ThresholdSpec(_Strict):
    """The OK/NG threshold on the image score and how it was set."""

    value: float = Field(..., description="score >= value -> NG")
    rule: str = Field(..., description="e.g. 'quantile+margin' on defect-free validation images")
    source: str = Field(..., description="which images set it, e.g. 'train/good validation split (n=25)'")
    stats: dict[str, float] = Field(default_factory=dict, description="statistics behind the rule")
    f1_optimal: dict[str, float] | None = Field(None, description="threshold, precision, recall, f1 on labelled data")


class CalibrationSpec(_Strict):
    """A few defect-free validation frames and the scores the exported chain gave them (load-time sanity check).

    The runtime scores ``file`` through its own preprocessing and backend when it loads the bundle and refuses the
    bundle when a score moved (weights altered, wrong preprocessing, a broken engine).
    """

    file: str = Field(..., description="uint8 BGR frames (N, H, W, 3) at the input size, numpy .npy")
    scores: list[float] = Field(..., min_length=1, description="image score of each frame, onnxruntime FP32 chain")
    source: str = Field(..., description="which images, e.g. 'validation split: 4 of 25 spread over the scores'")


class ClassifierSpec(_Strict):
    """An optional classifier fitted on a few labelled images (``rdedge label-tune``) and the decision rule it sets.

    The part runs after the chain (or the fused graph) on onnxruntime: it reads the preprocessed ``image`` and the
    chain's ``anomaly_map`` and ``score`` and gives ``probability`` ``(B,)``, the calibrated probability of a defect.
    """

    part: PartSpec = Field(..., description="the ONNX graph: image, anomaly_map, score -> probability")
    decision: Literal["classifier", "either"] = Field(
        ..., description="classifier: NG iff probability >= probability_threshold; either: that or score >= threshold"
    )
    probability_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="NG when probability >= this")
    rule: str = Field(..., description="the decision rule in words, as the verdicts apply it")
    model: str = Field(..., description="what was fitted, e.g. 'logistic regression (C=0.1), Platt-calibrated'")
    features: str = Field(..., description="what the classifier reads")
    source: str = Field(..., description="which labelled images fitted it (folder, counts per class)")
    stats: dict[str, float] = Field(default_factory=dict, description="cross-validated figures on those images")
    feature_set: str | None = Field(
        None, description="the features the classifier uses (chosen by cross-validation; absent in older bundles)"
    )


class Int8Spec(_Strict):
    """How the bundle's INT8 parts were made and how closely they score like the FP32 chain (``--precision int8``).

    The deviation is ``|score_int8 - score_fp32|`` per image, both chains run by onnxruntime on the export machine;
    the rule is ``score_max_abs_diff <= tolerance_frac_of_threshold * threshold``. A bundle whose parts failed it
    is still written (``accepted`` false, ``verdict`` says why) and the runtime refuses it unless
    ``backend.allow_failed_int8`` is set.
    """

    method: str = Field(..., description="quantiser and settings, e.g. 'onnxruntime quantize_static, QDQ, ...'")
    parts: list[str] = Field(..., min_length=1, description="parts stored as INT8 QDQ graphs")
    fp32_parts: list[str] = Field(..., description="parts of the chain kept in FP32 (score, density, ...)")
    fp32_nodes: list[str] = Field(default_factory=list, description="nodes of INT8 parts kept FP32 (fragile ops)")
    calibration_source: str = Field(..., description="the defect-free images the activation ranges come from")
    parity_source: str = Field(..., description="the defect-free images the deviation is measured on")
    n_images: int = Field(..., ge=1, description="images of parity_source")
    threshold: float = Field(..., description="the FP32 chain's threshold the fractions refer to (score units)")
    score_max_abs_diff: float = Field(..., ge=0, description="max |int8 - fp32| image score, score units")
    score_p99_abs_diff: float = Field(..., ge=0, description="99th percentile of |int8 - fp32|, score units")
    max_frac_of_threshold: float = Field(..., ge=0, description="score_max_abs_diff / |threshold|")
    p99_frac_of_threshold: float = Field(..., ge=0, description="score_p99_abs_diff / |threshold|")
    tolerance_frac_of_threshold: float = Field(..., gt=0, description="the rule's bound on max_frac_of_threshold")
    auroc_fp32: float | None = Field(None, description="image AUROC of the FP32 chain on labelled images (information)")
    auroc_int8: float | None = Field(None, description="image AUROC of the INT8 chain on the same images")
    auroc_source: str | None = Field(None, description="which labelled images (evaluation only: nothing chosen)")
    part_max_frac: dict[str, float] | None = Field(
        None,
        description="each quantisable part's max score deviation (fraction of |threshold|) when it alone is INT8: "
        "the per-part sensitivity search that chose ``parts`` when every part at once failed the rule",
    )
    accepted: bool = Field(..., description="the parity rule held")
    verdict: str = Field(..., description="the outcome in one sentence")


class Manifest(_Strict):
    """``manifest.json``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model_id: str = Field(..., min_length=1)
    created: str = Field(..., description="ISO 8601 UTC time of export")
    backbone: str
    input: InputSpec
    preprocess: PreprocessSpec
    parts: list[PartSpec]
    fused: PartSpec | None = None
    engines: list[EngineSpec] = Field(default_factory=list)
    threshold: ThresholdSpec
    parity: dict[str, float] = Field(default_factory=dict, description="max abs / rel errors vs torch")
    files: dict[str, str] = Field(..., description="sha256 of every file in the bundle except manifest.json")
    versions: dict[str, str] = Field(default_factory=dict, description="rdedge, torch, onnx, onnxruntime, tensorrt")
    extra: dict[str, str | float | int | bool] = Field(default_factory=dict, description="free-form metadata")
    calibration: CalibrationSpec | None = Field(None, description="frames + scores for the load-time check")
    classifier: ClassifierSpec | None = Field(None, description="optional labelled-defect classifier and its rule")
    int8: Int8Spec | None = Field(None, description="INT8 parts: how they were quantised, their score parity")

    @model_validator(mode="after")
    def _chain_complete(self) -> Manifest:
        names = [p.name for p in self.parts]
        int8 = sorted(p.name for p in [*self.parts, *([self.fused] if self.fused else [])] if p.precision == "int8")
        if int8 and self.int8 is None:
            raise ValueError(f"parts {int8} are int8 but the manifest has no 'int8' parity record")
        if self.int8 is not None and sorted(self.int8.parts) != int8:
            raise ValueError(f"int8.parts {sorted(self.int8.parts)} differ from the parts stored as int8 {int8}")
        if names not in (list(CHAIN), list(CHAIN_WITH_DENSITY), list(CHAIN_FEWSHOT)):
            raise ValueError(
                f"parts must be {list(CHAIN)} (or with 'density' before 'score', or the few-shot "
                f"{list(CHAIN_FEWSHOT)}) in order, got {names}"
            )
        specs: list[PartSpec | EngineSpec | CalibrationSpec] = [
            *self.parts,
            *([self.fused] if self.fused else []),
            *([self.classifier.part] if self.classifier else []),
            *self.engines,
            *([self.calibration] if self.calibration else []),
        ]
        for spec in specs:
            if spec.file not in self.files:
                raise ValueError(f"file {spec.file!r} has no sha256 in 'files'")
        produced = {self.input.name}
        for part in self.parts:  # every input exists by the time its part runs (e.g. an RD-E decoder's f1..f3)
            missing = [t.name for t in part.inputs if t.name not in produced]
            if missing:
                raise ValueError(f"part {part.name!r} reads {missing}, which no earlier part produces")
            produced.update(t.name for t in part.outputs)
        return self

    def part(self, name: str) -> PartSpec:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest_bytes(bundle_dir: str | Path) -> bytes:
    """The bytes of ``manifest.json`` (what a signature covers); raises :class:`BundleError` when missing."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing (is {bundle_dir} a bundle written by 'rdedge export'?)")
    return path.read_bytes()


def read_manifest(bundle_dir: str | Path, raw: bytes | None = None) -> Manifest:
    """Parse and validate ``manifest.json`` (or ``raw``, its bytes as already read); raises :class:`BundleError`
    naming the file and field."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if raw is None:
        raw = read_manifest_bytes(bundle_dir)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: corrupt JSON: {exc}") from None
    if isinstance(data, dict) and data.get("schema_version") not in (None, SCHEMA_VERSION):
        raise BundleError(
            f"{path}: schema_version {data.get('schema_version')!r} is not supported by this runtime "
            f"(supports {SCHEMA_VERSION}); upgrade rdedge or re-export the bundle"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"{path}: invalid manifest: {errs}") from None


def verify_files(bundle_dir: str | Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Check the sha256 of every listed file (or just ``only``); raises :class:`BundleError` on the first mismatch."""
    bundle_dir = Path(bundle_dir)
    for rel, expected in manifest.files.items():
        if only is not None and rel not in only:
            continue
        path = bundle_dir / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): "
                "the file was changed or corrupted; re-export the bundle"
            )


def load_manifest(
    bundle_dir: str | Path, verify: bool = True, trusted_keys: Sequence[PublicKey] | None = None
) -> Manifest:
    """Read the manifest and (by default) verify every file hash.

    Args:
        bundle_dir: the bundle.
        verify: check every listed file's sha256.
        trusted_keys: when given (non-empty), refuse the bundle unless ``manifest.sig`` verifies under one of them;
            the hashes are then always checked, since the signature covers the files only through them.

    Raises:
        BundleError: missing, corrupt, unsigned or wrongly signed (with ``trusted_keys``), or a file's hash differs.
    """
    raw = read_manifest_bytes(bundle_dir)
    if trusted_keys:
        from runtime.signing import require_trusted_signature

        require_trusted_signature(bundle_dir, raw, trusted_keys)  # the same bytes that are parsed below
    manifest = read_manifest(bundle_dir, raw)
    if verify or trusted_keys:
        verify_files(bundle_dir, manifest)
    return manifest


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + fsync + rename)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
