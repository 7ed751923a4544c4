"""Bundle signatures and the load-time calibration check, on the real tiny bundle with real ed25519 keys.

The attack of issue 10: a weight altered in an ONNX part, its sha256 recomputed in the manifest. Hashes pass; the
signature (by a key the runtime does not trust, or none) and the calibration scores do not.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from runtime.bundle import MANIFEST_NAME, load_manifest, sha256_file
from runtime.cli import check_config, main
from runtime.config import BackendConfig, parse_config
from runtime.engine import AnomalyModel
from runtime.errors import BundleError, RdedgeError
from runtime.signing import (
    SIGNATURE_NAME,
    check_signature,
    generate_keypair,
    load_public_key,
    sign_bundle,
)
from tests.helpers.onnx_bundle import make_tiny_bundle

pytest.importorskip("nacl")

CPU = BackendConfig(threads=1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real key pairs: ``trusted`` (the line's) and ``other`` (an attacker's)."""
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "trusted")
    generate_keypair(d / "other")
    return {"trusted": d / "trusted", "other": d / "other"}


@pytest.fixture
def signed(tmp_path: Path, tiny_bundle: Path, keys: dict[str, Path]) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    sign_bundle(bundle, keys["trusted"])
    return bundle


def _tamper(bundle: Path, part: str, initializer: str, scale: float) -> None:
    """Scale one weight tensor of ``part`` and recompute its sha256 in manifest.json (the hashes then pass)."""
    path = bundle / f"{part}.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == initializer:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale), initializer))
            break
    else:
        raise AssertionError(f"{initializer} not in {path}")
    onnx.save(model, str(path))
    doc = json.loads((bundle / MANIFEST_NAME).read_text())
    doc["files"][path.name] = sha256_file(path)
    (bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    priv, pub, kid = generate_keypair(tmp_path / "k")
    assert priv.stat().st_mode & 0o777 == 0o600 and pub == tmp_path / "k.pub"
    assert load_public_key(pub).key_id == kid and len(kid) == 16
    with pytest.raises(RdedgeError, match="already exists"):
        generate_keypair(tmp_path / "k")
    (tmp_path / "bad.pub").write_text("not a key\n")
    with pytest.raises(RdedgeError, match="bad.pub: not an rdedge ed25519 public key"):
        load_public_key(tmp_path / "bad.pub")


def test_correctly_signed_bundle_loads_with_trusted_keys(signed: Path, keys: dict[str, Path]) -> None:
    status = check_signature(signed, (signed / MANIFEST_NAME).read_bytes(), [load_public_key(f"{keys['trusted']}.pub")])
    assert status.state == "valid" and status.trusted
    pubs = [Path(f"{keys['other']}.pub"), Path(f"{keys['trusted']}.pub")]  # any one of the list will do
    with AnomalyModel(signed, CPU, trusted_keys=pubs) as model:
        assert model.calibration is not None and model.calibration.frames == 4
        assert model.calibration.max_abs_diff <= model.calibration.tolerance


def test_unsigned_bundle_is_refused_when_trusted_keys_are_set(tiny_bundle: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match=r"refused: no manifest\.sig: the bundle is not signed") as err:
        AnomalyModel(tiny_bundle, CPU, trusted_keys=[Path(f"{keys['trusted']}.pub")])
    assert str(tiny_bundle) in str(err.value)
    with AnomalyModel(tiny_bundle, CPU) as model:  # no trusted_keys: signatures are not required
        assert model.calibration is not None


def test_tampered_weights_with_recomputed_hash_resigned_by_another_key_are_refused(
    signed: Path, keys: dict[str, Path]
) -> None:
    _tamper(signed, "decoder", "decoder.w3", 0.0)
    sign_bundle(signed, keys["other"])  # the attacker re-signs with their own key
    load_manifest(signed, verify=True)  # the hashes alone pass: that was the hole
    other_id = load_public_key(f"{keys['other']}.pub").key_id
    with pytest.raises(BundleError, match=f"signed by key {other_id}, which is not a trusted key"):
        AnomalyModel(signed, CPU, trusted_keys=[Path(f"{keys['trusted']}.pub")])


def test_manifest_altered_after_signing_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    _tamper(signed, "decoder", "decoder.w3", 0.0)  # keeps the old manifest.sig
    with pytest.raises(BundleError, match="does not match manifest.json"):
        AnomalyModel(signed, CPU, trusted_keys=[Path(f"{keys['trusted']}.pub")])
    (signed / SIGNATURE_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable signature file"):
        AnomalyModel(signed, CPU, trusted_keys=[Path(f"{keys['trusted']}.pub")])


def test_trusted_keys_force_hash_checks_even_without_verify(signed: Path, keys: dict[str, Path]) -> None:
    (signed / "score.onnx").write_bytes((signed / "score.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match="score.onnx: sha256 mismatch"):
        AnomalyModel(signed, CPU, verify=False, trusted_keys=[Path(f"{keys['trusted']}.pub")])


@pytest.mark.parametrize(
    ("part", "initializer", "scale"), [("decoder", "decoder.w3", 0.0), ("teacher", "teacher.b1", 3.0)]
)
def test_scores_that_moved_are_refused_even_when_signed_by_the_trusted_key(
    signed: Path, keys: dict[str, Path], part: str, initializer: str, scale: float
) -> None:
    _tamper(signed, part, initializer, scale)
    sign_bundle(signed, keys["trusted"])  # e.g. a broken re-export signed in good faith
    with pytest.raises(BundleError, match=r"calibration scores moved .*frame \d: recorded [\d.]+, got [\d.]+") as err:
        AnomalyModel(signed, CPU, trusted_keys=[Path(f"{keys['trusted']}.pub")])
    assert str(signed) in str(err.value) and "calib.npy" in str(err.value)
    with AnomalyModel(signed, CPU, verify=False) as model:  # the check sits behind verify, like the hashes
        assert model.calibration is None


def test_bundle_without_calibration_frames_loads_with_an_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_tiny_bundle(tmp_path / "old", calibration=False, threshold=1.0)
    with caplog.at_level(logging.INFO, logger="runtime.engine"), AnomalyModel(bundle, CPU) as model:
        assert model.calibration is None
    assert "ships no calibration frames" in caplog.text and "check skipped" in caplog.text


def test_config_trusted_keys_field_and_check_config_strict_refuses(
    tmp_path: Path, tiny_bundle: Path, keys: dict[str, Path]
) -> None:
    cam = {"name": "c0", "source": {"kind": "folder", "path": str(tmp_path)}}
    with pytest.raises(RdedgeError, match="trusted_keys: List should have at least 1 item"):
        parse_config({"bundle": str(tiny_bundle), "cameras": [cam], "trusted_keys": []}, "cfg.yaml")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        json.dumps(
            {"bundle": str(tiny_bundle), "cameras": [cam], "mqtt": None, "trusted_keys": [f"{keys['trusted']}.pub"]}
        )
    )
    errors, _ = check_config(cfg, strict=True)
    assert len(errors) == 1 and "bundle:" in errors[0] and "not signed" in errors[0]
    cfg.write_text(json.dumps({"bundle": str(tiny_bundle), "cameras": [cam], "trusted_keys": ["/nope.pub"]}))
    errors, _ = check_config(cfg, strict=True)
    assert any("trusted_keys.0: file not found" in e for e in errors)


def test_verify_verb_reports_each_check_and_exits_non_zero_on_failure(
    signed: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    trusted, other = f"{keys['trusted']}.pub", f"{keys['other']}.pub"
    assert main(["verify", str(signed), "--trusted-key", trusted]) == 0
    out = capsys.readouterr().out
    assert "files: ok" in out and "signature: ok, signed by trusted key" in out and "calibration: ok" in out
    assert main(["verify", str(signed), "--trusted-key", other]) == 1
    assert "signature: FAILED" in capsys.readouterr().out
    _tamper(signed, "decoder", "decoder.w3", 0.0)
    sign_bundle(signed, keys["trusted"])
    assert main(["verify", str(signed), "--trusted-key", trusted]) == 1
    out = capsys.readouterr().out
    assert "signature: ok" in out and "calibration: FAILED" in out and out.rstrip().endswith("FAILED")
    assert main(["verify", str(signed), "--no-calibration"]) == 0
    assert "signature: valid, key" in capsys.readouterr().out
