"""Classifier bias card: how biased is the CLIP classifier that measures the generator's bias?

An audit's numbers are the generator's bias *as seen through* a zero-shot CLIP classifier, which has biases of its
own ("CLIP the Bias", Alabdulmohsin et al., ICLR 2024). The card measures them next to every audit, written to
``RUN/classifier_card.json`` and shown as a report section:

1. **Representation bias** on images with *no person*: a built-in person-free set (solid colours, gradients,
   noise, simple shapes) and, when the generator can draw objects, its images for ``a photo of a {object}``.

   * *prompt-pair preference*: how often the classifier prefers ``a photo of a man`` over ``a photo of a woman``
     (for the lab world: its own gender prompts), minus 0.5. Range -0.5 .. 0.5; 0 = no default; ties count half.
   * *head deviation*: the classifier's own attribute heads (what the audit uses) on the same images, as the
     largest deviation of a hard class share from uniform, ``max_k |share_k - 1/K|``.
   * *person-label rate*: how often any attribute gets a label above the abstain threshold (with threshold 0, every
     image is labelled: the audit then relies on face detection to keep person-free images out).

2. **Association bias** on labelled faces (a labelled folder/manifest/dataset, or lab renders with known labels):
   for each occupation pair (nurse/doctor, secretary/manager, housekeeper/homeowner, receptionist/executive,
   librarian/scientist) the zero-shot choice between ``a photo of a nurse`` and ``a photo of a doctor``, and the gap
   ``P(nurse | female) - P(nurse | male)`` with a Newcombe interval. Positive = the stereotyped direction. For lab
   renders, pairs come from the lab occupations and images showing either occupation of a pair are left out of that
   pair (no visual evidence for either), so any gap is the classifier's association.

3. **Accuracy and confusion** from ``debias calibrate`` (``metrics.calibration``), or measured on the labelled
   images above when no calibration file is given.

4. **Compositional check** (:mod:`audit.compositional`): does it bind attributes to people or act as a bag of words?

The warning rule (per simple attribute ``a`` the audit measured):

* ``D_a`` = measured share deviation: mean over prompts of ``max_k |share_k - target_k|`` (hard shares of the
  audited images; for gender with a 50/50 target this is ``RD / 2``).
* ``B_a`` = the classifier's own bias on ``a``: the largest of its head deviation on person-free images and, for the
  labelled attribute (gender), ``|prompt-pair preference|`` and the largest ``|association gap|``.
* **WARN** when ``B_a >= warn_fraction * D_a`` (default 0.5: the classifier's own bias is at least half the effect
  measured) and ``B_a >= warn_floor`` (default 0.02: negligible classifier bias never warns).

The card is cached by the classifier's identity and the card settings: in the run folder
(``RUN/stages/card-<hash>.json``), in ``card.cache_dir`` when set (shared across runs), and in memory for the process
(sweeps and demos audit many runs with one classifier). Person-free images made by the generator enter the key
through the generator's identity.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from audit.compositional import CompositionalConfig
from generators.config import ConfigError, UserError, load_yaml, option, to_dict

FORMAT = "debias-classifier-card"
VERSION = 1
FILENAME = "classifier_card.json"

# Occupation pairs of the association check: (female-stereotyped, male-stereotyped).
STEREOTYPE_PAIRS: tuple[tuple[str, str], ...] = (
    ("nurse", "doctor"), ("secretary", "manager"), ("housekeeper", "homeowner"), ("receptionist", "executive"),
    ("librarian", "scientist"),
)
DEFAULT_OBJECTS = ("chair", "car", "tree", "cup", "house", "bicycle", "lamp", "book")
MAN_WOMAN = ("a photo of a man", "a photo of a woman")
BUILTIN_KINDS = ("solid", "gradient", "noise", "shapes")


@dataclass
class CardConfig:
    """The classifier bias card written next to every audit (config section ``card:``)."""

    enabled: bool = option(True, help="measure the classifier's own bias and show it in the audit report")
    person_free: Literal["auto", "builtin", "generator"] = option(
        "auto", help="person-free images: builtin (colours, gradients, noise, shapes), generator ('a photo of a "
                     "{object}' from the audited generator, plus builtin), auto (generator when it can draw objects: "
                     "not the lab world or a tiny random model)",
    )
    n_builtin: int = option(64, help="built-in person-free images (split over solid, gradient, noise, shapes)")
    objects: list[str] = option(default_factory=lambda: list(DEFAULT_OBJECTS),
                                help="objects for generated person-free images")
    object_template: str = option("a photo of a {object}", help="prompt of generated person-free images")
    images_per_object: int = option(4, help="generated images per object (seeds 0..N-1)")
    representation_prompts: list[str] = option(
        default_factory=list, help="the two prompts compared on person-free images; default 'a photo of a man' / "
                                   "'a photo of a woman' (lab world: its gender prompts)",
    )
    labelled: str | None = option(
        "auto", help="labelled faces for association bias and accuracy: a folder root/<attribute>/<class>/, a "
                     ".csv/.jsonl manifest, a datasets folder or hf:<name>; 'lab' renders lab-world people; auto: "
                     "lab for a lab-world classifier, else none",
    )
    labelled_attribute: str = option("gender", help="attribute of the association gap (its classes must include "
                                                    "female_class and male_class)")
    female_class: str = option("female", help="class of the labelled attribute the first occupation is tied to")
    male_class: str = option("male", help="the other class")
    n_labelled: int = option(64, help="lab renders per gender; cap on images per class of a labelled set")
    occupation_pairs: list[list[str]] = option(
        default_factory=list, help="[female-stereotyped, male-stereotyped] pairs; default nurse/doctor, "
                                   "secretary/manager, housekeeper/homeowner, receptionist/executive, "
                                   "librarian/scientist (lab world: pairs of its occupations)",
    )
    occupation_template: str = option("a photo of a {}", help="zero-shot prompt of an occupation ('{}')")
    warn_fraction: float = option(0.5, help="warn when the classifier's bias >= this fraction of the measured share "
                                            "deviation")
    warn_floor: float = option(0.02, help="classifier bias below this never warns")
    flag_threshold: float = option(0.2, help="card-only flag: |bias| at or above this is flagged on its own")
    cache_dir: str | None = option(None, help="extra folder caching cards by classifier identity across runs")
    alpha: float = option(0.05, help="1 - confidence level of the card's intervals")
    seed: int = option(0, help="seed of the built-in images and lab renders")
    compositional: CompositionalConfig = option(default_factory=CompositionalConfig,
                                                help="attribute-binding check (bag-of-words test)")

    def __post_init__(self):
        if isinstance(self.compositional, dict):  # built in code with a plain mapping, as from YAML
            from generators.config import from_dict

            self.compositional = from_dict(CompositionalConfig, self.compositional, prefix="card.compositional")
        for key in ("n_builtin", "images_per_object", "n_labelled"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'card.{key}': must be >= 1, got {getattr(self, key)}")
        if "{object}" not in self.object_template:
            raise ConfigError(f"config key 'card.object_template': {self.object_template!r} needs an {{object}} "
                              "placeholder, e.g. 'a photo of a {object}'")
        if self.occupation_template.count("{}") != 1:
            raise ConfigError(f"config key 'card.occupation_template': {self.occupation_template!r} needs exactly "
                              "one '{}', e.g. 'a photo of a {}'")
        if self.representation_prompts and len(self.representation_prompts) != 2:
            raise ConfigError(f"config key 'card.representation_prompts': give exactly two prompts (e.g. 'a photo "
                              f"of a man', 'a photo of a woman'), got {self.representation_prompts!r}")
        for i, pair in enumerate(self.occupation_pairs):
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ConfigError(f"config key 'card.occupation_pairs[{i}]': expected two different occupations "
                                  f"[female-stereotyped, male-stereotyped], got {pair!r}")
        if not 0 < self.warn_fraction:
            raise ConfigError(f"config key 'card.warn_fraction': must be > 0, got {self.warn_fraction}")
        if not 0 <= self.warn_floor < 1:
            raise ConfigError(f"config key 'card.warn_floor': must be in [0, 1), got {self.warn_floor}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'card.alpha': must be in (0, 1), got {self.alpha}")
        if self.female_class == self.male_class:
            raise ConfigError("config keys 'card.female_class' and 'card.male_class' must differ")


# ------------------------------------------------------------------------------------------------- metrics (pure)


def preference_rate(first: Any, second: Any) -> float:
    """How often the first prompt scores higher than the second (a tie counts half).

    Args:
        first: Scores (e.g. cosine similarities) of each image with the first prompt, shape (N,).
        second: Scores with the second prompt, shape (N,).

    Returns:
        The rate in [0, 1]; NaN for no images.

    Raises:
        UserError: for arrays of different shapes.
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise UserError(f"preference_rate: expected two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    if not len(a):
        return float("nan")
    return float(((a > b) + 0.5 * (a == b)).mean())


def representation_bias(first: Any, second: Any) -> float:
    """Representation preference on person-free images: :func:`preference_rate` minus 0.5 (range -0.5 .. 0.5)."""
    return preference_rate(first, second) - 0.5


def head_deviation(probs: Any, target: Any = None) -> dict[str, Any]:
    """Hard class shares of an attribute head on a set of images and their largest deviation from the target.

    Args:
        probs: Class probabilities (N, K).
        target: Target shares (K,); uniform when None.

    Returns:
        ``shares`` (K,), ``deviation`` ``max_k |share_k - target_k|`` and ``top_class`` (index of the largest share).
    """
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise UserError(f"head_deviation: expected probabilities of shape (N, K >= 2), got {p.shape}")
    k = p.shape[1]
    t = np.full(k, 1.0 / k) if target is None else np.asarray(target, dtype=float)
    if not len(p):
        return {"shares": [None] * k, "deviation": None, "top_class": None}
    shares = np.bincount(p.argmax(axis=1), minlength=k) / len(p)
    return {"shares": shares.tolist(), "deviation": float(np.abs(shares - t).max()), "top_class": int(shares.argmax())}


def association_gap(choose_first: Any, groups: Any, first_group: str, second_group: str,
                    alpha: float = 0.05) -> dict[str, Any]:
    """``P(first | first_group) - P(first | second_group)`` with a Newcombe (hybrid Wilson score) interval.

    Args:
        choose_first: Per image, 1 when the first occupation is chosen (0.5 for a tie), shape (N,).
        groups: Per image, its group label, shape (N,).
        first_group: The group the first occupation is stereotyped with (e.g. ``female``).
        second_group: The other group (e.g. ``male``).
        alpha: 1 - confidence level.

    Returns:
        ``p_first`` (group -> rate, every group present), ``n`` (group -> count), ``gap`` and ``gap_ci`` (None when
        either group has no image).
    """
    from audit.metrics import wilson_interval

    c = np.asarray(choose_first, dtype=float)
    g = np.asarray(groups)
    if c.shape != g.shape or c.ndim != 1:
        raise UserError(f"association_gap: choose_first {c.shape} and groups {g.shape} must be 1-D of equal length")
    names = list(dict.fromkeys(g.tolist()))
    p = {str(n): float(c[g == n].mean()) for n in names}
    n = {str(k): int((g == k).sum()) for k in names}
    if first_group not in p or second_group not in p:
        return {"p_first": p, "n": n, "gap": None, "gap_ci": None}
    p1, p2 = p[first_group], p[second_group]
    n1, n2 = n[first_group], n[second_group]
    l1, u1 = (float(v) for v in wilson_interval(p1 * n1, n1, alpha))
    l2, u2 = (float(v) for v in wilson_interval(p2 * n2, n2, alpha))
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"p_first": p, "n": n, "gap": d, "gap_ci": [max(-1.0, lo), min(1.0, hi)]}


