"""The audit: sample (or import) -> detect faces -> classify -> score quality -> metrics -> report.

Every stage caches its per-image results in the run folder keyed by the image key and the stage's own identity
(detector settings, classifier model and prompts), saved atomically after each batch: an interrupted audit resumes
where it stopped, and re-auditing with another classifier reuses the images and the face boxes.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from audit.config import AuditConfig, MetricsConfig
from audit.store import RunStore, atomic_write_json, check_writable, content_key, read_json, remove_orphans, say
from generators.base import GeneratedImage
from generators.config import ConfigError, UserError, to_dict

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class StageCache:
    """Per-image results of one stage in one JSON file, rewritten atomically after each batch.

    A cache file that cannot be read (truncated by a crash, edited by hand) is recomputed, never trusted, and
    temporary files of killed writers are removed when a cache opens.
    """

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, stage: str, identity: Any) -> "StageCache":
        path = root / "stages" / f"{stage}-{_hash(identity)}.json"
        if path.parent.is_dir():
            remove_orphans(path.parent)
        data = {}
        if path.is_file():
            saved = read_json(path)
            if isinstance(saved, dict) and isinstance(saved.get("results"), dict):
                data = saved["results"]
            else:
                say(f"stage cache '{path}' is unreadable (truncated or edited); recomputing the {stage} stage")
        cache = cls(path, data)
        cache.identity = identity
        return cache

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in keys if k not in self.data]

    def save(self) -> None:
        atomic_write_json(self.path, {"identity": self.identity, "results": self.data})


@dataclass
class ImportRow:
    """One image of an ``--images`` folder, checked: its file inside the folder, its prompt and seed."""

    file: str  # as listed, relative to the folder
    path: Path  # resolved
    prompt: str
    seed: int


def _manifest_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` per line of ``manifest.jsonl`` / row of ``manifest.csv``; raises naming the line."""
    import csv
    import io

    name = f"--images manifest '{path}'"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{name} is not UTF-8 text (byte at offset {err.start}); save it as UTF-8") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"file", "prompt"} <= set(reader.fieldnames):
            raise UserError(f"{name}: the header must name 'file' and 'prompt' columns (and optionally 'seed'), got "
                            f"{reader.fieldnames}")
        return [(f"{name} row {i}", {k: v for k, v in row.items() if not (k == "seed" and v in ("", None))})
                for i, row in enumerate(reader, start=2)]
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{name} line {i} is not JSON ({str(err).split(':')[0]}): {line.strip()[:60]!r}; write "
                            'one JSON object per line (JSON Lines), e.g. {"file": "a.png", "prompt": "..."}') from None
        rows.append((f"{name} line {i}", row))
    return rows


