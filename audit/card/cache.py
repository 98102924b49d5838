"""Where finished cards are kept: in memory for the process, and as JSON files keyed by the card's inputs.

Sweeps, demos and component swaps audit many runs with one classifier in one process, so a card is measured once
and then copied; on disk it lives in the run folder (``RUN/stages/card-<key>.json``) and in ``card.cache_dir``
when set (shared across runs).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from audit.store import atomic_write_json

_MEMO: dict[str, dict] = {}
_MEMO_SIZE = 16


def card_key(inputs: Any) -> str:
    """The cache key of a card: a short hash of everything that decides its numbers."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path | None) -> str | None:
    """A short hash of a calibration record (a file, or a folder holding ``calibration.json``); None without one."""
    if not path:
        return None
    p = Path(path)
    p = p / "calibration.json" if p.is_dir() else p
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def cache_paths(key: str, run_dir: str | Path | None, cache_dir: str | None) -> list[Path]:
    """The files a card with ``key`` is kept in: the run folder's stage file, then ``cache_dir``'s."""
    paths = []
    if run_dir is not None:
        paths.append(Path(run_dir) / "stages" / f"card-{key}.json")
    if cache_dir:
        paths.append(Path(cache_dir) / f"card-{key}.json")
    return paths


def cached_card(key: str, paths: list[Path]) -> dict | None:
    """The card with ``key`` from memory (copied into any of ``paths`` that lack it) or the first of ``paths``.

    Returns:
        The card, or None when it was never measured.
    """
    if key in _MEMO:
        card = copy.deepcopy(_MEMO[key])
        for path in paths:
            if not path.is_file():
                atomic_write_json(path, card)
        return card
    for path in paths:
        if path.is_file():
            try:
                card = json.loads(path.read_text())
                if card.get("key") == key:
                    _remember(key, card)
                    return card
            except (OSError, ValueError):
                pass  # a corrupt cache entry is recomputed, never trusted
    return None


def store_card(key: str, card: dict, paths: list[Path]) -> None:
    """Keep a freshly measured card in every one of ``paths`` and in memory."""
    for path in paths:
        atomic_write_json(path, card)
    _remember(key, card)


def _remember(key: str, card: dict) -> None:
    _MEMO[key] = copy.deepcopy(card)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