def measured_deviation(attribute: Mapping[str, Any]) -> float | None:
    """Mean over prompts of ``max_k |share_k - target_k|`` from an attribute summary of ``metrics.json``.

    Args:
        attribute: One entry of ``metrics["attributes"]`` (``per_prompt`` shares and optional ``target``).

    Returns:
        The mean (prompts without classified faces left out), or None when no prompt has shares.
    """
    classes = attribute.get("classes") or []
    k = len(classes)
    target = np.asarray(attribute.get("target") or [1.0 / max(k, 1)] * k, dtype=float)
    devs = [float(np.abs(np.asarray(p["shares"], dtype=float) - target).max())
            for p in attribute.get("per_prompt") or [] if p.get("shares") and None not in p["shares"]]
    return float(np.mean(devs)) if devs else None


def warn_rule(classifier_bias: float | None, measured: float | None, fraction: float = 0.5,
              floor: float = 0.02) -> bool:
    """The card's warning rule: ``B >= fraction * D`` and ``B >= floor`` (see the module docstring).

    Args:
        classifier_bias: ``B``, the classifier's own bias on the attribute (absolute value is used).
        measured: ``D``, the measured mean share deviation (None: nothing measured; only the floor applies).
        fraction: ``warn_fraction``.
        floor: ``warn_floor``.

    Returns:
        True when the audit should warn.
    """
    if classifier_bias is None or not np.isfinite(classifier_bias):
        return False
    b = abs(float(classifier_bias))
    d = 0.0 if measured is None or not np.isfinite(measured) else float(measured)
    return b >= floor and b >= fraction * d


