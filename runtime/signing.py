"""Bundle signatures: ed25519 over the exact bytes of ``manifest.json``, in ``manifest.sig`` beside it.

``manifest.json`` holds the sha256 of every other file of the bundle, so one signature over its bytes covers the
ONNX parts, engines and calibration frames too: a part changed with its hash recomputed changes the manifest, and
the signature no longer verifies. Hashes alone only catch accidents; the signature says *who* made the bundle.

Key files are one line of base64 each (32 bytes): the private key is the ed25519 seed (``KEY``, mode 0600), the
public key its verify key (``KEY.pub``). A key's id is the first 16 hex digits of the sha256 of the public key.

``manifest.sig`` is JSON::

    {"scheme": "ed25519", "key_id": "<16 hex>", "public_key": "<base64>", "signature": "<base64, 64 bytes>"}

The embedded public key only lets ``rdedge verify`` say who signed it; trust comes from the runtime config's
``trusted_keys`` (or ``--trusted-key``), never from the bundle itself.

PyNaCl (libsodium) does the cryptography; it is imported only when a key is made, a bundle signed or a signature
checked, with an error naming the ``rdedge[sign]`` extra.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from runtime.errors import BundleError, MissingExtraError, RdedgeError

SIGNATURE_NAME: Final = "manifest.sig"
SCHEME: Final = "ed25519"
_KEY_BYTES = 32
_SIG_BYTES = 64


def _nacl_signing() -> Any:
    try:
        import nacl.signing
    except ImportError:
        raise MissingExtraError("pynacl", "sign", "ed25519 bundle signatures") from None
    return nacl.signing


def key_id(public_key: bytes) -> str:
    """First 16 hex digits of ``sha256(public_key)``: a short, stable name for a key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """An ed25519 verify key and where it came from (a file path, for messages)."""

    raw: bytes
    source: str

    @property
    def key_id(self) -> str:
        return key_id(self.raw)


@dataclass(frozen=True)
class SignatureStatus:
    """What :func:`check_signature` found.

    Attributes:
        state: ``unsigned`` (no ``manifest.sig``), ``invalid`` (unreadable, or the signature does not match the
            manifest under the key it names), ``valid`` (matches; ``trusted`` says whether a trusted key made it).
        key_id: id of the key named in ``manifest.sig`` (``""`` when unsigned or unreadable).
        trusted: the signature verifies under one of the given trusted keys.
        detail: one sentence for messages.
    """

    state: Literal["unsigned", "invalid", "valid"]
    key_id: str
    trusted: bool
    detail: str


