"""Run folders: one folder per run, staged, content-keyed and resumable.

Layout::

    RUN/run.json                       resolved config, package versions, git revision, stages done
    RUN/samples/images/ab/<key>.png    one PNG per (generator identity, prompt, seed)
    RUN/samples/records/<key>.json     its metadata record, written after the PNG: the record is the commit point
                                       (prompt, seed, generator identity, PNG hash, image tokens, and the safety
                                       checker's nsfw_content_detected flag: None when no checker ran)

Every file is written to a temporary name and renamed into place, so a run killed at any moment (SIGKILL included)
leaves either a complete record or none; a PNG without a record is simply regenerated (with identical bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
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

    def has(self, key: str) -> bool:
        return self.record_path(key).is_file() and self.image_path(key).is_file()

    def put(self, item: GeneratedImage, identity: dict, **extra: Any) -> dict:
        """Store one generated image and its record (PNG first, then the record, both atomic)."""
        key = content_key(identity, item.prompt, item.seed)
        data = png_bytes(item.image)
        atomic_write_bytes(self.image_path(key), data)
        record = {
            "key": key, "prompt": item.prompt, "seed": item.seed, "generator": identity,
            "file": self.image_path(key).relative_to(self.root).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(), "width": item.image.width, "height": item.image.height,
            "tokens": item.tokens, "nsfw_content_detected": item.nsfw, **extra,
        }
        atomic_write_json(self.record_path(key), record)
        return record

    def get(self, key: str) -> dict:
        return json.loads(self.record_path(key).read_text())

    def records(self, keys: Iterable[str] | None = None) -> list[dict]:
        """Records (all, or those of ``keys`` that exist), sorted by prompt then seed."""
        if keys is None:
            paths = sorted((self.samples / "records").glob("*.json"))
        else:
            paths = [self.record_path(k) for k in keys if self.has(k)]
        out = [json.loads(p.read_text()) for p in paths]
        return sorted(out, key=lambda r: (r["prompt"], r["seed"]))

    def image(self, record: dict) -> Image.Image:
        with Image.open(self.root / record["file"]) as im:
            return im.convert("RGB")

    def verify(self, record: dict) -> bool:
        """True if the record's PNG exists and has the recorded hash."""
        path = self.root / record["file"]
        return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