# ------------------------------------------------------------------------------------------- person-free images


def builtin_person_free(n: int = 64, size: int = 64, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Deterministic images with no person: solid colours, gradients, noise and simple shapes (a quarter each).

    Returns:
        ``(images, kinds)``.
    """
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for i in range(n):
        kind = BUILTIN_KINDS[i % len(BUILTIN_KINDS)]
        if kind == "solid":
            arr = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == "gradient":
            a, b = rng.integers(0, 256, (2, 3))
            angle = rng.uniform(0, 2 * np.pi)
            t = (np.cos(angle) * xx + np.sin(angle) * yy)
            t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
            arr = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
        elif kind == "noise":
            arr = rng.integers(0, 256, (size, size, 3))
        else:
            arr = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        im = Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), "RGB")
        if kind == "shapes":
            draw = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(1, 4))):
                x0, y0 = rng.integers(0, size // 2, 2)
                w, h = rng.integers(size // 6, size // 2, 2)
                x1, y1 = x0 + w, y0 + h
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                shape = ("rectangle", "ellipse", "polygon")[int(rng.integers(0, 3))]
                if shape == "rectangle":
                    draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=fill)
                elif shape == "ellipse":
                    draw.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=fill)
                else:
                    draw.polygon([(int(x0), int(y1)), (int((x0 + x1) // 2), int(y0)), (int(x1), int(y1))], fill=fill)
        images.append(im)
        kinds.append(kind)
    return images, kinds


def generator_draws_objects(generator_config: Any) -> bool:
    """False for generators that cannot draw objects: the lab world (people only) and random tiny models."""
    backend = getattr(generator_config, "backend", None)
    model = str(getattr(generator_config, "model", "") or "")
    return backend != "lab" and model not in ("tiny", "lab")


# ------------------------------------------------------------------------------------------------- lab world


def lab_world_dir(classifier_model: str) -> Path | None:
    """The lab world a classifier belongs to: ``lab`` (the shipped weights) or a ``<world>/clip`` folder."""
    if classifier_model == "lab":
        from generators.lab import WEIGHTS

        return WEIGHTS
    p = Path(classifier_model)
    if p.is_dir() and (p.parent / "world.yaml").is_file() and (p.parent / "janus").exists():
        return p.parent
    return None


def lab_world_config(world: Path | None) -> dict:
    """The world's config: its shipped ``world.yaml``, else the repository's ``configs/lab/world.yaml``."""
    if world is not None and (world / "world.yaml").is_file():
        return load_yaml(world / "world.yaml")
    from generators.resources import configs_dir

    return load_yaml(configs_dir() / "lab" / "world.yaml")


def lab_occupation_pairs(world_cfg: Mapping[str, Any]) -> list[list[str]]:
    """Occupation pairs for the lab world: the standard pairs it knows, then the rest paired by planted P(female).

    Each pair is ordered (more female-planted, less female-planted), like the standard (nurse, doctor).
    """
    specs = world_cfg.get("occupations") or {}
    occ = {name: float((spec or {}).get("p_female", 0.5)) for name, spec in specs.items()}
    pairs = [[a, b] for a, b in STEREOTYPE_PAIRS if a in occ and b in occ]
    used = {o for p in pairs for o in p}
    rest = sorted((o for o in occ if o not in used), key=lambda o: -occ[o])
    while len(rest) >= 2:
        pairs.append([rest.pop(0), rest.pop(-1)])
    return [sorted(p, key=lambda o: -occ[o]) for p in pairs]


def lab_representation_prompts(world_cfg: Mapping[str, Any]) -> list[str]:
    """The lab classifier's own gender prompts (its zero-shot template filled with male, female)."""
    from audit.classify import render_prompt

    spec = (world_cfg.get("classifier") or {}).get("gender") or {}
    template = (spec.get("templates") or ["a photo of a {}"])[0]
    classes = list(spec.get("classes") or ["male", "female"])
    male = "male" if "male" in classes else classes[0]
    female = "female" if "female" in classes else classes[1]
    return [render_prompt(template, male), render_prompt(template, female)]


def lab_labelled(n_per_gender: int, seed: int = 0) -> dict[str, Any]:
    """Lab renders with known labels, balanced over gender x race x occupation.

    Returns:
        ``images`` (PIL), ``labels`` (attribute -> class names per image: gender, race, occupation), ``source``.
    """
    from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch, to_uint8

    rng = np.random.default_rng(seed + 7)
    n = 2 * n_per_gender
    gender = np.repeat(np.arange(len(GENDERS)), n_per_gender)
    race = np.tile(np.arange(len(RACES)), n // len(RACES) + 1)[:n]
    occ = rng.permutation(np.tile(np.arange(len(OCCUPATIONS)), n // len(OCCUPATIONS) + 1)[:n])
    arr = to_uint8(render_batch(n, {"gender": gender, "race": race, "occupation": occ}, rng))
    return {"images": [Image.fromarray(a) for a in arr],
            "labels": {"gender": [GENDERS[i] for i in gender], "race": [RACES[i] for i in race],
                       "occupation": [OCCUPATIONS[i] for i in occ]},
            "source": f"lab-world renders ({n_per_gender} per gender, balanced over skin tone and occupation)"}


def labelled_from_source(source: str, classes: Mapping[str, Sequence[str]], cap: int, faces: Any = None
                         ) -> dict[str, Any]:
    """Labelled images from a folder, manifest or dataset (see :func:`audit.calibrate.load_labelled`).

    At most ``cap`` images per class of each attribute are kept (first ones, in listing order). With ``faces``
    (a face config whose detector is not ``none``) images are cropped as the audit does; images without a face are
    dropped and counted.
    """
    from audit.calibrate import load_labelled

    labelled = load_labelled(source, classes)
    keep, per = [], {}
    for i, labels in enumerate(labelled.labels):
        if any(per.get((a, k), 0) < cap for a, k in labels.items()):
            keep.append(i)
            for a, k in labels.items():
                per[(a, k)] = per.get((a, k), 0) + 1
    images = labelled.load(keep)
    n_no_face = 0
    if faces is not None and getattr(faces, "detector", "none") != "none":
        from audit.faces import detect_and_crop

        results = detect_and_crop(images, faces)
        found = [j for j, r in enumerate(results) if r.face_found]
        n_no_face = len(images) - len(found)
        images = [results[j].crop for j in found]
        keep = [keep[j] for j in found]
    labels = {a: [labelled.classes[a][labelled.labels[i][a]] if a in labelled.labels[i] else None for i in keep]
              for a in classes}
    return {"images": images, "labels": labels, "source": labelled.description, "n_no_face": n_no_face}


# ---------------------------------------------------------------------------------------------- card pieces


def _similarities(classifier, image_emb, texts: Sequence[str]) -> np.ndarray:
    txt = classifier.text_embeddings(list(texts))
    return (image_emb.float() @ txt.T.to(image_emb.device)).cpu().numpy().astype(np.float64)


def representation_block(classifier, images: Sequence[Image.Image], prompts: Sequence[str], alpha: float = 0.05
                         ) -> dict[str, Any]:
    """Representation numbers of one person-free image set (see the module docstring)."""
    from audit.metrics import wilson_interval

    emb = classifier.image_embeddings(list(images))
    sims = _similarities(classifier, emb, prompts)
    rate = preference_rate(sims[:, 0], sims[:, 1])
    n = len(images)
    lo, hi = (float(v) for v in wilson_interval(rate * n, n, alpha))
    soft = float(np.mean(1 / (1 + np.exp(-classifier.logit_scale * (sims[:, 0] - sims[:, 1])))))
    probs = classifier.probabilities_from_embeddings(emb)
    threshold = classifier.config.abstain_threshold
    labelled = {a: (p.max(axis=1) >= threshold) for a, p in probs.items()}
    any_label = np.any(np.stack(list(labelled.values())), axis=0) if labelled else np.zeros(n, bool)
    heads = {}
    for a, p in probs.items():
        dev = head_deviation(p)
        heads[a] = {"classes": list(classifier.heads[a].classes), **dev,
                    "top_class": classifier.heads[a].classes[dev["top_class"]] if dev["top_class"] is not None
                    else None}
    return {
        "n_images": n,
        "prompt_pair": {"prompts": list(prompts), "prefer_first_rate": rate, "prefer_first_ci": [lo, hi],
                        "bias": rate - 0.5, "bias_ci": [lo - 0.5, hi - 0.5], "mean_p_first": soft},
        "person_label_rate": float(any_label.mean()) if n else None,
        "person_label_rate_by_attribute": {a: float(m.mean()) for a, m in labelled.items()},
        "abstain_threshold": threshold,
        "heads": heads,
    }


def association_block(classifier, labelled: Mapping[str, Any], pairs: Sequence[Sequence[str]], template: str,
                      attribute: str, female: str, male: str, alpha: float = 0.05) -> dict[str, Any]:
    """Association gaps of every occupation pair on labelled images (see the module docstring)."""
    from audit.classify import render_prompt

    groups = labelled["labels"].get(attribute)
    if groups is None:
        return {"skipped": f"the labelled images carry no '{attribute}' labels"}
    idx = [i for i, g in enumerate(groups) if g in (female, male)]
    if not idx:
        return {"skipped": f"no labelled image of class '{female}' or '{male}' for attribute '{attribute}'"}
    images = [labelled["images"][i] for i in idx]
    g = np.array([groups[i] for i in idx])
    occ = labelled["labels"].get("occupation")
    occ = np.array([occ[i] for i in idx]) if occ is not None else None
    emb = classifier.image_embeddings(images)
    rows = []
    for a, b in pairs:
        sims = _similarities(classifier, emb, [render_prompt(template, a), render_prompt(template, b)])
        keep = np.ones(len(images), bool) if occ is None else ~np.isin(occ, [a, b])
        choose = (sims[:, 0] > sims[:, 1]) + 0.5 * (sims[:, 0] == sims[:, 1])
        gap = association_gap(choose[keep], g[keep], female, male, alpha)
        soft = 1 / (1 + np.exp(-classifier.logit_scale * (sims[:, 0] - sims[:, 1])))
        sf, sm = soft[keep & (g == female)], soft[keep & (g == male)]
        rows.append({"pair": [a, b], **gap, "n_images": int(keep.sum()),
                     "soft_gap": float(sf.mean() - sm.mean()) if len(sf) and len(sm) else None})
    gaps = [abs(r["gap"]) for r in rows if r["gap"] is not None]
    return {"attribute": attribute, "female_class": female, "male_class": male, "template": template,
            "source": labelled["source"], "pairs": rows, "max_abs_gap": max(gaps) if gaps else None,
            "note": "Images showing either occupation of a pair are left out of it" if occ is not None else None}


def accuracy_from_labelled(classifier, labelled: Mapping[str, Any]) -> dict[str, Any]:
    """Accuracy and confusion of every classifier attribute the labelled images are labelled for."""
    from audit.calibrate import _attribute_metrics

    out = {}
    probs = None
    for name, head in classifier.heads.items():
        labels = labelled["labels"].get(name)
        if labels is None:
            continue
        classes = list(head.classes)
        idx = [i for i, v in enumerate(labels) if v in classes]
        if not idx:
            continue
        if probs is None:
            probs = classifier.classify(labelled["images"])
        truth = np.array([classes.index(labels[i]) for i in idx])
        m = _attribute_metrics(probs[name][idx], truth, classes, classifier.config.abstain_threshold)
        out[name] = {k: m[k] for k in ("classes", "num_images", "accuracy", "balanced_accuracy", "per_class_recall",
                                       "abstain_rate", "confusion")}
    return {"source": labelled["source"], "attributes": out} if out else {}


def accuracy_from_calibration(path: str | Path, classifier) -> dict[str, Any]:
    """Accuracy and confusion from a ``debias calibrate`` record, noting when another classifier made it."""
    from audit.calibrate import FILENAME as CAL_FILE

    p = Path(path)
    p = p / CAL_FILE if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"config key 'metrics.calibration': '{p}' does not exist; create it with `debias calibrate`")
    try:
        record = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config key 'metrics.calibration': '{p}' is not valid JSON: {err}") from None
    attrs = {a: {k: r.get(k) for k in ("classes", "num_images", "accuracy", "balanced_accuracy", "per_class_recall",
                                        "abstain_rate", "confusion")}
             for a, r in (record.get("attributes") or {}).items()}
    same = record.get("classifier") == classifier.identity()
    return {"source": f"calibration '{p}' ({(record.get('dataset') or {}).get('source', '?')})", "attributes": attrs,
            "same_classifier": same,
            "note": None if same else "calibrated with a different classifier identity than this audit's"}


# ------------------------------------------------------------------------------------------------- the card


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    p = p / "calibration.json" if p.is_dir() else p
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


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
        or (config.person_free == "auto" and generator_draws_objects(getattr(generator, "config", None))))
    if config.person_free == "generator" and generator is None:
        raise UserError("config key 'card.person_free': 'generator' needs a generator; audits of an image folder "
                        "have none: use builtin or auto")
    key_obj = {
        "format": VERSION, "classifier": classifier.identity(), "card": to_dict(config), "settings": settings,
        "generator": generator.identity() if use_generator else None, "calibration": _file_digest(calibration),
        "faces": to_dict(faces) if faces is not None else None,
    }
    for k in ("warn_fraction", "warn_floor", "cache_dir"):
        key_obj["card"].pop(k, None)
    key = _hash(key_obj)
    cache_paths = []
    if run_dir is not None:
        cache_paths.append(Path(run_dir) / "stages" / f"card-{key}.json")
    if config.cache_dir:
        cache_paths.append(Path(config.cache_dir) / f"card-{key}.json")
    from audit.store import atomic_write_json

    if key in _MEMO:
        # Sweeps, demos and component swaps audit many runs with one classifier in one process: measure it once.
        card = copy.deepcopy(_MEMO[key])
        for path in cache_paths:
            if not path.is_file():
                atomic_write_json(path, card)
        return card
    for path in cache_paths:
        if path.is_file():
            try:
                card = json.loads(path.read_text())
                if card.get("key") == key:
                    _remember(key, card)
                    return card
            except (OSError, ValueError):
                pass  # a corrupt cache entry is recomputed, never trusted
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
        from audit.compositional import lab_binding_items, load_binding_items

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
        sets["generator"] = _generator_set(classifier, generator, config, prompts, run_dir, faces, progress)
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
        from audit.compositional import binding_check

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
    for path in cache_paths:
        atomic_write_json(path, card)
    _remember(key, card)
    return card


_MEMO: dict[str, dict] = {}
_MEMO_SIZE = 16


def _remember(key: str, card: dict) -> None:
    _MEMO[key] = copy.deepcopy(card)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))


