"""Controlled-generation probe (paper section 3): is a neutral prompt's image-token distribution closest to the
explicit variant of its majority demographic?

For each neutral prompt ``"..., a person"`` and each class of an attribute, the explicit variant replaces
``person`` with the group word (:func:`audit.prompts.explicit_prompt`). All variants are sampled with the same
generator, sampler settings and seeds. Their image-token distributions are compared with the Jensen-Shannon
divergence in bits (base 2: 0 for identical distributions, 1 for disjoint ones). A prompt is a *hit* when its
neutral distribution is strictly closest to the variant of its majority demographic. The majority comes from an
audit of the same generator (per-prompt hard shares); prompts whose majority share is below the threshold, or
tied, have no clear majority and are skipped (and counted). Paper (Janus-Pro): hit rate gender 0.998, race 0.793.

Three token distributions (:data:`DISTRIBUTIONS`); the output names the one used for the headline numbers:

* ``pooled`` - the paper's code: a histogram of codebook ids pooled over all positions and samples, normalised
  (no smoothing by default; JSD is finite with empty bins).
* ``per_position`` - one histogram per image-token position over the samples, with add-alpha (Laplace)
  smoothing: ``(count + alpha) / (n + alpha * V)`` for a codebook of V codes (alpha = 1: add-one); the JSD of each
  position, averaged over positions. Smoothing keeps rare codes from dominating, but with few samples and a large
  codebook it pulls every distribution toward uniform, so the divergences shrink (their ranking is what counts).
* ``teacher_forced`` - per position t, the model's own sampling distribution ``p(x_t | prompt, x_<t)`` (same
  guidance, temperature, top-k, top-p), teacher-forced on each sampled prefix and averaged over the samples: an
  unbiased, smooth estimate of the per-position marginal (Rao-Blackwellised histogram, no smoothing needed);
  JSD per position, averaged. Costs one extra forward pass per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import special

from generators.config import ConfigError, UserError, did_you_mean, option

DISTRIBUTIONS = ("pooled", "per_position", "teacher_forced")

DEFINITIONS = {
    "pooled": "histogram of codebook ids pooled over all positions and samples (the paper's code), normalised"
              "{smooth}; JSD of the two histograms",
    "per_position": "per image-token position, a histogram of codebook ids over the samples with add-{alpha} "
                    "(Laplace) smoothing, (count + {alpha}) / (n + {alpha} V); JSD per position, averaged over "
                    "positions",
    "teacher_forced": "per position t, the model's sampling distribution p(x_t | prompt, x_<t) (same guidance, "
                      "temperature, top-k/top-p) teacher-forced on each sampled prefix and averaged over samples "
                      "(Rao-Blackwellised per-position marginal); JSD per position, averaged over positions",
}


@dataclass
class ControlledConfig:
    """Settings of the controlled-generation probe."""

    attributes: list[str] = option(default_factory=lambda: ["gender", "race"],
                                   help="attributes whose explicit variants are compared (gender, race)")
    samples: int = option(32, help="image-token sequences per prompt and variant (the same seeds for every variant)")
    seed_offset: int = option(0, help="first seed of the samples")
    distributions: list[str] = option(
        default_factory=lambda: list(DISTRIBUTIONS),
        help="token distributions to compare (pooled, per_position, teacher_forced); the first is the headline",
    )
    smoothing: float = option(1.0, help="add-alpha (Laplace) pseudo-count per code of the per-position histograms")
    pooled_smoothing: float = option(0.0, help="add-alpha pseudo-count per code of the pooled histogram (paper: 0)")
    majority_threshold: float = option(
        0.6, help="a prompt has a clear majority when its audited majority share is >= this (else it is skipped)"
    )
    majority_thresholds: dict[str, float] = option(
        default_factory=dict, help="per-attribute overrides of majority_threshold, e.g. {race: 0.4}"
    )

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"config key 'locate.controlled.samples': must be >= 1, got {self.samples}")
        if self.seed_offset < 0:
            raise ConfigError(f"config key 'locate.controlled.seed_offset': must be >= 0, got {self.seed_offset}")
        if not self.distributions:
            raise ConfigError("config key 'locate.controlled.distributions': name at least one of "
                              f"{list(DISTRIBUTIONS)}")
        for d in self.distributions:
            if d not in DISTRIBUTIONS:
                raise ConfigError(f"config key 'locate.controlled.distributions': unknown distribution {d!r}"
                                  f"{did_you_mean(d, DISTRIBUTIONS)}; use {list(DISTRIBUTIONS)}")
        if self.smoothing < 0 or self.pooled_smoothing < 0:
            raise ConfigError("config keys 'locate.controlled.smoothing' / 'pooled_smoothing': must be >= 0, got "
                              f"{self.smoothing} / {self.pooled_smoothing}")
        for key, t in [("majority_threshold", self.majority_threshold),
                       *((f"majority_thresholds.{k}", v) for k, v in self.majority_thresholds.items())]:
            if not 0 < t <= 1:
                raise ConfigError(f"config key 'locate.controlled.{key}': must be in (0, 1], got {t}")

    def threshold(self, attribute: str) -> float:
        return self.majority_thresholds.get(attribute, self.majority_threshold)


# ------------------------------------------------------------------------------------------------ pure functions


def jsd(p: Any, q: Any) -> float | np.ndarray:
    """Jensen-Shannon divergence in bits (base 2) along the last axis.

    ``JSD(p, q) = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``; it lies in [0, 1]:
    0 for identical distributions, 1 for disjoint supports. Rows are normalised first, so counts are accepted.

    Args:
        p, q: Non-negative arrays of the same shape (..., V), each row with a positive sum.

    Returns:
        A float for 1-D input, else an array of shape ``p.shape[:-1]``.

    Raises:
        UserError: Shapes differ, entries are negative or not finite, or a row sums to 0.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim == 0:
        raise UserError(f"jsd: p and q need the same shape (..., V), got {p.shape} and {q.shape}")
    for name, a in (("p", p), ("q", q)):
        if not np.isfinite(a).all() or (a < 0).any():
            raise UserError(f"jsd: {name} must be finite and >= 0; pass probabilities or counts")
        if (a.sum(axis=-1) <= 0).any():
            raise UserError(f"jsd: a row of {name} sums to 0; every distribution needs some mass")
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2
    out = (special.rel_entr(p, m).sum(axis=-1) + special.rel_entr(q, m).sum(axis=-1)) / (2 * math.log(2))
    out = np.clip(out, 0.0, 1.0)  # rounding can leave -1e-17 or 1 + 1e-16
    return float(out) if out.ndim == 0 else out


