"""Component swap (beyond the paper): which component of a fine-tuned model carries the change in bias?

For a base model and its fine-tuned version, every combination of {base, tuned} *language side* x {base, tuned}
*vision side* is built, generated on the same prompts and seeds, and audited with the same classifier (a 2 x 2
factorial). With ``R[l, d]`` the mean RD over prompts of the cell with language side ``l`` and vision side ``d``:

* total change ``R[T, T] - R[B, B]``;
* main effect of the language side ``((R[T, B] - R[B, B]) + (R[T, T] - R[B, T])) / 2`` (the change from swapping
  in the tuned language side, averaged over both decoders), and likewise for the vision side;
* interaction ``R[T, T] - R[T, B] - R[B, T] + R[B, B]``;
* the two main effects add up to the total exactly, so ``language_share = language_main / total`` is the share
  of the change the language side carries (undefined when the total is ~0).

Intervals: a paired two-level bootstrap: prompts are resampled, then seeds within each prompt, with the same
draws for all four cells (they share prompts and seeds), and each effect is recomputed from per-prompt RDs of the
resampled hard labels. Percentile intervals re-centred on the estimate, as in the audit.

Components (what "language side" and "vision side" mean) come from the backend (its ``components`` capability,
:mod:`generators.base`), overridable in :class:`SwapConfig`:

* Janus family: language = ``model.language_model`` plus everything else that decides the image tokens
  (``model.generation_embeddings``, ``model.generation_aligner``, ``model.generation_head``, and ``lm_head``);
  vision = ``model.vqmodel`` (the VQ tokenizer/decoder that turns tokens into pixels). The understanding tower
  (``model.vision_model``, ``model.aligner``) plays no part in generation and stays at base.
* Emu3: language = ``model.text_model`` and ``lm_head``: its image tokens are vocabulary entries, so their input
  embeddings and output rows swap with the language side (they cannot be swapped apart from the text model, as
  Janus' generation head can); vision = ``model.vqmodel`` (the VQ decoder that turns tokens into pixels, and the
  encoder its understanding path reads images with).
* Diffusers: language = the text encoder(s); vision = the UNet (or transformer). The VAE stays at base.

Parameters that differ between base and tuned outside both components are listed as ``unassigned_differences``;
any there mean the swap does not cover the whole fine-tune.

The cells are built in place in the base generator's model (its weights are restored afterwards), so only the
base, the tuned weights of the two components, and one working copy are in memory.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from generators.config import ConfigError, UserError, option

LEVELS = ("base", "tuned")
FACTORS = ("language", "vision")


@dataclass
class SwapConfig:
    """Settings of the component swap."""

    tuned_model: str | None = option(None, help="fine-tuned model (directory or hub id) with the base's architecture")
    tuned_adapter: str | None = option(None, help="or: a PEFT adapter applied to (and merged into) the base model")
    components: dict[str, list[str]] = option(
        default_factory=dict,
        help="override the module paths of each factor: {language: [...], vision: [...]} (see debias.locate.swap)",
    )
    n_boot: int = option(1000, help="bootstrap replicates of the effect intervals")
    alpha: float = option(0.05, help="1 - confidence level of the intervals")
    seed: int = option(0, help="bootstrap seed")

    def __post_init__(self):
        if self.tuned_model and self.tuned_adapter:
            raise ConfigError("config keys 'locate.swap.tuned_model' and 'tuned_adapter': give one, not both")
        bad = set(self.components) - set(FACTORS)
        if bad:
            raise ConfigError(f"config key 'locate.swap.components': unknown factor(s) {sorted(bad)}; use "
                              f"{list(FACTORS)}")
        if self.n_boot < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"config keys 'locate.swap.n_boot' (>= 1) / 'alpha' (0..1): got {self.n_boot} / "
                              f"{self.alpha}")


# -------------------------------------------------------------------------------------------------- statistics


def _effects(r: np.ndarray) -> dict[str, float]:
    """Effects from the cell means ``r[l, d]`` (index 0 base, 1 tuned)."""
    total = r[1, 1] - r[0, 0]
    lang = ((r[1, 0] - r[0, 0]) + (r[1, 1] - r[0, 1])) / 2
    vis = ((r[0, 1] - r[0, 0]) + (r[1, 1] - r[1, 0])) / 2
    return {"total": total, "language_main": lang, "vision_main": vis,
            "interaction": r[1, 1] - r[1, 0] - r[0, 1] + r[0, 0],
            "language_only": r[1, 0] - r[0, 0], "vision_only": r[0, 1] - r[0, 0]}


def factorial_effects(labels: np.ndarray, k: int, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                      min_total: float = 1e-9) -> dict[str, Any]:
    """2 x 2 factorial effects on RD with a paired two-level bootstrap.

    Args:
        labels: ``(2, 2, P, S)`` hard class indices; axis 0 the language level (0 base, 1 tuned), axis 1 the vision
            level, P prompts, S seeds (the same prompt and seed at the same index in every cell); -1 for an image
            without a classified face.
        k: number of classes.
        n_boot: bootstrap replicates.
        alpha: 1 - confidence level.
        seed: bootstrap seed.
        min_total: ``language_share`` is left undefined when ``|total|`` is below this.

    Returns:
        ``cells`` (mean RD per cell, keyed ``language=L,vision=D``) with ``cells_ci``; ``n_prompts`` used (prompts
        with a classified image in every cell); each effect (see the module docstring: ``total``,
        ``language_main``, ``vision_main``, ``interaction``, ``language_only``, ``vision_only``) with ``*_ci``; and
        ``language_share`` / ``vision_share`` with intervals (replicates with ``|total| < min_total`` are dropped).
    """
    from audit.metrics import percentile_ci, rd, shares_from_counts

    lab = np.asarray(labels)
    if lab.ndim != 4 or lab.shape[:2] != (2, 2):
        raise UserError(f"factorial_effects: labels must be (2, 2, prompts, seeds), got shape {lab.shape}")
    if lab.size and (lab.max() >= k or lab.min() < -1):
        raise UserError(f"factorial_effects: labels must be -1 or in [0, {k}), got {lab.min()}..{lab.max()}")
    onehot = (lab[..., None] == np.arange(k)).astype(np.int64)  # (2, 2, P, S, K)
    counts = onehot.sum(axis=3)  # (2, 2, P, K)
    per_prompt = rd(shares_from_counts(counts))  # (2, 2, P); NaN where no face
    valid = ~np.isnan(per_prompt).any(axis=(0, 1))
    n = int(valid.sum())
    out: dict[str, Any] = {"n_prompts": n, "n_prompts_dropped": int(len(valid) - n)}
    if n == 0:
        return {**out, "cells": None, "language_share": None, "vision_share": None}
    r = np.nanmean(per_prompt[:, :, valid], axis=2)
    est = _effects(r)
    onehot, P, S = onehot[:, :, valid], n, lab.shape[3]
    rng = np.random.default_rng(seed)
    reps = {key: np.empty(n_boot) for key in est}
    reps["cells"] = np.empty((n_boot, 2, 2))
    for b in range(n_boot):
        # Paired: the same prompts and the same seeds within each prompt for all four cells.
        pi = rng.integers(0, P, P)
        si = rng.integers(0, S, (P, S))
        c = onehot[:, :, pi[:, None], si].sum(axis=3)  # (2, 2, P, K)
        rb = np.nanmean(rd(shares_from_counts(c)), axis=2)
        reps["cells"][b] = rb
        for key, v in _effects(rb).items():
            reps[key][b] = v
    span = 2 / k  # RD lies in [0, 2/K]: differences of two cells in [-2/K, 2/K], the interaction in twice that
    for key, v in est.items():
        bound = 2 * span if key == "interaction" else span
        out[key] = float(v)
        out[f"{key}_ci"] = list(percentile_ci(reps[key], alpha, center=float(v), bounds=(-bound, bound)))
    out["cells"] = {f"language={LEVELS[i]},vision={LEVELS[j]}": float(r[i, j]) for i in range(2) for j in range(2)}
    out["cells_ci"] = {f"language={LEVELS[i]},vision={LEVELS[j]}":
                       list(percentile_ci(reps["cells"][:, i, j], alpha, center=float(r[i, j]), bounds=(0, span)))
                       for i in range(2) for j in range(2)}
    for name in ("language", "vision"):
        main = reps[f"{name}_main"]
        ok = np.abs(reps["total"]) >= min_total
        if abs(est["total"]) < min_total:
            out[f"{name}_share"], out[f"{name}_share_ci"] = None, None
            continue
        share = est[f"{name}_main"] / est["total"]
        out[f"{name}_share"] = float(share)
        out[f"{name}_share_ci"] = list(percentile_ci(main[ok] / reps["total"][ok], alpha)) if ok.any() else None
    return out


# -------------------------------------------------------------------------------------------------- modules


def _get(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"config key 'locate.swap.components': {type(root).__name__} has no module '{path}'")
    return obj


def _state(root, paths: Sequence[str]) -> dict[str, dict]:
    return {p: {k: v.detach().to("cpu", copy=True) for k, v in _get(root, p).state_dict().items()} for p in paths}


def _fingerprint(states: Mapping[str, Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    for p in sorted(states):
        for k, v in sorted(states[p].items()):
            h.update(f"{p}.{k}{tuple(v.shape)}".encode())
            h.update(v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _named_tensors(root) -> dict[str, Any]:
    """Every parameter and buffer of a model, or of each model component of a pipeline (prefixed by its name)."""
    import torch

    if isinstance(root, torch.nn.Module):
        return root.state_dict()
    return {f"{name}.{k}": v for name, comp in root.components.items() if isinstance(comp, torch.nn.Module)
            for k, v in comp.state_dict().items()}


def unassigned_differences(base_root, tuned_root, components: Mapping[str, Sequence[str]]) -> list[str]:
    """Module prefixes whose parameters differ between base and tuned outside every listed component."""
    import torch

    covered = tuple(f"{p}." for paths in components.values() for p in paths)
    a, b = _named_tensors(base_root), _named_tensors(tuned_root)
    diff = set()
    for key in sorted(set(a) | set(b)):
        if key.startswith(covered):
            continue
        if key not in a or key not in b or a[key].shape != b[key].shape or not torch.equal(a[key].cpu(), b[key].cpu()):
            diff.add(".".join(key.split(".")[:2]))
    return sorted(diff)


class _CellGenerator:
    """The base generator with one swap cell loaded; its identity names the cell (keys the run store)."""

    def __init__(self, inner, cell: dict[str, str], fingerprints: dict[str, str]):
        self.inner, self.config, self.settings = inner, inner.config, inner.settings
        self.device, self.dtype = inner.device, inner.dtype
        self.batch_invariant = inner.batch_invariant
        self.capabilities = frozenset()  # only sampled and audited
        self.cell, self.fingerprints = cell, fingerprints

    def generate(self, prompts, seeds):
        return self.inner.generate(prompts, seeds)

    def identity(self) -> dict:
        return {**self.inner.identity(), "swap": {**self.cell, "weights": self.fingerprints}}

    def provenance(self) -> dict:
        # The base model's record, plus which side of each component the cell loaded.
        record = self.inner.provenance()
        record["generator"] = {**record["generator"], "swap": {**self.cell, "weights": self.fingerprints}}
        return record


def load_tuned(experiment_config, config: SwapConfig):
    """The tuned generator named by ``tuned_model`` or ``tuned_adapter`` (loaded like the base)."""
    from generators.backends import load_generator

    if config.tuned_adapter:
        if not Path(config.tuned_adapter).exists():
            raise UserError(f"config key 'locate.swap.tuned_adapter': '{config.tuned_adapter}' does not exist")
        gcfg = replace(experiment_config.generator, adapter=config.tuned_adapter, merge_adapter=True)
    elif config.tuned_model:
        gcfg = replace(experiment_config.generator, model=config.tuned_model)
    else:
        raise UserError("the component swap needs the fine-tuned model: set locate.swap.tuned_model or "
                        "locate.swap.tuned_adapter (or pass tuned= from Python)")
    return load_generator(gcfg)


def _tuned_root(base, tuned):
    """The module root of the tuned side: a generator's own, or a model of the base's family."""
    from generators.base import Generator

    return tuned.module_root() if isinstance(tuned, Generator) else base.module_root(tuned)


def _labels_from_predictions(predictions: list[dict], prompts: Sequence[str], seeds: Sequence[int],
                             attributes: Mapping[str, Sequence[str]],
                             joint: Sequence[Sequence[str]] = ()) -> dict[str, np.ndarray]:
    """Hard labels ``(prompts, seeds)`` per attribute from ``predictions.json`` (-1: no face or abstained).

    Joint attributes (``gender_race``) are not stored per image; their label is the cell ``"g/r"`` of the parts.
    """
    index = {(p["prompt"], int(p["seed"])): p for p in predictions}
    parts = {f"{a}_{b}": (a, b) for a, b in joint}
    out = {}
    for attr, classes in attributes.items():
        classes = list(classes)
        arr = np.full((len(prompts), len(seeds)), -1, dtype=np.int64)
        for i, p in enumerate(prompts):
            for j, s in enumerate(seeds):
                row = index.get((p, int(s)))
                if row is None:
                    continue
                if attr in row:
                    if row[attr] is not None:
                        arr[i, j] = classes.index(row[attr])
                elif attr in parts:
                    a, b = (row.get(x) for x in parts[attr])
                    if a is not None and b is not None:
                        arr[i, j] = classes.index(f"{a}/{b}")
        out[attr] = arr
    return out


def _without_card(experiment_config):
    """The experiment with the audit's classifier bias card off: the four cells share one classifier, so its card
    would be the same four times (run ``debias audit`` once for it)."""
    cfg = copy.copy(experiment_config)
    cfg.card = replace(experiment_config.card, enabled=False)
    return cfg


def component_swap(experiment_config, out_dir: str | Path, config: SwapConfig | None = None, base=None, tuned=None,
                   classifier=None, progress: bool = False) -> dict[str, Any]:
    """Generate and audit the four {base, tuned} language x vision cells and attribute the bias change.

    Args:
        experiment_config: the experiment (generator, prompts, images_per_prompt, seeds, classifier, metrics).
        out_dir: folder; each cell is audited into ``out_dir/language-L_vision-D/``.
        config: swap settings.
        base: the base generator (loaded from ``experiment_config.generator`` when None). Its weights are changed
            during the swap and restored before returning.
        tuned: the tuned generator or model (same architecture); loaded from ``config`` when None.
        classifier: the audit classifier (loaded from ``experiment_config.classifier`` when None).
        progress: progress bars of the audits.

    Returns:
        JSON-ready dict: ``components`` (module paths per factor), ``unassigned_differences``, ``cells`` (folder and
        mean RD per attribute), and per attribute the :func:`factorial_effects` result.
    """
    import torch

    from audit.classify import ClipClassifier
    from audit.run import run_audit
    from generators.backends import load_generator
    from generators.base import COMPONENTS, require

    config = config or SwapConfig()
    out_dir = Path(out_dir)
    base = base or load_generator(experiment_config.generator)
    require(base, COMPONENTS, "the component swap (drop 'swap' from locate.probes otherwise)")
    loaded_tuned = tuned is None
    tuned = tuned if tuned is not None else load_tuned(experiment_config, config)
    base_root, tuned_root = base.module_root(), _tuned_root(base, tuned)
    components = {**base.components(), **config.components}
    for f in FACTORS:
        if not components.get(f):
            raise UserError(f"config key 'locate.swap.components.{f}': no modules for the {f} side")
    states = {f: {"base": _state(base_root, components[f]), "tuned": _state(tuned_root, components[f])}
              for f in FACTORS}
    for f in FACTORS:
        for p in components[f]:
            a, b = states[f]["base"][p], states[f]["tuned"][p]
            if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
                raise UserError(f"component swap: module '{p}' has different parameters in the base and the tuned "
                                "model; the swap needs the same architecture (merge LoRA adapters first)")
    unassigned = unassigned_differences(base_root, tuned_root, components)
    fingerprints = {f: {lvl: _fingerprint(states[f][lvl]) for lvl in LEVELS} for f in FACTORS}
    if loaded_tuned:  # only its components' weights are needed from here on: free the rest of the tuned model
        tuned = tuned_root = None
        gc.collect()
    classifier = classifier or ClipClassifier(experiment_config.classifier)
    prompts = experiment_config.prompts.neutral_prompts()
    seeds = experiment_config.seeds

    def load(factor: str, level: str) -> None:
        for p, sd in states[factor][level].items():
            _get(base_root, p).load_state_dict(sd)

    cell_config = _without_card(experiment_config)
    cells, labels, attr_classes = {}, {}, None
    try:
        for li, lang in enumerate(LEVELS):
            for vi, vis in enumerate(LEVELS):
                load("language", lang)
                load("vision", vis)
                name = f"language-{lang}_vision-{vis}"
                gen = _CellGenerator(base, {"language": lang, "vision": vis},
                                     {"language": fingerprints["language"][lang],
                                      "vision": fingerprints["vision"][vis]})
                metrics = run_audit(cell_config, out_dir / name, generator=gen, classifier=classifier,
                                    progress=progress, report=False)
                predictions = json.loads((out_dir / name / "predictions.json").read_text())
                if attr_classes is None:
                    attr_classes = {a: list(b["classes"]) for a, b in metrics["attributes"].items()}
                cells[name] = {"language": lang, "vision": vis, "dir": name,
                               "rd": {a: b["rd"] for a, b in metrics["attributes"].items()}}
                labels[(li, vi)] = _labels_from_predictions(predictions, prompts, seeds, attr_classes,
                                                            experiment_config.metrics.joint_pairs(attr_classes))
    finally:
        with torch.no_grad():
            load("language", "base")
            load("vision", "base")
    attributes = {}
    for a, classes in attr_classes.items():
        arr = np.stack([np.stack([labels[(li, vi)][a] for vi in range(2)]) for li in range(2)])
        attributes[a] = {"classes": classes, **factorial_effects(arr, len(classes), config.n_boot, config.alpha,
                                                                 config.seed)}
    return {
        "probe": "swap",
        "components": components,
        "component_descriptions": dict(base.component_roles),
        "unassigned_differences": unassigned,
        "fingerprints": fingerprints,
        "prompts": len(prompts), "seeds": seeds,
        "cells": cells,
        "attributes": attributes,
        "n_boot": config.n_boot, "alpha": config.alpha,
        "design": "2x2 factorial on the same prompts and seeds; paired two-level bootstrap (prompts, then seeds)",
    }