def _generator_set(classifier, generator, config: CardConfig, prompts, run_dir, faces, progress) -> dict[str, Any]:
    """Representation numbers on the generator's own person-free images (stored under ``RUN/card``)."""
    import tempfile

    from audit.sample import sample_to_store
    from audit.store import RunStore

    texts = [config.object_template.format(object=o) for o in config.objects]
    root = Path(run_dir) / "card" if run_dir is not None else Path(tempfile.mkdtemp(prefix="debias-card-"))
    store = RunStore(root)
    keys = sample_to_store(generator, texts, list(range(config.images_per_object)), store, progress=progress)
    records = store.records(keys)
    images = [store.image(r) for r in records]
    n_face = 0
    if faces is not None and getattr(faces, "detector", "none") != "none":
        from audit.faces import detect_and_crop

        found = [r.face_found for r in detect_and_crop(images, faces)]
        n_face = int(sum(found))
        images = [im for im, f in zip(images, found) if not f]
    if not images:
        return {"n_images": 0, "objects": list(config.objects), "n_dropped_with_face": n_face,
                "skipped": "every generated object image had a detected face"}
    return {**representation_block(classifier, images, prompts, config.alpha), "objects": list(config.objects),
            "template": config.object_template, "n_dropped_with_face": n_face}


def card_flags(card: Mapping[str, Any], threshold: float = 0.2) -> list[str]:
    """Findings of the card on its own (before comparing with the audit), as plain sentences."""
    flags = []
    rep = card.get("representation") or {}
    for name, s in (rep.get("sets") or {}).items():
        pp = s.get("prompt_pair") or {}
        b = pp.get("bias")
        if b is not None and abs(b) >= threshold:
            first, second = (pp.get("prompts") or ["first", "second"])[:2]
            pick = first if b > 0 else second
            flags.append(f"On {s['n_images']} {name} images with no person, the classifier prefers “{pick}” "
                         f"{100 * (0.5 + abs(b)):.0f}% of the time (representation bias {b:+.2f}).")
        for a, h in (s.get("heads") or {}).items():
            if h.get("deviation") is not None and h["deviation"] >= threshold:
                flags.append(f"Its {a} head labels {100 * max(h['shares']):.0f}% of the {name} person-free images "
                             f"“{h['top_class']}” (deviation {h['deviation']:.2f} from uniform).")
    assoc = card.get("association") or {}
    for row in assoc.get("pairs") or []:
        if row.get("gap") is not None and abs(row["gap"]) >= threshold:
            a, b = row["pair"]
            flags.append(f"It associates “{a}” (vs “{b}”) with {assoc['female_class']} faces: "
                         f"P({a} | {assoc['female_class']}) − P({a} | {assoc['male_class']}) = {row['gap']:+.2f}.")
    comp = card.get("compositional") or {}
    if comp.get("binds") is False:
        flags.append(f"It behaves like a bag of words: it picks the correctly bound caption over the swapped one "
                     f"{100 * comp['swap']['accuracy']:.0f}% of the time (chance 50%).")
    return flags


