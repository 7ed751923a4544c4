"""Write a bundle all-or-nothing: build it in a hidden sibling folder, validate it, rename it into place.

``BUNDLE_DIR`` only ever appears complete: the staging folder ``.<name>.staging-<pid>-<random>`` lives next to it (same
file system, so the final ``os.rename`` is atomic), is deleted on any exception, and a staging folder left behind by
a killed process (its pid no longer runs) is removed by the next export into the same parent. With ``force`` an
existing bundle is first renamed aside (``.<name>.old-<pid>``), the new one renamed in, then the old one deleted; if
the second rename fails the old bundle is put back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from export.errors import ExportError
from runtime.bundle import MANIFEST_NAME, Manifest, load_manifest, sha256_file, write_manifest
from runtime.signing import SIGNATURE_NAME

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> None:
    """Remove ``.<name>.staging-<pid>-*`` folders next to ``out`` whose process is gone."""
    parent = out.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".{out.name}.staging-*"):
        try:
            pid = int(p.name.rsplit(".staging-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            log.info("removing staging folder of an interrupted export: %s", p)
            shutil.rmtree(p, ignore_errors=True)


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force`` (called before any work)."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit it becomes ``out``, on an exception it is deleted."""
    out = Path(out).absolute()
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old: Path | None = None
    if out.exists():
        if not force:
            raise ExportError(f"{out} appeared while exporting; not replacing it without --force")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("bundle written: %s", out)


def file_hashes(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``bundle_dir`` except ``manifest.json``, ``manifest.sig`` (which cover the others)
    and temp files, by relative path."""
    out = {}
    for f in sorted(bundle_dir.rglob("*")):
        rel = f.relative_to(bundle_dir).as_posix()
        if f.is_file() and rel not in (MANIFEST_NAME, SIGNATURE_NAME) and not rel.endswith(".tmp"):
            out[rel] = sha256_file(f)
    return out


def model_id(backbone: str, onnx_hashes: list[str]) -> str:
    """``rd-<backbone>-<sha8>``: sha8 = first 8 hex of the sha256 over the parts' sha256s in chain order."""
    h = hashlib.sha256("".join(onnx_hashes).encode()).hexdigest()[:8]
    return f"rd-{backbone}-{h}"


def tool_versions() -> dict[str, str]:
    """Versions of rdedge, torch, onnx, onnxruntime and (when importable) tensorrt."""
    from importlib import metadata

    out = {}
    for dist, mod in (("rdedge", None), ("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        try:
            out[dist] = metadata.version(dist) if mod is None else str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - a missing tool just has no entry
            continue
    with contextlib.suppress(Exception):
        import tensorrt

        out["tensorrt"] = str(tensorrt.__version__)
    return out


def utc_now() -> str:
    """ISO 8601 UTC time, seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def finalize_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file, write ``manifest.json`` atomically and read it back through the runtime's validation."""
    manifest = manifest.model_copy(update={"files": file_hashes(bundle_dir)})
    manifest = Manifest.model_validate(manifest.model_dump())  # re-run the validators on the final content
    write_manifest(bundle_dir, manifest)
    return load_manifest(bundle_dir, verify=True)