def _read_key_line(path: Path, what: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise RdedgeError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RdedgeError(f"{path}: cannot read {what}: {exc}") from None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise RdedgeError(f"{path}: not an rdedge {what} (expected one line of base64, {_KEY_BYTES} bytes)")
    return raw


def load_public_key(path: str | Path) -> PublicKey:
    """Read a ``.pub`` file written by :func:`generate_keypair`; raises :class:`RdedgeError` naming the file."""
    path = Path(path)
    return PublicKey(_read_key_line(path, "ed25519 public key"), str(path))


def load_public_keys(paths: Sequence[str | Path]) -> list[PublicKey]:
    """:func:`load_public_key` for each path."""
    return [load_public_key(p) for p in paths]


def generate_keypair(out: str | Path) -> tuple[Path, Path, str]:
    """Write a new private key to ``out`` (mode 0600) and its public key to ``out.pub``; refuse to overwrite.

    Returns:
        ``(private key path, public key path, key id)``.
    """
    signing = _nacl_signing()
    priv, pub = Path(out), Path(f"{out}.pub")
    for p in (priv, pub):
        if p.exists():
            raise RdedgeError(f"{p} already exists; not overwriting a key")
    sk = signing.SigningKey.generate()
    vk = bytes(sk.verify_key)
    priv.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(base64.b64encode(bytes(sk)).decode() + "\n")
    pub.write_text(base64.b64encode(vk).decode() + "\n", encoding="ascii")
    return priv, pub, key_id(vk)


def check_private_key(path: str | Path) -> str:
    """Read a private key (fail early, before a long export); returns its key id."""
    signing = _nacl_signing()
    sk = signing.SigningKey(_read_key_line(Path(path), "ed25519 private key"))
    return key_id(bytes(sk.verify_key))


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> str:
    """Sign ``bundle_dir/manifest.json`` as it is on disk; writes ``manifest.sig`` atomically, returns the key id.

    Sign last: anything that rewrites ``manifest.json`` afterwards (``rdedge build-engines``) invalidates it.
    """
    from runtime.bundle import MANIFEST_NAME

    signing = _nacl_signing()
    bundle_dir = Path(bundle_dir)
    sk = signing.SigningKey(_read_key_line(Path(private_key), "ed25519 private key"))
    data = (bundle_dir / MANIFEST_NAME).read_bytes()
    vk = bytes(sk.verify_key)
    doc = {
        "scheme": SCHEME,
        "key_id": key_id(vk),
        "public_key": base64.b64encode(vk).decode(),
        "signature": base64.b64encode(sk.sign(data).signature).decode(),
    }
    path = bundle_dir / SIGNATURE_NAME
    tmp = path.with_suffix(".sig.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(doc["key_id"])


def check_signature(bundle_dir: str | Path, manifest_bytes: bytes, trusted: Sequence[PublicKey]) -> SignatureStatus:
    """Check ``manifest.sig`` against ``manifest_bytes`` (the manifest exactly as read) and the trusted keys.

    A signature is ``valid`` when it verifies under the public key it embeds, and ``trusted`` when that key is one
    of ``trusted`` (compared by bytes, not by the claimed id).
    """
    path = Path(bundle_dir) / SIGNATURE_NAME
    if not path.is_file():
        return SignatureStatus("unsigned", "", False, f"no {SIGNATURE_NAME}: the bundle is not signed")
    signing = _nacl_signing()
    from nacl.exceptions import BadSignatureError

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("scheme") != SCHEME:
            raise ValueError(f"scheme must be {SCHEME!r}")
        vk = base64.b64decode(str(doc["public_key"]), validate=True)
        sig = base64.b64decode(str(doc["signature"]), validate=True)
        if len(vk) != _KEY_BYTES or len(sig) != _SIG_BYTES:
            raise ValueError("wrong key or signature length")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, binascii.Error) as exc:
        return SignatureStatus("invalid", "", False, f"{path}: unreadable signature file ({exc})")
    kid = key_id(vk)
    try:
        signing.VerifyKey(vk).verify(manifest_bytes, sig)
    except BadSignatureError:
        detail = f"{path}: signature by key {kid} does not match manifest.json (altered after signing)"
        return SignatureStatus("invalid", kid, False, detail)
    trusted_by = [k for k in trusted if k.raw == vk]
    if trusted_by:
        return SignatureStatus("valid", kid, True, f"signed by trusted key {kid} ({trusted_by[0].source})")
    return SignatureStatus("valid", kid, False, f"signed by key {kid}, which is not a trusted key")


def require_trusted_signature(bundle_dir: str | Path, manifest_bytes: bytes, trusted: Sequence[PublicKey]) -> str:
    """Raise :class:`BundleError` unless the manifest is signed by one of ``trusted``; returns the key id."""
    status = check_signature(bundle_dir, manifest_bytes, trusted)
    if not status.trusted:
        ids = ", ".join(k.key_id for k in trusted)
        raise BundleError(
            f"{bundle_dir}: refused: {status.detail}; trusted_keys requires a signature by one of [{ids}] "
            "(sign with 'rdedge export --sign KEY', check with 'rdedge verify BUNDLE --trusted-key KEY.pub')"
        )
    return status.key_id