def check_card(card: Mapping[str, Any], metrics: Mapping[str, Any], fraction: float = 0.5, floor: float = 0.02,
               labelled_attribute: str = "gender") -> dict[str, Any]:
    """Compare the classifier's own bias with the effect the audit measured (the warning rule).

    Args:
        card: The output of :func:`build_card`.
        metrics: The audit's ``metrics.json`` dict.
        fraction: ``warn_fraction``.
        floor: ``warn_floor``.
        labelled_attribute: The attribute the prompt-pair preference and association gaps are about.

    Returns:
        ``rule`` (text), ``fraction``, ``floor``, ``attributes`` (attribute -> ``classifier_bias``, ``components``,
        ``measured_deviation``, ``warn``) and ``warnings`` (sentences, empty when none).
    """
    from audit.report import joint_parts

    rep = card.get("representation") or {}
    assoc = card.get("association") or {}
    attrs = metrics.get("attributes") or {}
    out: dict[str, Any] = {}
    warnings = []
    for name, a in attrs.items():
        if joint_parts(name, attrs) is not None:
            continue
        comps: dict[str, float] = {}
        if (rep.get("max_head_deviation") or {}).get(name) is not None:
            comps["head deviation on person-free images"] = rep["max_head_deviation"][name]
        if name == labelled_attribute:
            if rep.get("max_abs_bias") is not None:
                comps["|prompt-pair preference| on person-free images"] = rep["max_abs_bias"]
            if assoc.get("max_abs_gap") is not None:
                comps["max |association gap|"] = assoc["max_abs_gap"]
        b = max(comps.values()) if comps else None
        d = measured_deviation(a)
        warn = warn_rule(b, d, fraction, floor)
        out[name] = {"classifier_bias": b, "components": comps, "measured_deviation": d, "warn": warn}
        if warn:
            what = max(comps, key=comps.get)
            warnings.append(
                f"{name}: the classifier's own bias ({what}: {b:.2f}) is at least {fraction:g} × the share deviation "
                f"this audit measured ({'—' if d is None else f'{d:.2f}'}); part of the measured {name} bias (or "
                f"balance) may be the classifier's. Check it with labelled data (debias calibrate) before drawing "
                f"conclusions.")
    return {"rule": f"warn when B >= {fraction:g} x D and B >= {floor:g}; B = classifier's own bias on the attribute "
                    "(largest of its head deviation on person-free images and, for the labelled attribute, "
                    "|prompt-pair preference| and max |association gap|), D = mean over prompts of max_k "
                    "|share_k - target_k| measured by the audit",
            "fraction": fraction, "floor": floor, "attributes": out, "warnings": warnings}


