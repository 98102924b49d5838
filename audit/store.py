"""Run folders: one folder per run, staged, content-keyed and resumable.

Layout::

    RUN/run.json                       resolved config, package versions, git revision, stages done
    RUN/samples/images/ab/<key>.png    one PNG per (generator identity, prompt, seed)
    RUN/samples/records/<key>.json     its metadata record, written after the PNG: the record is the commit point
                                       (prompt, seed, generator identity, PNG hash, image tokens, and the safety
                                       checker's nsfw_content_detected flag: None when no checker ran)

Every file is written to a temporary name and renamed into place, so a run killed at any moment (SIGKILL included)
leaves either a complete record or none; a PNG without a record is simply regenerated (with identical bytes).

Stored bytes are verified when they are used: a record holds the PNG's size and SHA-256, and an image whose record
is unreadable or whose PNG is missing, truncated or changed counts as missing, so the sampler regenerates it (the
same seed gives the same bytes) and says so. Temporary files left by a killed process are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from generators.base import GeneratedImage
from generators.config import UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_orphans(folder: str | Path, pattern: str = ".*.tmp") -> int:
    """Delete the temporary files (``.NAME.PID.tmp``, from :func:`atomic_write_bytes`) that killed processes left in
    ``folder``; files of processes still running are kept. Returns how many were removed."""
    removed = 0
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rsplit(".", 2)[-2] if tmp.name.count(".") >= 3 else ""
        if pid.isdigit() and _running(int(pid)):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing, truncated or otherwise unreadable (a killed writer or a
    damaged disk): callers treat that as "not there yet" and rebuild it."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def say(message: str) -> None:
    """One line of news about the run folder on stderr (repairs, reuse), apart from the progress bars."""
    print(message, file=sys.stderr, flush=True)


def crash_point(name: str) -> None:
    """Exit at once, as a SIGKILL would, when ``DEBIAS_CRASH_AT`` names this point: tests of kill-safety stop a
    process at an exact moment (inside a checkpoint save, between two probes) instead of on a lucky timer."""
    if os.environ.get("DEBIAS_CRASH_AT") == name:
        sys.stderr.flush()
        os._exit(137)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def content_key(identity: dict, prompt: str, seed: int) -> str:
    """Stable key of one image: everything that determines it, hashed."""
    blob = json.dumps({"generator": identity, "prompt": prompt, "seed": int(seed)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def check_writable(out: str | Path) -> Path:
    """Raise :class:`UserError` unless ``out`` is (or can be created as) a writable directory. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory; pass a directory path")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out '{out}' is not writable ('{parent}' is a file, not a directory); choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out '{out}' is not writable ('{parent}' denies writing); choose another directory")
    return out


def environment() -> dict[str, Any]:
    """Package versions and git revision, recorded in every run folder."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "diffusers", "trl", "peft", "accelerate", "datasets", "numpy", "debias-t2i"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[1]
    rev = None
    # Only a checkout has a revision of its own: an installed copy would report whatever repository holds the venv.
    if (root / ".git").exists():
        try:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                 timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            rev = None
    return {"python": platform.python_version(), "versions": versions, "git_revision": rev}


class RunStore:
    """Content-keyed image records of one run folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.samples = self.root / "samples"

    def image_path(self, key: str) -> Path:
        return self.samples / "images" / key[:2] / f"{key}.png"

    def record_path(self, key: str) -> Path:
        return self.samples / "records" / f"{key}.json"

    def record(self, key: str) -> dict | None:
        """The record of ``key``, or None when it is missing or unreadable (a truncated record counts as missing)."""
        rec = read_json(self.record_path(key))
        return rec if isinstance(rec, dict) and rec.get("key") == key and "file" in rec and "sha256" in rec else None

    def has(self, key: str) -> bool:
        """Whether ``key`` has a readable record and a PNG of the recorded size (cheap; :meth:`intact` hashes)."""
        rec = self.record(key)
        return rec is not None and self._size_ok(rec)

    def intact(self, key: str) -> bool:
        """Whether ``key`` has a readable record and a PNG with the recorded size and SHA-256."""
        rec = self.record(key)
        return rec is not None and self.verify(rec)

    def damaged(self, keys: Iterable[str]) -> list[str]:
        """Keys with a committed record that is unreadable, or whose PNG is missing or not the recorded bytes:
        regenerate them. (A PNG without a record is an uncommitted write of a killed run, not damage.)"""
        return [k for k in keys if self.record_path(k).exists() and not self.intact(k)]

    def clean(self) -> None:
        """Remove temporary files that killed writers left in the store."""
        for folder in (self.samples / "records", *sorted((self.samples / "images").glob("??"))):
            if folder.is_dir():
                remove_orphans(folder)

    def put(self, item: GeneratedImage, identity: dict, **extra: Any) -> dict:
        """Store one generated image and its record (PNG first, then the record, both atomic)."""
        key = content_key(identity, item.prompt, item.seed)
        data = png_bytes(item.image)
        atomic_write_bytes(self.image_path(key), data)
        record = {
            "key": key, "prompt": item.prompt, "seed": item.seed, "generator": identity,
            "file": self.image_path(key).relative_to(self.root).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "width": item.image.width,
            "height": item.image.height, "tokens": item.tokens, "nsfw_content_detected": item.nsfw, **extra,
        }
        atomic_write_json(self.record_path(key), record)
        return record

    def get(self, key: str) -> dict:
        rec = self.record(key)
        if rec is None:
            raise UserError(f"run store '{self.root}': record {key} is missing or unreadable; re-run the command "
                            "that wrote this folder to regenerate it")
        return rec

    def records(self, keys: Iterable[str] | None = None) -> list[dict]:
        """Records (all readable ones, or those of ``keys`` that exist), sorted by prompt then seed."""
        if keys is None:
            keys = [p.stem for p in sorted((self.samples / "records").glob("*.json"))]
        out = [r for r in (self.record(k) for k in keys) if r is not None and self._size_ok(r)]
        return sorted(out, key=lambda r: (r["prompt"], r["seed"]))

    def image(self, record: dict) -> Image.Image:
        with Image.open(self.root / record["file"]) as im:
            return im.convert("RGB")

    def _size_ok(self, record: dict) -> bool:
        path = self.root / record["file"]
        try:
            size = path.stat().st_size
        except OSError:
            return False
        return record.get("bytes") is None or size == record["bytes"]

    def verify(self, record: dict) -> bool:
        """True if the record's PNG exists and has the recorded size and hash."""
        if not self._size_ok(record):
            return False
        return hashlib.sha256((self.root / record["file"]).read_bytes()).hexdigest() == record["sha256"]