def _check_image(path: Path, where: str) -> None:
    """Decode ``path`` once, so a truncated or fake image or a decompression bomb stops the import before any
    output is written."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"{where}: '{path}' has more than {Image.MAX_IMAGE_PIXELS} pixels (the decompression-bomb "
                        "limit); resize it") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{where}: '{path}' is not a readable image ({str(err).strip() or type(err).__name__}); "
                        "replace or remove it") from None


def read_images_dir(images_dir: str | Path) -> list[ImportRow]:
    """Read and check a folder of pre-generated images (closed models) without writing anything.

    Layouts:
        ``DIR/manifest.jsonl`` (or ``.csv``) with ``file``, ``prompt`` and optional ``seed`` per image, paths
        relative to DIR; otherwise ``DIR/<prompt>/*.png``, the folder name being the prompt text. A row without a
        seed takes the next seed of its prompt (0, 1, ...).

    Raises:
        UserError: naming the folder, the line or file and the fix: a malformed manifest line, a missing column, a
            prompt that is not text, a seed that is not an integer in [0, 2^63), a file that does not exist or lies
            outside the folder, a (prompt, seed) or a file listed twice, and an image that does not decode (truncated,
            not an image, above PIL's decompression-bomb limit).
    """
    from generators.base import MAX_SEED

    root = Path(images_dir)
    if not root.is_dir():
        raise UserError(f"--images '{root}' is not a directory; pass a folder with one sub-folder per prompt "
                        "or a manifest.jsonl")
    base = root.resolve()
    listed: list[tuple[str, Any]] = []
    manifest = next((root / m for m in ("manifest.jsonl", "manifest.csv") if (root / m).is_file()), None)
    if manifest is not None:
        listed = _manifest_rows(manifest)
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            listed += [(f"--images '{root}'", {"file": str(p.relative_to(root)), "prompt": sub.name, "seed": i})
                       for i, p in enumerate(files)]
    if not listed:
        raise UserError(f"--images '{root}': found no images; put them in one sub-folder per prompt "
                        "(the folder name is the prompt) or list them in manifest.jsonl")
    rows: list[ImportRow] = []
    next_seed: dict[str, int] = {}
    seen_keys: dict[tuple[str, int], str] = {}
    seen_files: dict[Path, str] = {}
    for where, row in listed:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with 'file' and 'prompt', got a "
                            f"{type(row).__name__}; write one object per line (JSON Lines), not a JSON array")
        if "file" not in row or "prompt" not in row:
            raise UserError(f"{where}: needs 'file' and 'prompt', got {sorted(row)}")
        file, prompt = row["file"], row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be non-empty text, got {prompt!r}")
        if not isinstance(file, str) or not file.strip():
            raise UserError(f"{where}: 'file' must be a path relative to '{root}', got {file!r}")
        seed = row.get("seed", next_seed.get(prompt, 0))
        if isinstance(seed, str) and seed.strip().isdigit():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"{where}: 'seed' must be an integer in [0, {MAX_SEED}], got {seed!r}")
        next_seed[prompt] = seed + 1
        path = (root / file).resolve()
        if not path.is_relative_to(base):
            raise UserError(f"{where}: file '{file}' lies outside the images folder '{root}'; copy it into the "
                            "folder and list it relative to it")
        if not path.is_file():
            raise UserError(f"{where}: file '{file}' does not exist under '{root}'")
        if (prompt, seed) in seen_keys:
            raise UserError(f"{where}: prompt {prompt!r} with seed {seed} is listed twice (also {seen_keys[prompt, seed]}"
                            "); give each image its own seed, or drop the seed column to number them in order")
        if path in seen_files:
            raise UserError(f"{where}: file '{file}' is listed twice (also {seen_files[path]}); list each image once")
        seen_keys[prompt, seed] = seen_files[path] = where
        _check_image(path, where)
        rows.append(ImportRow(file=file, path=path, prompt=prompt, seed=seed))
    return rows


def import_images(images_dir: str | Path, store: RunStore,
                  rows: Sequence[ImportRow] | None = None) -> tuple[list[str], list[str]]:
    """Copy pre-generated images into the run store (closed models); see :func:`read_images_dir` for the layouts.

    Args:
        images_dir: The folder.
        store: The run store.
        rows: The folder's rows, when :func:`read_images_dir` already read them.

    Returns:
        ``(prompts, keys)`` in prompt order. An image already imported is copied again only when its stored copy
        fails verification (say so on stderr).
    """
    from PIL import Image

    rows = read_images_dir(images_dir) if rows is None else rows
    identity = {"backend": "external", "source": str(Path(images_dir).resolve())}
    keys = [content_key(identity, r.prompt, r.seed) for r in rows]
    damaged = store.damaged(keys)
    if damaged:
        say(f"run store '{store.root}': {len(damaged)} imported image(s) failed verification; copying them again")
    store.clean()
    for row, key in zip(rows, keys):
        if key in damaged or not store.has(key):
            with Image.open(row.path) as im:
                store.put(GeneratedImage(prompt=row.prompt, seed=row.seed, image=im.convert("RGB")), identity,
                          source=row.file)
    return list(dict.fromkeys(r.prompt for r in rows)), keys


def classify_store(store: RunStore, records: list[dict], faces_config, classifier, batch_size: int = 64,
                   clip_score: bool = True, progress: bool = True, detector=None) -> dict[str, dict]:
    """Face detection, classification and CLIP score of every record, cached per stage. Returns key -> row.

    ``detector`` is a loaded :func:`audit.faces.load_detector` of ``faces_config`` to reuse."""
    from tqdm.auto import tqdm

    from audit.faces import detect_and_crop, load_detector

    faces = StageCache.open(store.root, "faces", to_dict(faces_config))
    cls_cache = StageCache.open(store.root, "classify", {"faces": to_dict(faces_config), **classifier.identity()})
    quality = StageCache.open(store.root, "clipscore", classifier.identity()) if clip_score else None
    keys = [r["key"] for r in records]
    todo = sorted(set(cls_cache.missing(keys)) | set(quality.missing(keys) if quality else []))
    by_key = {r["key"]: r for r in records}
    if todo and detector is None:
        detector = load_detector(faces_config)
    bar = tqdm(total=len(todo), desc="classifying", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = [store.image(by_key[k]) for k in chunk]
        results = detect_and_crop(images, faces_config, detector=detector)
        for k, res in zip(chunk, results):
            faces.data[k] = {"face": res.face_found, "box": list(res.box) if res.box else None,
                             "num_faces": res.num_faces}
        found = [i for i, res in enumerate(results) if res.face_found]
        probs = classifier.classify([results[i].crop for i in found]) if found else {}
        for k in chunk:
            cls_cache.data[k] = None
        for j, i in enumerate(found):
            cls_cache.data[chunk[i]] = {a: p[j].round(6).tolist() for a, p in probs.items()}
        if quality is not None:
            scores = classifier.clip_score(images, [by_key[k]["prompt"] for k in chunk])
            quality.data.update({k: round(float(s), 4) for k, s in zip(chunk, scores)})
        for cache in (faces, cls_cache, quality):
            if cache is not None:
                cache.save()
        bar.update(len(chunk))
    bar.close()
    # A face was found exactly when the image was classified (classification runs on face crops only).
    return {k: {"face": cls_cache.data[k] is not None, "probs": cls_cache.data[k],
                "clip_score": quality.data.get(k) if quality else None} for k in keys}


def hard_labels(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Argmax classes of the faces the classifier labels (highest probability ``>= threshold``; all when 0), their
    renormalised probabilities, and the number of faces abstained on."""
    keep = probs.max(axis=1) >= threshold if threshold > 0 else np.ones(len(probs), dtype=bool)
    kept = probs[keep]
    return kept.argmax(axis=1), kept / kept.sum(axis=1, keepdims=True) if keep.any() else kept, int((~keep).sum())


def compute_metrics(prompts: list[str], records: list[dict], rows: dict[str, dict], classifier, metrics_config:
                    MetricsConfig, plan=None, share_alpha: float | None = None) -> dict[str, Any]:
    """Bias metrics per attribute (and joint attributes) from the per-image rows.

    Under an image ``plan`` (:class:`audit.config.ImagesPlan`) the per-prompt intervals are at the plan's
    calibrated level ``share_alpha`` (:func:`audit.sequential.calibrated_alpha`), and the debiased RD of each
    two-class attribute that decided the stopping is corrected for the stopping rule's bias
    (:func:`audit.sequential.stopping_bias`)."""
    from audit.sequential import stopping_bias

    from audit.calibrate import load_calibration
    from audit.metrics import joint_classes, joint_probs, summarize_attribute

    threshold = classifier.config.abstain_threshold
    specs = {name: list(spec.classes) for name, spec in classifier.attributes.items()}
    confusion = load_calibration(metrics_config.calibration) if metrics_config.calibration else {}
    by_prompt: dict[str, list[dict]] = {p: [] for p in prompts}
    for r in records:
        by_prompt[r["prompt"]].append(rows[r["key"]])
    attr_probs: dict[str, list[np.ndarray]] = {}
    for name, classes in specs.items():
        attr_probs[name] = [np.array([row["probs"][name] for row in by_prompt[p] if row["probs"]],
                                     dtype=np.float64).reshape(-1, len(classes)) for p in prompts]
    for a, b in metrics_config.joint_pairs(list(specs)):
        specs[f"{a}_{b}"] = joint_classes(specs[a], specs[b])
        attr_probs[f"{a}_{b}"] = [joint_probs(pa, pb) for pa, pb in zip(attr_probs[a], attr_probs[b])]
    out: dict[str, Any] = {}
    for name, classes in specs.items():
        target = metrics_config.target.get(name)
        if target is not None and len(target) != len(classes):
            raise ConfigError(f"config key 'metrics.target.{name}': has {len(target)} shares but the classifier "
                              f"has {len(classes)} classes {classes}")
        labels, probs, n_abstain = [], [], []
        for p in attr_probs[name]:
            lab, prob, abstained = hard_labels(p, threshold)
            labels.append(lab)
            probs.append(prob)
            n_abstain.append(abstained)
        decided = plan is not None and name in (plan.attributes or classifier.attributes)
        shift = stopping_bias(plan.looks(), plan.target_halfwidth, share_alpha, metrics_config.interval) \
            if decided and len(classes) == 2 else None
        out[name] = summarize_attribute(
            prompts, labels, probs, classes, [len(by_prompt[p]) for p in prompts], n_abstain, target=target,
            confusion=confusion.get(name), alpha=metrics_config.alpha, n_boot=metrics_config.n_boot,
            seed=metrics_config.seed, interval=metrics_config.interval, share_alpha=share_alpha,
            debiased_shift=shift,
        )
    return out


def nsfw_summary(prompts: list[str], records: list[dict]) -> dict[str, Any]:
    """The safety checker's flags: whether one ran, how many images it flagged, the rate per prompt and overall.

    A record's ``nsfw_content_detected`` is None when no checker ran (no pipeline checker, switched off, imported
    images); the rates are then None too. Like the no-face rate, the flagged rate can differ by prompt and group.
    """
    checked = [r for r in records if r.get("nsfw_content_detected") is not None]
    flagged = [r for r in checked if r["nsfw_content_detected"]]
    per_prompt: dict[str, float | None] = {}
    for p in prompts:
        mine = [r for r in checked if r["prompt"] == p]
        per_prompt[p] = sum(bool(r["nsfw_content_detected"]) for r in mine) / len(mine) if mine else None
    return {"checker": bool(checked), "n_images": len(records), "n_checked": len(checked),
            "n_flagged": len(flagged), "nsfw_rate": len(flagged) / len(checked) if checked else None,
            "per_prompt": per_prompt, "lower_is_better": True}


def quality_summary(prompts: list[str], records: list[dict], rows: dict[str, dict],
                    metrics: MetricsConfig) -> dict | None:
    """CLIP score (higher is better) per prompt and overall, with a percentile bootstrap interval over prompts
    (``metrics.alpha``, ``metrics.n_boot``, ``metrics.seed``)."""
    from audit.metrics import bootstrap_mean

    scores = {p: [rows[r["key"]]["clip_score"] for r in records if r["prompt"] == p
                  and rows[r["key"]]["clip_score"] is not None] for p in prompts}
    per_prompt = {p: float(np.mean(s)) for p, s in scores.items() if s}
    if not per_prompt:
        return None
    mean, ci, _ = bootstrap_mean(list(per_prompt.values()), metrics.alpha, metrics.n_boot, metrics.seed)
    return {"clip_score": mean, "clip_score_ci": list(ci), "lower_is_better": False, "per_prompt": per_prompt}


def sample_adaptive(config: AuditConfig, out: Path, generator, classifier, progress: bool = True,
                    process_index: int | None = None, num_processes: int | None = None, detector=None
                    ) -> tuple[RunStore, list[str], dict[str, int], float]:
    """Sample with the image plan of ``config``: each prompt in blocks of seeds until its share intervals are narrow.

    At every look of the plan (:meth:`audit.config.ImagesPlan.looks`) the prompt's images so far are sampled
    (:func:`audit.sample.sample_to_store`, seeds ``seed_offset .. seed_offset + n - 1``) and classified
    (:func:`classify_store`, cached as in a fixed audit), and the prompt stops once every share interval of the
    plan's attributes, at the calibrated level (:func:`audit.sequential.calibrated_alpha`), has a half-width of at
    most ``target_halfwidth``, or at ``max``.

    Each decision is written (atomically) to ``stages/plan-<hash>/<prompt hash>.json`` before the next look, with
    the counts it was taken on: a resumed run replays the recorded looks instead of re-deciding them, so the same
    plan, seeds, generator and classifier stop every prompt at the same count after an interruption (SIGKILL
    included) and on any number of processes (prompts are sharded as in :func:`audit.sample.sample_to_store`).

    Args:
        config: The audit config; ``config.images_per_prompt`` is an :class:`audit.config.ImagesPlan`.
        out: The run folder.
        generator, classifier: Loaded generator and classifier.
        progress: Progress bar.
        process_index, num_processes: This process's shard; from the launcher (:func:`audit.sample.distributed_state`)
            when None.
        detector: A loaded face detector of ``config.faces`` to reuse.

    Returns:
        ``(store, keys, counts, share_alpha)``: keys of every image used (prompt-major, seed-minor), prompt ->
        images used, and the level of the plan's share intervals.

    Raises:
        UserError: The plan names an attribute the classifier does not have.
    """
    from tqdm.auto import tqdm

    from audit.sample import distributed_state, sample_to_store
    from audit.sequential import calibrated_alpha, halfwidth

    plan, m = config.plan, config.metrics
    attrs = list(plan.attributes) or list(classifier.attributes)
    unknown = [a for a in attrs if a not in classifier.attributes]
    if unknown:
        raise UserError(f"images_per_prompt.attributes: {unknown} are not attributes of the classifier "
                        f"{sorted(classifier.attributes)}; name some of those, or leave the list empty for all")
    prompts = config.prompts.neutral_prompts()
    plan_looks = tuple(plan.looks())
    share_alpha = calibrated_alpha(plan_looks, plan.target_halfwidth, m.alpha, m.interval)
    rank, world, _, barrier = distributed_state()
    if process_index is not None:
        rank, world, barrier = process_index, num_processes or 1, (lambda: None)
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out)
    identity = generator.identity()
    folder = out / "stages" / "plan-{}".format(_hash({
        "plan": to_dict(plan), "alpha": m.alpha, "interval": m.interval, "share_alpha": share_alpha,
        "seed_offset": config.seed_offset, "generator": identity, "classifier": classifier.identity(),
        "faces": to_dict(config.faces)}))
    threshold = classifier.config.abstain_threshold
    sizes = {a: len(classifier.attributes[a].classes) for a in attrs}
    mine = [p for i, p in enumerate(prompts) if i % world == rank]
    bar = tqdm(total=len(mine), desc="adaptive sampling", unit="prompt", disable=not progress, dynamic_ncols=True)
    for prompt in mine:
        path = folder / f"{_hash(prompt)}.json"
        record = json.loads(path.read_text()) if path.is_file() else {"prompt": prompt, "looks": []}
        while not record["looks"] or not record["looks"][-1]["stop"]:
            done = record["looks"][-1]["n"] if record["looks"] else 0
            counts = dict(record["looks"][-1]["counts"]) if record["looks"] else {a: [0] * k for a, k in sizes.items()}
            n = plan_looks[len(record["looks"])]
            keys = sample_to_store(generator, [prompt], list(range(config.seed_offset, config.seed_offset + n)),
                                   store, progress=False)
            # Images the safety checker flagged are left out of the shares, as in a fixed audit.
            new = [r for r in store.records(keys[done:]) if not r.get("nsfw_content_detected")]
            rows = classify_store(store, new, config.faces, classifier, clip_score=m.clip_score, progress=False,
                                  detector=detector)
            for a, k in sizes.items():
                probs = np.array([rows[r["key"]]["probs"][a] for r in new if rows[r["key"]]["probs"]],
                                 dtype=np.float64).reshape(-1, k)
                counts[a] = (np.asarray(counts[a]) + np.bincount(hard_labels(probs, threshold)[0], minlength=k)).tolist()
            hw = max(float(halfwidth(np.array([counts[a]]), share_alpha, m.interval)[0]) for a in attrs)
            narrow = math.isfinite(hw) and hw <= plan.target_halfwidth
            record["looks"].append({"n": n, "counts": counts, "halfwidth": hw if math.isfinite(hw) else None,
                                    "stop": narrow or n == plan_looks[-1]})
            atomic_write_json(path, record)
        bar.update(1)
    bar.close()
    barrier()
    used = {p: json.loads((folder / f"{_hash(p)}.json").read_text())["looks"][-1]["n"] for p in prompts}
    keys = [content_key(identity, p, s) for p in prompts for s in range(config.seed_offset, config.seed_offset + used[p])]
    return store, keys, used, share_alpha


def run_audit(config: AuditConfig, out: str | Path, images_dir: str | Path | None = None, progress: bool = True,
              generator=None, classifier=None, report: bool = True) -> dict[str, Any]:
    """Audit a generator (or a folder of images) into the run folder ``out``; returns the metrics dict.

    Writes ``metrics.json``, ``predictions.json``, ``report.html`` and ``report.md``; each stage resumes. Also writes
    ``classifier_card.json`` (the classifier's own biases, :mod:`audit.card`; section ``card:`` of the config, on by
    default) and, when prompt sets tag their prompts with groups (region, income, language, ...), per-group tables
    (:mod:`audit.groups`); both are added to ``metrics.json`` (keys ``classifier_card`` and ``groups``) and to the
    report as extra sections. ``metrics["run"]`` holds the resolved run settings (:func:`audit.sample.run_settings`:
    generator identity, sampling settings with their defaults, images per prompt, and per model the resolved
    revision, dtype, device and variant), the same as ``run.json``. Images the pipeline's safety checker flagged are
    left out of the shares; ``metrics["nsfw"]`` has their rate per prompt and overall (:func:`nsfw_summary`).
    """
    from audit.classify import ClipClassifier
    from audit.sample import run_sample, run_settings, write_run_metadata

    out = check_writable(out)
    card_config = config.card
    # Every input first (config, files it names, the image folder): bad input fails before any model loads or any
    # folder is written.
    config.check(images=images_dir is not None, generator=generator is None)
    rows = read_images_dir(images_dir) if images_dir is not None else None
    classifier = classifier or ClipClassifier(config.classifier)
    if images_dir is None and generator is None:
        # Load the generator here so the card can reuse it.
        from generators.backends import load_generator

        generator = load_generator(config.generator)
    from audit.faces import load_detector

    detector = load_detector(config.faces)
    share_alpha = None  # the per-prompt interval level when an image plan chose the counts
    if images_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
        store = RunStore(out)
        prompts, keys = import_images(images_dir, store, rows)
        records = store.records(keys)
        counts = {p: 0 for p in prompts}
        for r in records:
            counts[r["prompt"]] += 1
        settings = run_settings(None, counts, [r["seed"] for r in records], source=str(Path(images_dir).resolve()),
                                classifier=classifier, detector=detector)
    elif config.plan is not None:
        store, keys, counts, share_alpha = sample_adaptive(config, out, generator, classifier, progress=progress,
                                                           detector=detector)
        prompts = config.prompts.neutral_prompts()
        records = store.records(keys)
        plan = {**to_dict(config.plan), "looks": config.plan.looks(), "share_alpha": share_alpha}
        settings = run_settings(generator, counts, [r["seed"] for r in records], plan=plan, classifier=classifier,
                                detector=detector)
        write_run_metadata(out, config, " ".join(sys.argv), "sample", {"images": len(keys)}, settings=settings)
    else:
        store, keys = run_sample(config, out, progress=progress, generator=generator)
        prompts = config.prompts.neutral_prompts()
        records = store.records(keys)
        settings = run_settings(generator, {p: len(config.seeds) for p in prompts}, config.seeds,
                                classifier=classifier, detector=detector)
    # Images the pipeline's safety checker flagged came back black: they never reach the face detector or the
    # shares, and are counted on their own (nsfw_summary).
    kept = [r for r in records if not r.get("nsfw_content_detected")]
    rows = classify_store(store, kept, config.faces, classifier, clip_score=config.metrics.clip_score,
                          progress=progress, detector=detector)
    attributes = compute_metrics(prompts, kept, rows, classifier, config.metrics,
                                 plan=config.plan if images_dir is None else None, share_alpha=share_alpha)
    n_face = sum(rows[r["key"]]["face"] for r in kept)
    metrics = {
        "run": {"name": config.name, **settings, "n_images": len(records), "classifier": classifier.identity(),
                "faces": to_dict(config.faces)},
        "faces": {"n_images": len(kept), "n_faces": int(n_face),
                  "no_face_rate": 1 - n_face / len(kept) if kept else None, "lower_is_better": True},
        "nsfw": nsfw_summary(prompts, records),
        "attributes": attributes,
        "quality": quality_summary(prompts, kept, rows, config.metrics) if config.metrics.clip_score
        else None,
    }
    predictions = []
    for r in records:
        nsfw = r.get("nsfw_content_detected")
        if nsfw:
            predictions.append({"key": r["key"], "prompt": r["prompt"], "seed": r["seed"], "file": r["file"],
                                "face": None, "clip_score": None, "nsfw": True,
                                **{name: None for name in classifier.attributes}})
            continue
        row = rows[r["key"]]
        pred = {"key": r["key"], "prompt": r["prompt"], "seed": r["seed"], "file": r["file"], "face": row["face"],
                "clip_score": row["clip_score"], "nsfw": nsfw}
        for name, spec in classifier.attributes.items():
            if row["probs"]:
                p = np.asarray(row["probs"][name])
                abstain = p.max() < classifier.config.abstain_threshold
                pred[name] = None if abstain else spec.classes[int(p.argmax())]
                pred[f"{name}_p"] = round(float(p.max()), 4)
            else:
                pred[name] = None
        predictions.append(pred)
    sections = extra_sections(config, out, metrics, classifier, card_config,
                              generator=generator if images_dir is None else None, progress=progress)
    atomic_write_json(out / "predictions.json", predictions)
    atomic_write_json(out / "metrics.json", metrics)
    write_run_metadata(out, config, " ".join(sys.argv), "audit",
                       {"gender_rd": attributes.get("gender", {}).get("rd")}, settings=settings)
    if report:
        from audit.report import write_report

        write_report(out, metrics, predictions, extra_sections=sections)
    return metrics


def extra_sections(config, out: Path, metrics: dict[str, Any], classifier, card_config, generator=None,
                   progress: bool = False) -> list:
    """Per-group tables and the classifier bias card of an audit: added to ``metrics`` and returned as sections.

    Adds ``metrics["groups"]`` (when the prompt sets tag the audited prompts) and ``metrics["classifier_card"]`` (a
    summary; the full card is written to ``out/classifier_card.json``).
    """
    from audit.card import FILENAME, build_card, card_section, check_card, write_card
    from audit.groups import group_report, groups_section

    sections = []
    if config.prompts.prompt_sets:
        groups = group_report(metrics, config.prompts.prompt_tags(), config.prompts.group_axes() or None,
                              alpha=config.metrics.alpha, n_boot=config.metrics.n_boot, seed=config.metrics.seed)
        if groups is not None:
            metrics["groups"] = groups
            sections.append(groups_section(groups))
    if card_config.enabled:
        card = build_card(classifier, card_config, generator=generator, run_dir=out, faces=config.faces,
                          calibration=config.metrics.calibration, progress=progress)
        check = check_card(card, metrics, card_config.warn_fraction, card_config.warn_floor,
                           card_config.labelled_attribute)
        write_card(out, card, check)
        metrics["classifier_card"] = {"file": FILENAME, "key": card["key"], "flags": card["flags"],
                                      "warnings": check["warnings"], "check": check["attributes"]}
        # The card goes first among the extra sections: its warnings qualify every number above it.
        sections.insert(0, card_section(card, check))
    return sections
