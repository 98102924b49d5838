"""The card's images and records: built-in person-free images, the lab world's labelled renders, prompts and
occupation pairs, labelled folders and datasets, and ``debias calibrate`` records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from audit.card.config import BUILTIN_KINDS, STEREOTYPE_PAIRS
from generators.base import GeneratorConfig
from generators.config import UserError, load_yaml

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


def generator_draws_objects(generator_config: GeneratorConfig) -> bool:
    """False for generators that cannot draw objects: the lab world (people only) and random tiny models."""
    return generator_config.backend != "lab" and generator_config.model not in ("tiny", "lab")


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


# --------------------------------------------------------------------------------------------------- labelled data


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
    if faces is not None and faces.detector != "none":
        from audit.faces import detect_and_crop

        results = detect_and_crop(images, faces)
        found = [j for j, r in enumerate(results) if r.face_found]
        n_no_face = len(images) - len(found)
        images = [results[j].crop for j in found]
        keep = [keep[j] for j in found]
    labels = {a: [labelled.classes[a][labelled.labels[i][a]] if a in labelled.labels[i] else None for i in keep]
              for a in classes}
    return {"images": images, "labels": labels, "source": labelled.description, "n_no_face": n_no_face}



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

