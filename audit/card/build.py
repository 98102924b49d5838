"""Build the card: check its inputs, resolve what ``auto`` stands for, measure each block, cache and write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from audit.card.blocks import accuracy_from_labelled, association_block, generator_block, representation_block
from audit.card.cache import cache_paths, cached_card, card_key, file_digest, store_card
from audit.card.config import BUILTIN_KINDS, FILENAME, FORMAT, MAN_WOMAN, STEREOTYPE_PAIRS, VERSION, CardConfig
from audit.card.data import (
    accuracy_from_calibration,
    builtin_person_free,
    generator_draws_objects,
    lab_labelled,
    lab_occupation_pairs,
    lab_representation_prompts,
    lab_world_config,
    lab_world_dir,
    labelled_from_source,
)
from audit.card.measures import card_flags
from audit.compositional import binding_check, lab_binding_items, load_binding_items
from audit.store import atomic_write_json
from generators.config import ConfigError, UserError, to_dict


def validate_card_inputs(config: CardConfig, has_generator: bool = True) -> None:
    """Check the card's paths and modes before an audit starts, so bad input fails before any work.

    Raises:
        UserError: for a labelled source or composite manifest that does not exist, or ``person_free: generator``
            without a generator (an audit of an image folder).
    """
    if not isinstance(config, CardConfig):
        raise ConfigError(f"config section 'card': expected a CardConfig, got {type(config).__name__}")
    if not config.enabled:
        return
    if config.person_free == "generator" and not has_generator:
        raise UserError("config key 'card.person_free': 'generator' needs a generator, but this audit reads an "
                        "image folder; use builtin or auto")
    src = config.labelled
    if src not in (None, "auto", "lab") and not str(src).startswith("hf:") and not Path(src).exists():
        raise UserError(f"config key 'card.labelled': '{src}' does not exist; give a labelled folder, a .csv/.jsonl "
                        "manifest, a datasets folder, hf:<name>, 'lab' or null")
    comp = config.compositional.images
    if config.compositional.enabled and comp and not Path(comp).is_file():
        raise UserError(f"config key 'card.compositional.images': '{comp}' does not exist; give a .jsonl or .csv "
                        "manifest with path, caption and swapped columns")


def resolve_card_settings(config: CardConfig, classifier) -> dict[str, Any]:
    """The concrete prompts, pairs and labelled source ``auto`` settings stand for, given the classifier."""
    world = lab_world_dir(classifier.config.model)
    world_cfg = lab_world_config(world) if world is not None else None
    prompts = list(config.representation_prompts) or (
        lab_representation_prompts(world_cfg) if world_cfg is not None else list(MAN_WOMAN))
    pairs = [list(p) for p in config.occupation_pairs] or (
        lab_occupation_pairs(world_cfg) if world_cfg is not None else [list(p) for p in STEREOTYPE_PAIRS])
    labelled = config.labelled
    if labelled == "auto":
        labelled = "lab" if world is not None else None
    composites = config.compositional.images or ("lab" if world is not None else None)
    return {"lab_world": str(world) if world is not None else None, "representation_prompts": prompts,
            "occupation_pairs": pairs, "labelled": labelled, "composites": composites}


def build_card(classifier, config: CardConfig | None = None, *, generator: Any = None,
               run_dir: str | Path | None = None, faces: Any = None, calibration: str | Path | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Measure the classifier's own biases (the card without the audit comparison; see :func:`check_card`).

    Args:
        classifier: The audit's :class:`audit.classify.ClipClassifier`.
        config: Card settings (default :class:`CardConfig`).
        generator: The audited generator, for person-free ``a photo of a {object}`` images (see ``person_free``).
        run_dir: Run folder: caches the card (``stages/card-<hash>.json``) and the generated images (``card/``).
        faces: The audit's face config: crops labelled photos, and drops generated person-free images in which a
            face is found.
        calibration: ``metrics.calibration`` path (accuracy and confusion).
        progress: Show a progress bar while generating person-free images.

    Returns:
        The card (JSON-able): ``format``, ``version``, ``key``, ``classifier``, ``settings``, ``representation``,
        ``association``, ``accuracy``, ``compositional``, ``flags``.

    Raises:
        ConfigError: for a bad config.
        UserError: for unreadable labelled data, composites or calibration file (before anything is computed).
    """
    config = config or CardConfig()
    if not isinstance(config, CardConfig):
        raise ConfigError(f"card: expected a CardConfig, got {type(config).__name__}")
    settings = resolve_card_settings(config, classifier)
    use_generator = generator is not None and (
        config.person_free == "generator"
        or (config.person_free == "auto" and generator_draws_objects(generator.config)))
    if config.person_free == "generator" and generator is None:
        raise UserError("config key 'card.person_free': 'generator' needs a generator; audits of an image folder "
                        "have none: use builtin or auto")
    key_obj = {
        "format": VERSION, "classifier": classifier.identity(), "card": to_dict(config), "settings": settings,
        "generator": generator.identity() if use_generator else None, "calibration": file_digest(calibration),
        "faces": to_dict(faces) if faces is not None else None,
    }
    for k in ("warn_fraction", "warn_floor", "cache_dir"):
        key_obj["card"].pop(k, None)
    key = card_key(key_obj)
    paths = cache_paths(key, run_dir, config.cache_dir)
    card = cached_card(key, paths)
    if card is not None:
        return card
    # Inputs first: a bad path fails before anything is computed.
    labelled = None
    if settings["labelled"] == "lab":
        labelled = lab_labelled(config.n_labelled, config.seed)
    elif settings["labelled"]:
        classes = {name: list(h.classes) for name, h in classifier.heads.items()}
        if config.labelled_attribute not in classes:
            classes[config.labelled_attribute] = [config.male_class, config.female_class]
        labelled = labelled_from_source(settings["labelled"], classes, config.n_labelled, faces)
    composites = None
    if config.compositional.enabled and settings["composites"]:
        cc = config.compositional
        composites = (lab_binding_items(cc.n_items, cc.seed, cc.template) if settings["composites"] == "lab"
                      else load_binding_items(settings["composites"]))
    accuracy: dict[str, Any] = {}
    if calibration:
        accuracy = accuracy_from_calibration(calibration, classifier)

    prompts = settings["representation_prompts"]
    images, kinds = builtin_person_free(config.n_builtin, seed=config.seed)
    sets = {"builtin": {**representation_block(classifier, images, prompts, config.alpha),
                        "kinds": {k: kinds.count(k) for k in BUILTIN_KINDS}}}
    if use_generator:
        sets["generator"] = generator_block(classifier, generator, config, prompts, run_dir, faces, progress)
    rep_biases = [abs(s["prompt_pair"]["bias"]) for s in sets.values() if s.get("n_images")]
    head_devs: dict[str, float] = {}
    for s in sets.values():
        for a, h in (s.get("heads") or {}).items():
            if h.get("deviation") is not None:
                head_devs[a] = max(head_devs.get(a, 0.0), h["deviation"])
    representation = {"sets": sets, "prompts": prompts, "max_abs_bias": max(rep_biases) if rep_biases else None,
                      "max_head_deviation": head_devs}

    if labelled is not None:
        association = association_block(classifier, labelled, settings["occupation_pairs"],
                                        config.occupation_template, config.labelled_attribute, config.female_class,
                                        config.male_class, config.alpha)
        if not accuracy:
            accuracy = accuracy_from_labelled(classifier, labelled)
    else:
        association = {"skipped": "no labelled faces: set card.labelled (a labelled folder, manifest or dataset; "
                                  "'lab' for lab-world renders)"}
    if not accuracy:
        accuracy = {"skipped": "no labelled data: run `debias calibrate` and set metrics.calibration, or set "
                               "card.labelled"}
    if composites is not None:
        source = "lab-world renders side by side" if settings["composites"] == "lab" else str(settings["composites"])
        compositional = binding_check(classifier, composites, config.compositional, source)
    else:
        compositional = {"skipped": "disabled" if not config.compositional.enabled else
                         "no images with known binding: set card.compositional.images (a manifest of composites)"}
    card = {
        "format": FORMAT, "version": VERSION, "key": key, "classifier": classifier.identity(),
        "settings": settings, "representation": representation, "association": association, "accuracy": accuracy,
        "compositional": compositional,
    }
    card["flags"] = card_flags(card, config.flag_threshold)
    # Round-trip through JSON so a fresh card, a memoised one and one read from disk are the same plain data.
    card = json.loads(json.dumps(card))
    store_card(key, card, paths)
    return card


def write_card(run_dir: str | Path, card: Mapping[str, Any], check: Mapping[str, Any] | None = None) -> Path:
    """Write ``RUN/classifier_card.json`` (the card, plus the audit comparison when given), atomically."""
    path = Path(run_dir) / FILENAME
    atomic_write_json(path, {**card, "check": dict(check) if check is not None else None})
    return path

