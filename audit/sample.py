"""Sampling into a run folder: the first stage of every audit, and what synth and the card sample with.

Batches never mix prompts and follow :func:`seed_blocks`, so an image is computed in the same batch composition
whatever the number of processes, the resume point or the seeds added later: its bytes do not change. For a
generator whose kernels round differently for other batch shapes (half precision, diffusion pipelines: anything
without ``batch_invariant = True``), a block that is only partly requested is still computed whole, so a seed never
shares a batch with fewer neighbours in one run than in another.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from audit.store import (
    RunStore, atomic_write_bytes, atomic_write_json, check_writable, content_key, environment, read_json, say,
)
from generators.backends import load_generator
from generators.base import Generator
from generators.config import UserError, to_dict


def distributed_state():
    """``(process_index, num_processes, is_main, barrier)``; uses accelerate only under a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state.is_main_process, state.wait_for_everyone
    return 0, 1, True, lambda: None


def run_settings(generator: Generator | None, counts: dict[str, int], seeds: Sequence[int],
                 source: str | None = None, plan: dict | None = None, classifier=None,
                 detector=None) -> dict[str, Any]:
    """The resolved settings of a run, recorded once in ``run.json`` and copied into ``metrics.json``.

    Args:
        generator: The loaded generator (its identity holds the sampling settings with every default applied), or
            None for images made elsewhere.
        counts: Prompt -> images used: requested (fixed count), where the image plan stopped (adaptive), or found
            (imported), in prompt order.
        seeds: The seeds of the run.
        source: For imported images, the folder they came from.
        plan: The adaptive image plan as run (its fields, ``looks`` and the calibrated ``share_alpha``), or None.
        classifier: The audit's classifier (:class:`audit.classify.ClipClassifier`), if it has one yet.
        detector: The audit's face detector (:func:`audit.faces.load_detector`), if it has one yet.

    Returns:
        ``generator`` (identity), ``sampling`` (resolved backend settings), ``guidance_scale``, ``n_prompts``,
        ``images_per_prompt`` (the common count, or None when prompts differ: see ``images_by_prompt``),
        ``images_by_prompt``, ``images_plan`` (None for a fixed count), ``seeds``, and ``models``: per model used
        (``generator``, ``adapter``, ``classifier``, ``face_detector``) the resolved revision (hub snapshot commit,
        or content hash of a local folder or in-process weights), dtype, device and variant
        (:func:`generators.base.model_provenance`).
    """
    from generators.base import directory_hash

    if generator is not None:
        identity, models = generator.identity(), generator.provenance()
    else:
        identity = {"backend": "external", "source": source}
        models = {"generator": {"model": "external images", "source": "local", "requested_revision": None,
                                "revision": directory_hash(source) if source else None, "dtype": None,
                                "device": None, "variant": None}}
    if classifier is not None:
        models["classifier"] = classifier.provenance()
    if detector is not None:
        models["face_detector"] = detector.provenance()
    sampling = identity.get("settings") or {}
    per_prompt = set(counts.values())
    return {
        "generator": identity, "sampling": sampling, "guidance_scale": sampling.get("guidance_scale"),
        "n_prompts": len(counts), "images_per_prompt": per_prompt.pop() if len(per_prompt) == 1 else None,
        "images_by_prompt": dict(counts), "images_plan": plan, "seeds": sorted({int(s) for s in seeds}),
        "models": models,
    }