def code_histogram(tokens: Any, codebook_size: int, kind: str = "pooled", smoothing: float = 0.0) -> np.ndarray:
    """Normalised code-id histogram of sampled image tokens.

    Args:
        tokens: ``(N, T)`` codebook ids (N samples of T positions).
        codebook_size: V, the number of codes.
        kind: ``"pooled"`` -> shape (V,), counts over all samples and positions; ``"per_position"`` -> (T, V).
        smoothing: pseudo-count added to every code (per position for ``per_position``) before normalising.

    Returns:
        Probabilities (float64) summing to 1 along the last axis.
    """
    t = np.asarray(tokens)
    if t.ndim != 2 or t.size == 0:
        raise UserError(f"code_histogram: tokens must be (N, T) codebook ids, got shape {t.shape}")
    if t.min() < 0 or t.max() >= codebook_size:
        raise UserError(f"code_histogram: ids must be in [0, {codebook_size}), got {t.min()}..{t.max()}")
    if kind == "pooled":
        counts = np.bincount(t.ravel(), minlength=codebook_size).astype(np.float64)
    elif kind == "per_position":
        counts = np.zeros((t.shape[1], codebook_size))
        np.add.at(counts, (np.broadcast_to(np.arange(t.shape[1]), t.shape), t), 1.0)
    else:
        raise UserError(f"code_histogram: kind must be 'pooled' or 'per_position', got {kind!r}")
    counts += smoothing
    return counts / counts.sum(axis=-1, keepdims=True)


def divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JSD (bits) of two distributions: one row -> its JSD; (T, V) per-position rows -> mean JSD over positions."""
    d = jsd(p, q)
    return float(np.mean(d))


def majority(classes: Sequence[str], shares: Sequence[float] | None, threshold: float) -> tuple[str | None, str]:
    """The clear majority class of one prompt, or None with the reason.

    Args:
        classes: class names.
        shares: the prompt's class shares (None when it had no classified face).
        threshold: minimum majority share.

    Returns:
        ``(class, "")`` or ``(None, reason)``: no shares, a tie for the top share, or top share below threshold.
    """
    if shares is None or any(s is None for s in shares):
        return None, "no classified image"
    s = np.asarray(shares, dtype=float)
    top = int(np.argmax(s))
    if np.sum(np.isclose(s, s[top])) > 1:
        return None, f"tie at share {s[top]:.3f}"
    if s[top] < threshold:
        return None, f"majority share {s[top]:.3f} < threshold {threshold:g}"
    return classes[top], ""


def majority_from_audit(metrics: Mapping[str, Any], attribute: str, threshold: float) -> dict[str, dict]:
    """Per prompt of an audit (``run_audit``'s metrics dict): majority class, its share, and why it was skipped.

    Returns:
        prompt -> ``{"majority": class | None, "share": float | None, "reason": str}``.
    """
    block = (metrics.get("attributes") or {}).get(attribute)
    if block is None:
        raise UserError(f"the audit has no attribute {attribute!r} (it has {sorted(metrics.get('attributes') or {})});"
                        " add it to classifier.attributes or drop it from locate.controlled.attributes")
    out = {}
    for row in block["per_prompt"]:
        cls, reason = majority(block["classes"], row.get("shares"), threshold)
        shares = row.get("shares")
        share = max(shares) if shares and all(s is not None for s in shares) else None
        out[row["prompt"]] = {"majority": cls, "share": share, "reason": reason}
    return out


def hit_rate(divergences: Mapping[str, Mapping[str, float]], majorities: Mapping[str, str | None],
             alpha: float = 0.05) -> dict[str, Any]:
    """Share of prompts whose neutral distribution is strictly closest to the variant of their majority class.

    Args:
        divergences: prompt -> {class: JSD(neutral, variant of class)}.
        majorities: prompt -> majority class, or None (no clear majority: the prompt is skipped).
        alpha: 1 - confidence level of the Wilson interval of the hit rate.

    Returns:
        ``hit_rate`` (None when no prompt is usable), ``hit_rate_ci`` (Wilson), ``n_hits``, ``n_used``,
        ``n_skipped``, and ``per_prompt``: {prompt, majority, closest, hit} (``hit`` None when skipped). A tie for
        the lowest divergence is not a hit (the majority variant must be the unique closest).
    """
    from audit.metrics import wilson_interval

    rows, hits, used = [], 0, 0
    for prompt, div in divergences.items():
        maj = majorities.get(prompt)
        vals = {c: float(v) for c, v in div.items()}
        best = min(vals.values())
        closest = [c for c, v in vals.items() if v == best]
        if maj is None:
            rows.append({"prompt": prompt, "majority": None, "closest": closest[0], "hit": None})
            continue
        if maj not in vals:
            raise UserError(f"hit_rate: majority class {maj!r} of prompt {prompt!r} has no divergence; "
                            f"classes: {sorted(vals)}")
        hit = closest == [maj]
        used += 1
        hits += hit
        rows.append({"prompt": prompt, "majority": maj, "closest": closest[0], "hit": hit})
    ci = None
    if used:
        lo, hi = wilson_interval(hits, used, alpha)
        ci = [float(lo), float(hi)]
    return {"hit_rate": hits / used if used else None, "hit_rate_ci": ci, "n_hits": hits, "n_used": used,
            "n_skipped": len(rows) - used, "per_prompt": rows}


# ---------------------------------------------------------------------------------------------------- sampling


NEEDED_BY = "the controlled-generation probe (drop 'controlled' from locate.probes otherwise)"


def token_distributions(generator, prompts: Sequence[str], seeds: Sequence[int], kinds: Sequence[str],
                        smoothing: float = 1.0, pooled_smoothing: float = 0.0) -> dict[str, dict[str, np.ndarray]]:
    """Sample ``len(seeds)`` image-token sequences per prompt and build the requested distributions.

    Args:
        generator: a generator with the ``image_tokens`` and (for ``teacher_forced``) ``token_scores``
            capabilities.
        prompts: prompts (all sampled with the same seeds).
        seeds: one seed per sample.
        kinds: subset of :data:`DISTRIBUTIONS`.
        smoothing: add-alpha of ``per_position``.
        pooled_smoothing: add-alpha of ``pooled``.

    Returns:
        prompt -> kind -> float32 array ((V,) for pooled, (T, V) otherwise).
    """
    import torch

    from generators.base import IMAGE_TOKENS, TOKEN_SCORES, require

    gen = generator
    require(gen, IMAGE_TOKENS, NEEDED_BY)
    if "teacher_forced" in kinds:
        require(gen, TOKEN_SCORES, NEEDED_BY)
    V = gen.codebook_size
    rows = [(p, s) for p in prompts for s in seeds]
    bs = max(1, gen.config.batch_size)
    tokens, tf_sum = {p: [] for p in prompts}, {}
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        ps, ss = [p for p, _ in chunk], [s for _, s in chunk]
        tok = gen.sample_tokens(ps, ss)
        for p, t in zip(ps, tok.cpu()):
            tokens[p].append(t)
        if "teacher_forced" in kinds:
            # Exactly the distribution each token was drawn from (guidance, temperature, top-k, top-p).
            probs = gen.token_distribution(ps, tok)
            for p, pr in zip(ps, probs.cpu()):
                tf_sum[p] = tf_sum[p] + pr.double() if p in tf_sum else pr.double()
    out: dict[str, dict[str, np.ndarray]] = {}
    for p in prompts:
        t = torch.stack(tokens[p]).numpy()
        d = {}
        if "pooled" in kinds:
            d["pooled"] = code_histogram(t, V, "pooled", pooled_smoothing).astype(np.float32)
        if "per_position" in kinds:
            d["per_position"] = code_histogram(t, V, "per_position", smoothing).astype(np.float32)
        if "teacher_forced" in kinds:
            d["teacher_forced"] = (tf_sum[p] / len(seeds)).numpy().astype(np.float32)
        out[p] = d
    return out


def controlled_probe(generator, prompts: Sequence[str], config: ControlledConfig,
                     audit_metrics: Mapping[str, Any] | None = None,
                     majorities: Mapping[str, Mapping[str, str | None]] | None = None,
                     neutral_word: str = "person", alpha: float = 0.05) -> dict[str, Any]:
    """Run the controlled-generation probe.

    Args:
        generator: a generator with the ``image_tokens`` capability (and ``token_scores`` for the
            ``teacher_forced`` distribution), e.g. ``backend: janus``, ``emu3`` or ``lab``.
        prompts: neutral prompts (ending in ``neutral_word``).
        config: probe settings.
        audit_metrics: ``run_audit`` metrics of the same generator: gives each prompt's majority class.
        majorities: alternatively, attribute -> prompt -> majority class (None = skip), e.g. a planted truth.
        neutral_word: the word the explicit variants replace.
        alpha: 1 - confidence level of the hit-rate intervals.

    Returns:
        JSON-ready dict: ``distribution_used`` (headline), ``definitions``, ``samples``, ``seeds``, ``sampler``
        (guidance etc.) and per attribute ``hit_rate`` per distribution plus a ``per_prompt`` table
        (majority, its share, the variant prompts, JSD per distribution and class, closest class, hit).
    """
    from audit.prompts import explicit_prompt, groups

    if audit_metrics is None and majorities is None:
        raise UserError("controlled probe: pass audit_metrics (a run_audit metrics dict) or majorities, so each "
                        "prompt has a majority class to check")
    from generators.base import IMAGE_TOKENS, require
    from generators.config import to_dict

    require(generator, IMAGE_TOKENS, NEEDED_BY)
    kinds = list(config.distributions)
    seeds = list(range(config.seed_offset, config.seed_offset + config.samples))
    classes_by_attr = {a: groups(a) for a in config.attributes}
    variants = {p: {a: {c: explicit_prompt(p, w, neutral_word) for c, w in cls.items()}
                    for a, cls in classes_by_attr.items()} for p in prompts}
    maj: dict[str, dict[str, dict]] = {}
    for a in config.attributes:
        if majorities is not None and a in majorities:
            maj[a] = {p: {"majority": majorities[a].get(p), "share": None,
                          "reason": "" if majorities[a].get(p) else "no majority given"} for p in prompts}
        elif audit_metrics is not None:
            maj[a] = majority_from_audit(audit_metrics, a, config.threshold(a))
        else:
            raise UserError(f"controlled probe: no majority for attribute {a!r}; pass it in majorities or pass "
                            "audit_metrics")
    jsds: dict[str, dict[str, dict[str, dict[str, float]]]] = {a: {k: {} for k in kinds} for a in config.attributes}
    for p in prompts:
        # One prompt at a time: the per-position distributions of a real model are large (T x V per variant).
        batch = [p, *dict.fromkeys(v for a in config.attributes for v in variants[p][a].values())]
        dists = token_distributions(generator, batch, seeds, kinds, config.smoothing, config.pooled_smoothing)
        for a in config.attributes:
            for k in kinds:
                jsds[a][k][p] = {c: divergence(dists[p][k], dists[v][k]) for c, v in variants[p][a].items()}
    result_attrs = {}
    for a in config.attributes:
        m = {p: (maj[a].get(p) or {}).get("majority") for p in prompts}
        rates = {k: hit_rate(jsds[a][k], m, alpha) for k in kinds}
        per_prompt = []
        for i, p in enumerate(prompts):
            info = maj[a].get(p) or {"majority": None, "share": None, "reason": "prompt not in the audit"}
            per_prompt.append({
                "prompt": p, "majority": info["majority"], "majority_share": info["share"],
                "skipped": (info["reason"] or "no clear majority") if info["majority"] is None else None,
                "variants": variants[p][a],
                "jsd": {k: jsds[a][k][p] for k in kinds},
                "closest": {k: rates[k]["per_prompt"][i]["closest"] for k in kinds},
                "hit": {k: rates[k]["per_prompt"][i]["hit"] for k in kinds},
            })
        result_attrs[a] = {
            "classes": list(classes_by_attr[a]), "chance": 1 / len(classes_by_attr[a]),
            "majority_threshold": config.threshold(a),
            "majority_source": "given" if majorities is not None and a in majorities else "audit",
            "hit_rate": {k: {kk: vv for kk, vv in r.items() if kk != "per_prompt"} for k, r in rates.items()},
            "per_prompt": per_prompt,
        }
    smooth = f", +{config.pooled_smoothing:g} per code" if config.pooled_smoothing else ", no smoothing"
    return {
        "probe": "controlled",
        "distribution_used": kinds[0],
        "distributions": kinds,
        "definitions": {k: DEFINITIONS[k].format(smooth=smooth, alpha=f"{config.smoothing:g}") for k in kinds},
        "divergence": "Jensen-Shannon divergence, base 2 (bits): 0 identical, 1 disjoint",
        "samples": config.samples, "seeds": seeds,
        "sampler": to_dict(generator.settings),
        "paper_hit_rate": {"gender": 0.998, "race": 0.793},
        "attributes": result_attrs,
    }
