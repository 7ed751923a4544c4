"""The NG archive: NG and borderline frames saved with overlay, raw crop and metadata, under a disk quota.

Layout: ``<dir>/<name>.jpg`` (heatmap overlay), ``<name>.png`` (the frame the model saw, lossless: review copies it
into a data set), ``<name>.json`` (metadata: time, camera, seq, frame_seq, score, threshold, verdict, model id,
trigger id, review). ``<name>`` is ``<epoch ms, 13 digits>_<camera>_<seq>`` so names sort oldest first; only names
matching :data:`NAME_RE` are ever turned into paths (no traversal).

Writes happen on a writer thread behind a bounded queue; :meth:`Archive.offer` never blocks and counts what it
drops. After each write the oldest frames are deleted until the folder fits ``max_mb``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import cv2

from runtime.config import StationArchiveConfig
from runtime.outputs import VerdictEvent

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^\d{13}_[A-Za-z0-9_-]+_\d+$")
KINDS = {"jpg": ".jpg", "png": ".png"}
LABELS = ("false_reject", "confirmed_defect")


class ArchiveError(ValueError):
    """A bad archive request (unknown name, bad label); the message says which."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (readers never see a partial file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Archive:
    """Archive of NG / borderline frames.

    Args:
        cfg: ``ui.archive`` settings.
    """

    def __init__(self, cfg: StationArchiveConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(cfg.max_mb * 2**20)
        self._q: queue.Queue[VerdictEvent | None] = queue.Queue(maxsize=cfg.queue_size)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> bytes, oldest first
        self._meta: dict[str, dict[str, Any]] = {}  # name -> metadata (the .json files, read once at start)
        self.bytes = 0
        self.dropped = 0  # queue full
        self.written = 0
        self.deleted = 0  # quota
        self.failed = 0  # write errors
        for meta in sorted(self.dir.glob("*.json")):
            name = meta.stem
            if NAME_RE.match(name):
                try:
                    self._meta[name] = json.loads(meta.read_text())
                except (OSError, ValueError) as exc:
                    log.warning("station archive: %s unreadable, skipped: %s", meta, exc)
                    continue
                size = sum(p.stat().st_size for p in self._files(name) if p.exists())
                self._entries[name] = size
                self.bytes += size
        self._thread: threading.Thread | None = None

    def _files(self, name: str) -> list[Path]:
        return [self.dir / f"{name}{ext}" for ext in (".jpg", ".png", ".json")]

    def wants(self, ev: VerdictEvent) -> bool:
        """NG, or OK within ``borderline_margin`` of the threshold."""
        return ev.is_ng or ev.score >= (1.0 - self.cfg.borderline_margin) * ev.threshold

    # -- scoring thread ----------------------------------------------------------------------------------------------

    def offer(self, ev: VerdictEvent) -> bool:
        """Queue a frame for writing; ``False`` (counted in :attr:`dropped`) when the queue is full."""
        try:
            self._q.put_nowait(ev)
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("station archive: writer busy, %d frame(s) dropped so far", self.dropped)
            return False

    @property
    def depth(self) -> int:
        return self._q.qsize()

    # -- writer thread -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="station-archive", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ev = self._q.get()
            if ev is None:
                self._q.task_done()
                return
            try:
                self._write(ev)
            except Exception:
                self.failed += 1
                log.exception("station archive: cannot write camera %s seq %d", ev.camera, ev.seq)
            finally:
                self._q.task_done()

    def _write(self, ev: VerdictEvent) -> None:
        from runtime.overlay import encode_jpeg, overlay_heatmap
        from runtime.preprocess import to_uint8

        name = f"{int(ev.ts * 1000):013d}_{ev.camera}_{ev.seq}"
        jpg = encode_jpeg(overlay_heatmap(ev.image, ev.anomaly_map, ev.threshold), self.cfg.jpeg_quality)
        ok, png = cv2.imencode(".png", to_uint8(ev.image), [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast; lossless
        if not ok:
            raise ValueError(f"cannot PNG-encode a frame of shape {ev.image.shape}")
        meta = {"name": name, "camera": ev.camera, "seq": ev.seq, "frame_seq": ev.frame_seq, "ts": ev.ts,
                "frame_ts": ev.frame_ts, "score": ev.score, "threshold": ev.threshold,
                "verdict": "NG" if ev.is_ng else "OK", "model_id": ev.model_id, "trigger_id": ev.trigger_id,
                "review": None}  # fmt: skip
        atomic_write(self.dir / f"{name}.jpg", jpg)
        atomic_write(self.dir / f"{name}.png", png.tobytes())
        body = json.dumps(meta).encode()
        atomic_write(self.dir / f"{name}.json", body)  # last: a .json means the frame is complete
        with self._lock:
            self._entries[name] = len(jpg) + png.nbytes + len(body)
            self._meta[name] = meta
            self.bytes += self._entries[name]
            self.written += 1
            while self.bytes > self.max_bytes and len(self._entries) > 1:
                old, size = self._entries.popitem(last=False)
                self._meta.pop(old, None)
                for p in self._files(old):
                    p.unlink(missing_ok=True)
                self.bytes -= size
                self.deleted += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued frame is written (tests, shutdown); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._q.unfinished_tasks == 0

    def close(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=2)
        self._thread.join(timeout=5)
        self._thread = None

    # -- browse / review ---------------------------------------------------------------------------------------------

    def check_name(self, name: str) -> str:
        """``name`` if it is a stored archive entry, else :class:`ArchiveError` (no path is built from it)."""
        if not NAME_RE.match(name):
            raise ArchiveError(f"not an archive name: {name!r}")
        with self._lock:
            if name not in self._entries:
                raise ArchiveError(f"no archived frame {name!r}")
        return name

    def file(self, name: str, kind: str) -> Path:
        """Path of the ``jpg`` (overlay) or ``png`` (raw) file of a stored entry."""
        if kind not in KINDS:
            raise ArchiveError(f"unknown file kind {kind!r} (jpg, png)")
        return self.dir / f"{self.check_name(name)}{KINDS[kind]}"

    def meta(self, name: str) -> dict[str, Any]:
        """A copy of an entry's metadata."""
        self.check_name(name)
        with self._lock:
            m = self._meta.get(name)
        if m is None:
            raise ArchiveError(f"no archived frame {name!r}")
        return json.loads(json.dumps(m))  # a deep copy: callers may change it

    def entries(
        self,
        camera: str | None = None,
        verdict: str | None = None,
        review: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first, filtered by camera, verdict (``OK``/``NG``) and review (``none`` or a label)."""
        with self._lock:
            names = list(reversed(self._entries))
        out = []
        for name in names:
            if camera and not name.split("_", 1)[1].startswith(f"{camera}_"):
                continue
            try:
                m = self.meta(name)
            except ArchiveError:
                continue  # deleted meanwhile
            if verdict and m["verdict"] != verdict:
                continue
            label = (m.get("review") or {}).get("label")
            if review and (label or "none") != review:
                continue
            out.append(m)
            if len(out) >= limit:
                break
        return out

    def review(self, name: str, label: str, user: str) -> tuple[str | None, str]:
        """Mark an entry ``false_reject`` or ``confirmed_defect``; copy its raw frame where the label says.

        ``false_reject`` -> ``good_dir/<name>.png`` and ``labelled_dir/good/<name>.png``; ``confirmed_defect`` ->
        ``labelled_dir/defect/<name>.png``. A changed label removes the copy the old label made.

        Returns:
            ``(old label, new label)``.
        """
        if label not in LABELS:
            raise ArchiveError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        m = self.meta(name)
        old = (m.get("review") or {}).get("label")
        src = self.file(name, "png")
        for dst in self._targets(name, old):
            if old != label:
                dst.unlink(missing_ok=True)
        for dst in self._targets(name, label):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        m["review"] = {"label": label, "by": user, "ts": time.time()}
        atomic_write(self.dir / f"{name}.json", json.dumps(m).encode())
        with self._lock:
            if name in self._meta:
                self._meta[name] = m
        return old, label

    def _targets(self, name: str, label: str | None) -> list[Path]:
        out: list[Path] = []
        if label == "false_reject":
            if self.cfg.good_dir is not None:
                out.append(self.cfg.good_dir / f"{name}.png")
            if self.cfg.labelled_dir is not None:
                out.append(self.cfg.labelled_dir / "good" / f"{name}.png")
        elif label == "confirmed_defect" and self.cfg.labelled_dir is not None:
            out.append(self.cfg.labelled_dir / "defect" / f"{name}.png")
        return out

    def reviewed_scores(self) -> dict[str, list[float]]:
        """Scores of reviewed entries: ``{"good": [...], "defect": [...]}`` (for the threshold tool)."""
        good, defect = [], []
        for m in self.entries(limit=10**9):
            label = (m.get("review") or {}).get("label")
            if label == "false_reject":
                good.append(float(m["score"]))
            elif label == "confirmed_defect":
                defect.append(float(m["score"]))
        return {"good": good, "defect": defect}