def write_run_metadata(out: Path, config: Any, command: str, stage: str, extra: dict | None = None,
                       settings: dict | None = None) -> None:
    """Record the config, the resolved run ``settings``, versions and git revision; keeps earlier stages.

    An unreadable ``run.json`` (truncated by a crash) is rebuilt: it only describes the run, the results live beside it.
    """
    meta_path = out / "run.json"
    meta = read_json(meta_path) if meta_path.is_file() else {"stages": {}}
    if not isinstance(meta, dict) or not isinstance(meta.get("stages"), dict):
        say(f"{meta_path} was unreadable (truncated or edited); rewriting it (earlier stages' entries are lost)")
        meta = {"stages": {}}
    meta.update({"config": to_dict(config), "environment": environment()})
    if settings is not None:
        meta["settings"] = settings
    meta["stages"][stage] = {"command": command, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    atomic_write_json(meta_path, meta)
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def run_sample(config, out: str | Path, progress: bool = True, generator=None) -> tuple[RunStore, list[str]]:
    """Stage 1 of every audit: sample ``config.images_per_prompt`` images per prompt into ``out``.

    Validates the config (:meth:`audit.config.AuditConfig.check`) and the output directory and loads the model
    before creating anything, so bad input leaves nothing behind. Re-running skips existing images; more seeds
    sample only the new ones; stored images that fail verification are regenerated.

    Args:
        config: An :class:`audit.config.AuditConfig` (or a config extending it).
        out: The run folder.
        progress: Show a progress bar.
        generator: An already loaded generator of ``config.generator``.

    Returns:
        ``(store, keys)`` with the keys of all requested images, in prompt-major, seed-minor order. The resolved
        run settings (:func:`run_settings`) are recorded in ``run.json``.
    """
    out = check_writable(out)
    if config.plan is not None:
        raise UserError("images_per_prompt: an adaptive plan decides when to stop from the classified images; run "
                        "`debias audit` (it samples and classifies), or give a fixed count here")
    prompts = config.check(generator=generator is None)
    generator = generator or load_generator(config.generator)
    rank, world, is_main, barrier = distributed_state()
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out)
    keys = sample_to_store(generator, prompts, config.seeds, store, progress=progress and is_main,
                           process_index=rank, num_processes=world)
    barrier()
    if is_main:
        write_run_metadata(out, config, " ".join(sys.argv), "sample", {"images": len(keys)},
                           settings=run_settings(generator, {p: len(config.seeds) for p in prompts}, config.seeds))
    return store, keys


def seed_blocks(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group seeds by ``seed // batch_size``: a seed always shares its batch with the same seeds, so resumed,
    extended and sharded runs compute every image in the same batch composition (byte-identical images)."""
    blocks: dict[int, list[int]] = {}
    for s in seeds:
        blocks.setdefault(int(s) // batch_size, []).append(int(s))
    return [sorted(b) for _, b in sorted(blocks.items())]


def sample_to_store(
    generator, prompts: Sequence[str], seeds: Sequence[int], store: RunStore, progress: bool = True,
    process_index: int = 0, num_processes: int = 1,
) -> list[str]:
    """Generate every missing ``(prompt, seed)`` image into ``store``; returns the keys of ALL requested images.

    Prompts are sharded over processes (prompt i goes to process ``i % num_processes``); batches never mix prompts
    and follow :func:`seed_blocks`, so the images do not depend on how many processes ran or when a run resumed.
    Unless the generator is ``batch_invariant``, every batch is a whole block (``batch_size`` consecutive seeds from
    a multiple of it): only the requested images are stored, the rest is the price of images that do not change
    when the run is extended later. A stored image whose record is unreadable or whose PNG does not match its
    recorded size and hash is regenerated (one line on stderr says how many).
    """
    from tqdm.auto import tqdm

    identity = generator.identity()
    keys = [content_key(identity, p, s) for p in prompts for s in seeds]
    size = generator.config.batch_size
    whole = not generator.batch_invariant
    store.clean()
    todo, damaged = [], []
    for i, prompt in enumerate(prompts):
        if i % num_processes != process_index:
            continue
        for block in seed_blocks(seeds, size):
            block_keys = [content_key(identity, prompt, s) for s in block]
            bad = store.damaged(block_keys)
            damaged += bad
            if bad or not all(store.has(k) for k in block_keys):
                todo.append((prompt, block))
    if damaged:
        say(f"run store '{store.root}': {len(damaged)} stored image(s) failed verification (unreadable record, or "
            f"PNG missing, truncated or changed), e.g. {store.image_path(damaged[0]).relative_to(store.root)}; "
            "regenerating them (same seeds, same bytes)")
    recorded = {k: (store.record(k) or {}).get("sha256") for k in damaged}
    changed = 0
    bar = tqdm(total=sum(len(b) for _, b in todo), desc="sampling", unit="img", disable=not progress,
               dynamic_ncols=True)
    for prompt, block in todo:
        start = block[0] // size * size
        batch = list(range(start, start + size)) if whole else block
        t0 = time.perf_counter()
        items = generator.generate([prompt] * len(batch), batch)
        per_image = (time.perf_counter() - t0) / len(batch)
        wanted = set(block)
        for item in items:
            key = content_key(identity, item.prompt, item.seed)
            if item.seed in wanted and (key in recorded or not store.has(key)):
                rec = store.put(item, identity, seconds=round(per_image, 4))
                changed += recorded.get(key) not in (None, rec["sha256"])
        bar.update(len(block))
    bar.close()
    if changed:
        say(f"run store '{store.root}': {changed} regenerated image(s) differ from their recorded hash (the backend "
            "is not deterministic here); results cached for them describe the earlier bytes")
    return keys