def write_card(run_dir: str | Path, card: Mapping[str, Any], check: Mapping[str, Any] | None = None) -> Path:
    """Write ``RUN/classifier_card.json`` (the card, plus the audit comparison when given), atomically."""
    from audit.store import atomic_write_json

    path = Path(run_dir) / FILENAME
    atomic_write_json(path, {**card, "check": dict(check) if check is not None else None})
    return path


# ------------------------------------------------------------------------------------------------------ report


def saved_sections(run_dir: str | Path) -> list:
    """The card and per-group sections of a finished audit, rebuilt from its files (for re-rendering a report).

    Example: ``write_report_from_run(run, saved_sections(run))``.

    Args:
        run_dir: The run folder (reads ``classifier_card.json`` and the ``groups`` block of ``metrics.json``).

    Returns:
        The sections that exist, card first.
    """
    from audit.groups import groups_section

    run_dir = Path(run_dir)
    sections = []
    card_path = run_dir / FILENAME
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        sections.append(card_section(card, card.get("check")))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        groups = json.loads(metrics_path.read_text()).get("groups")
        if groups:
            sections.append(groups_section(groups))
    return sections


_CARD_HTML = """
{% for w in warnings %}
<p style="border-left:4px solid var(--warn);background:#fbeeee;padding:8px 12px;margin:6px 0">
  <b style="color:var(--warn)">Warning.</b> {{ w }}</p>
{% endfor %}
{% if flags %}<ul>{% for f in flags %}<li>{{ f }}</li>{% endfor %}</ul>{% endif %}
<h3>Representation bias on images with no person</h3>
<table><thead><tr><th>Image set</th><th class="num">Images</th>
  <th class="num">Prefers “{{ prompts[0] }}” over “{{ prompts[1] }}”</th>
  <th class="num">Bias (rate − 0.5)</th><th class="num">Person-label rate ↓</th>
  {% for a in attrs %}<th class="num">{{ a }} head: top share</th>{% endfor %}</tr></thead><tbody>
{% for name, s in sets.items() %}{% set pp = s.prompt_pair %}
<tr><td>{{ name }}{% if s.objects %} (“{{ s.template }}”){% endif %}</td><td class="num">{{ s.n_images }}</td>
  <td class="num">{{ pp.prefer_first_rate | pct if pp else "—" }}
    <span class="ci">{{ pp.prefer_first_ci | ci if pp else "" }}</span></td>
  <td class="num"><b>{{ pp.bias | signed if pp else "—" }}</b></td>
  <td class="num">{{ s.person_label_rate | pct }}</td>
  {% for a in attrs %}{% set h = (s.heads or {}).get(a) %}
  <td class="num">{% if h and h.top_class is not none %}{{ h.top_class }} {{ (h.shares | max) | pct(0) }}
    {%- else %}—{% endif %}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table>
<p class="note">Bias runs from −0.5 to +0.5; 0 means no default preference; positive = prefers the first prompt.
The person-label rate is how often any attribute gets a label above the abstain threshold ({{ threshold }});
with threshold 0 every image is labelled, so person-free images must be kept out by face detection.</p>
<h3>Association bias on labelled faces</h3>
{% if assoc.skipped or not assoc.pairs %}
<p class="note">Not measured: {{ assoc.skipped or "no occupation pairs" }}.</p>
{% else %}
<p class="note">{{ assoc.source }}. Zero-shot choice between “{{ assoc.template | replace("{}", "A") }}” and
“{{ assoc.template | replace("{}", "B") }}”;
gap = P(A | {{ assoc.female_class }}) − P(A | {{ assoc.male_class }}), positive = stereotyped direction, 0 = none.
{%- if assoc.note %} {{ assoc.note }}.{% endif %}</p>
<table><thead><tr><th>A / B</th><th class="num">P(A | {{ assoc.female_class }})</th>
  <th class="num">P(A | {{ assoc.male_class }})</th><th class="num">Gap</th><th class="num">Images</th></tr></thead>
<tbody>
{% for r in assoc.pairs %}
<tr><td>{{ r.pair[0] }} / {{ r.pair[1] }}</td><td class="num">{{ r.p_first.get(assoc.female_class) | num }}</td>
  <td class="num">{{ r.p_first.get(assoc.male_class) | num }}</td>
  <td class="num"><b>{{ r.gap | signed }}</b><span class="ci">{{ r.gap_ci | ci }}</span></td>
  <td class="num">{{ r.n_images }}</td></tr>
{% endfor %}
</tbody></table>
{% endif %}
<h3>Accuracy on labelled data</h3>
{% if acc.skipped or not acc.attributes %}
<p class="note">Not measured: {{ acc.skipped or "no labelled data" }}.</p>
{% else %}
<p class="note">{{ acc.source }}.{% if acc.note %} {{ acc.note }}.{% endif %} Confusion rows: true class;
columns: predicted.</p>
<table><thead><tr><th>Attribute</th><th class="num">Images</th><th class="num">Accuracy ↑</th>
  <th class="num">Balanced accuracy ↑</th><th>Confusion</th></tr></thead><tbody>
{% for a, m in acc.attributes.items() %}
<tr><td>{{ a }}</td><td class="num">{{ m.num_images }}</td><td class="num">{{ m.accuracy | num }}</td>
  <td class="num">{{ m.balanced_accuracy | num }}</td>
  <td><table style="margin:0;width:auto"><tr><td></td>
    {% for c in m.classes %}<td class="small">{{ c }}</td>{% endfor %}</tr>
    {% for row in m.confusion %}<tr><td class="small">{{ m.classes[loop.index0] }}</td>
      {% for v in row or [] %}<td class="num small">{{ v | num(2) }}</td>{% endfor %}</tr>{% endfor %}
  </table></td></tr>
{% endfor %}
</tbody></table>
{% endif %}
<h3>Compositional check (attribute binding)</h3>
{% if comp.skipped or not comp.swap %}
<p class="note">Not run: {{ comp.skipped or "no result" }}.</p>
{% else %}
<p>{{ comp.source }}: prefers the correctly bound caption over the attribute-swapped one
<b>{{ comp.swap.accuracy | pct }}</b> <span class="ci">{{ comp.swap.ci | ci }}</span>
{%- if comp.order %}, over word-order shuffles <b>{{ comp.order.accuracy | pct }}</b>
<span class="ci">{{ comp.order.ci | ci }}</span>{% endif %} (chance 50%). Verdict: <b>{{ comp.verdict }}</b>.</p>
{% if comp.recommendation %}<p class="note">{{ comp.recommendation }}</p>{% endif %}
{% if comp.examples %}
<p class="note">E.g. “{{ comp.examples[0].caption }}” vs “{{ comp.examples[0].swapped }}”.</p>
{% endif %}
{% endif %}
{% if check %}
<h3>Classifier bias vs the measured effect</h3>
<table><thead><tr><th>Attribute</th><th class="num">Classifier bias B</th>
  <th class="num">Measured share deviation D</th><th>Warn</th></tr></thead><tbody>
{% for a, c in check.attributes.items() %}
<tr><td>{{ a }}</td><td class="num">{{ c.classifier_bias | num }}</td>
  <td class="num">{{ c.measured_deviation | num }}</td><td>{{ "yes" if c.warn else "no" }}</td></tr>
{% endfor %}
</tbody></table>
<p class="note">Rule: {{ check.rule }}.</p>
{% endif %}
<p class="note">Card key {{ card.key }} (cached by classifier identity and card settings).</p>
"""


