"""The card's pure measures: preference, head deviation, association gap, the warning rule and its findings.

Plain numbers in, plain numbers out (no classifier, no images), so each is checked by hand in the tests.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from generators.config import UserError

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
    """The card's warning rule: ``B >= fraction * D`` and ``B >= floor`` (see :mod:`audit.card`).

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
        card: The output of :func:`audit.card.build_card`.
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

