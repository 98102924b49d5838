"""Explicit-prompt adherence: how often a generator draws the group an explicit prompt asks for.

An audit of neutral prompts is only meaningful if the generator can draw each group at all: for every neutral
prompt ``..., a person`` this audits its explicit variants (``..., a female``, ``..., a Black``) and reads, for each,
the share of the requested class. A fix that removes bias by ignoring the prompt shows up here as a drop.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from audit.config import AuditConfig
from audit.prompts import explicit_prompt, groups

ATTRIBUTES = ("gender", "race")


def explicit_variants(config: AuditConfig, attributes=ATTRIBUTES) -> dict[str, tuple[str, str]]:
    """Explicit prompt -> (attribute, class it asks for), for every neutral prompt of ``config``."""
    variants = {}
    for neutral in config.prompts.neutral_prompts():
        for attr in attributes:
            for cls, word in groups(attr).items():
                variants[explicit_prompt(neutral, word, config.prompts.neutral_word)] = (attr, cls)
    return variants


def explicit_adherence(config: AuditConfig, out: str | Path, generator, classifier, images: int,
                       progress: bool = False) -> dict[str, float | None]:
    """Mean share of the requested class over the explicit variants of every neutral prompt, per attribute.

    Args:
        config: The audit whose neutral prompts are varied.
        out: Run folder of the explicit audit (resumes like any audit).
        generator, classifier: Already loaded, shared with the neutral audit.
        images: Images per explicit prompt.
        progress: Progress bars.

    Returns:
        Attribute -> mean adherence in [0, 1] (higher is better), or None when no image showed a face.
    """
    from audit.run import run_audit

    variants = explicit_variants(config)
    cfg = copy.deepcopy(config)
    cfg.prompts.occupations, cfg.prompts.occupations_file = [], None
    cfg.prompts.prompts, cfg.prompts.limit = list(variants), None
    cfg.images_per_prompt = images
    metrics = run_audit(cfg, out, progress=progress, generator=generator, classifier=classifier, report=False)
    per_attr: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for attr in per_attr:
        block = metrics["attributes"][attr]
        for row in block["per_prompt"]:
            want_attr, cls = variants[row["prompt"]]
            if want_attr == attr and row["shares"] is not None:
                per_attr[attr].append(row["shares"][block["classes"].index(cls)])
    return {attr: float(np.mean(v)) if v else None for attr, v in per_attr.items()}
