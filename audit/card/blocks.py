"""The card's blocks: the classifier run on one image set each (person-free images, labelled faces).

Each block returns plain JSON-able numbers for one part of the card; :func:`audit.card.build_card` gathers them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from audit.card.config import CardConfig
from audit.card.measures import association_gap, head_deviation, preference_rate


def _similarities(classifier, image_emb, texts: Sequence[str]) -> np.ndarray:
    txt = classifier.text_embeddings(list(texts))
    return (image_emb.float() @ txt.T.to(image_emb.device)).cpu().numpy().astype(np.float64)


def representation_block(classifier, images: Sequence[Image.Image], prompts: Sequence[str], alpha: float = 0.05
                         ) -> dict[str, Any]:
    """Representation numbers of one person-free image set (see :mod:`audit.card`)."""
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
    """Association gaps of every occupation pair on labelled images (see :mod:`audit.card`)."""
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


def generator_block(classifier, generator, config: CardConfig, prompts: Sequence[str], run_dir: str | Path | None,
                    faces: Any, progress: bool) -> dict[str, Any]:
    """Representation numbers on the generator's own person-free images (stored under ``RUN/card``)."""
    from audit.sample import sample_to_store
    from audit.store import RunStore

    texts = [config.object_template.format(object=o) for o in config.objects]
    root = Path(run_dir) / "card" if run_dir is not None else Path(tempfile.mkdtemp(prefix="debias-card-"))
    store = RunStore(root)
    keys = sample_to_store(generator, texts, list(range(config.images_per_object)), store, progress=progress)
    records = store.records(keys)
    images = [store.image(r) for r in records]
    n_face = 0
    if faces is not None and faces.detector != "none":
        from audit.faces import detect_and_crop

        found = [r.face_found for r in detect_and_crop(images, faces)]
        n_face = int(sum(found))
        images = [im for im, f in zip(images, found) if not f]
    if not images:
        return {"n_images": 0, "objects": list(config.objects), "n_dropped_with_face": n_face,
                "skipped": "every generated object image had a detected face"}
    return {**representation_block(classifier, images, prompts, config.alpha), "objects": list(config.objects),
            "template": config.object_template, "n_dropped_with_face": n_face}