def card_section(card: Mapping[str, Any], check: Mapping[str, Any] | None = None):
    """The report section of the card (warnings first).

    Returns:
        An :class:`audit.report.Section`.
    """
    from audit.report import Section, fmt_ci, fmt_num, fmt_pct, fmt_signed, html_fragment, md_escape

    rep = card.get("representation") or {}
    assoc = card.get("association") or {}
    acc = card.get("accuracy") or {}
    comp = card.get("compositional") or {}
    warnings = (check or {}).get("warnings") or []
    sets = rep.get("sets") or {}
    html = html_fragment(
        _CARD_HTML, warnings=warnings, flags=card.get("flags") or [], sets=sets,
        prompts=rep.get("prompts") or ["?", "?"], attrs=list(rep.get("max_head_deviation") or {}), assoc=assoc,
        acc=acc, comp=comp, check=check, card=card,
        threshold=next(iter(sets.values()), {}).get("abstain_threshold"))
    md = []
    for w in warnings:
        md.append(f"> **Warning.** {md_escape(w)}\n")
    for f in card.get("flags") or []:
        md.append(f"- {md_escape(f)}")
    for name, s in (rep.get("sets") or {}).items():
        pp = s.get("prompt_pair")
        if pp:
            md.append(f"- Representation ({md_escape(name)}, {s['n_images']} images): prefers "
                      f"“{md_escape(pp['prompts'][0])}” {fmt_pct(pp['prefer_first_rate'])} "
                      f"(bias {fmt_signed(pp['bias'])}); person-label rate {fmt_pct(s.get('person_label_rate'))}")
    for r in assoc.get("pairs") or []:
        md.append(f"- Association {md_escape(r['pair'][0])}/{md_escape(r['pair'][1])}: gap {fmt_signed(r['gap'])} "
                  f"{fmt_ci(r['gap_ci'])}")
    for a, m in (acc.get("attributes") or {}).items():
        md.append(f"- Accuracy {md_escape(a)}: {fmt_num(m.get('accuracy'))}")
    if comp.get("swap"):
        md.append(f"- Binding: {fmt_pct(comp['swap']['accuracy'])} vs swapped (chance 50%): {comp['verdict']}")
    return Section(title="Classifier bias card", html=str(html), markdown="\n".join(md), anchor="classifier-card")


__all__ = [
    "CardConfig", "FILENAME", "MAN_WOMAN", "STEREOTYPE_PAIRS", "association_block", "association_gap", "build_card",
    "builtin_person_free", "card_flags", "card_section", "check_card", "head_deviation", "lab_labelled",
    "lab_occupation_pairs", "lab_representation_prompts", "lab_world_dir", "measured_deviation", "preference_rate",
    "representation_bias", "representation_block", "resolve_card_settings", "saved_sections", "validate_card_inputs",
    "warn_rule", "write_card",
]
