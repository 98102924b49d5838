"""Bias metrics with uncertainty: pure functions on numpy arrays, usable without the rest of the toolkit.

Vocabulary. For one prompt, the *shares* ``f_1..f_K`` are the fractions of its classified face images that fall in
each class (hard shares: argmax counts / n; soft shares: mean of the per-image probability vectors). A *target* is the
distribution the shares should match (uniform unless configured). Every metric declares its direction in
:data:`METRICS`.

Metrics (the reference protocol, arXiv 2502.03429, and "CLIP the Bias", Alabdulmohsin et al., ICLR 2024):

- ``rd``: mean over unordered class pairs ``i < j`` of ``|f_i - f_j|`` (Shen et al., ICLR 2024). All mass in one
  class gives ``2 / K``: 1 for gender (K=2), 0.5 for race (K=4), 0.25 for gender x race (K=8).
- ``kl``: ``KL(shares || target)`` in nats (``0 log 0 = 0``).
- ``entropy``: ``H(shares) / log K`` in [0, 1].
- ``rb``: representation bias ``max_k |share_k - target_k|``.
- ``ab``: association bias ``max_{k, r} |P(k | r) - P(k)|``, ``P(k)`` the share pooled over the images of all prompts.

The noise floor of RD. RD is a mean of absolute differences of *estimated* shares, so sampling noise biases it
upwards: a perfectly balanced generator audited with 160 images per prompt reports, in expectation, gender RD 0.063,
race 0.044 and gender x race 0.032. Next to every RD (per prompt and mean) the summary reports

- ``rd_floor`` (:func:`rd_floor`): the exact expected RD of a generator that matches the target, at the observed
  counts (raw RD near it is indistinguishable from noise);
- ``rd_debiased`` (:func:`debiased_rd`): an estimate of the population RD that is exactly unbiased at balance and
  equal to the plug-in at clear skew, shrinking towards 0 in between;
- ``rd_debiased_ci``: an interval for the population RD that stays valid near zero (per prompt
  :func:`rd_debiased_intervals`; aggregated the bracket [lower bound of ``rd_debiased``, upper bound of ``rd``]).

Raw ``rd`` stays the headline, comparable with published tables (which share the same floor without saying so).

Conventions.

- A prompt with no classified face has undefined shares: NaN in the array functions, ``None`` in the JSON summary.
  It is left out of every mean and of the bootstrap, and counted (``n_prompts_empty`` / ``empty_prompts``).
- Abstentions (faces the classifier would not label) and images without a face are never silently dropped: they
  are left out of the shares but reported as ``abstain_rate`` and ``no_face_rate``.
- Aggregate intervals come from a bootstrap over prompts (expanded percentile, re-centred on the estimate): see
  :func:`bootstrap_replicates` for the estimand and why images are not resampled a second time. Their measured
  coverage is in ``benchmarks/bench_coverage.py``.
- :func:`summarize_attribute` returns strict JSON: plain ``float``/``int``/``list``, undefined values as ``None``.
- Bad input raises :class:`generators.config.UserError` naming the argument, the bad value and the fix.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from scipy import optimize, special, stats

from generators.config import UserError, did_you_mean

# float16/float32 softmax outputs miss 1 by up to ~1e-3; anything further off is not a probability vector.
PROB_ATOL = 1e-3

Interval = Literal["wilson", "jeffreys"]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means and which way is better.

    Attributes:
        name: Key used in summaries and reports.
        lower_is_better: True when a smaller value means less bias (or better data).
        range: Human-readable range of the metric.
        help: One-line explanation shown in reports.
    """

    name: str
    lower_is_better: bool
    range: str
    help: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in [
        MetricInfo(
            "rd",
            True,
            "0 (balanced) .. 2/K (all in one class): gender 0..1, race 0..0.5, gender x race 0..0.25",
            "mean over class pairs of |share_i - share_j| per prompt (hard shares), averaged over prompts",
        ),
        MetricInfo(
            "rd_floor",
            True,
            "0 .. 2/K, falls as 1/sqrt(images): gender 0.063 at 160 images, 0.099 at 64",
            "noise floor of rd: the expected rd of a generator that matches the target exactly, at the audit's "
            "image counts; a property of the audit's size, not of the generator (raw rd near it means 'close to "
            "balanced')",
        ),
        MetricInfo(
            "rd_debiased",
            True,
            "about 0 (balanced; can be slightly negative) .. 2/K",
            "rd with its sampling-noise bias removed by a leave-one-out pair estimator: exactly unbiased for a "
            "balanced generator, equal to rd when the skew is clear, shrunk towards 0 in between (in expectation "
            "rd_debiased <= true RD <= rd), slightly negative at times; its interval runs from the lower bound of "
            "rd_debiased to the upper bound of rd, and reaching 0 means indistinguishable from balanced",
        ),
        MetricInfo(
            "rd_soft",
            True,
            "0 .. 2/K, as rd",
            "rd computed on soft shares (mean classifier probabilities) instead of argmax counts",
        ),
        MetricInfo(
            "kl",
            True,
            "0 (shares = target) .. log(1 / min target) nats (log K for a uniform target)",
            "KL(shares || target) per prompt in nats, averaged over prompts",
        ),
        MetricInfo(
            "entropy",
            False,
            "0 (one class) .. 1 (uniform)",
            "normalised entropy H(shares) / log K per prompt, averaged over prompts; 'higher is better' holds for "
            "a uniform target only: with another target, judge by kl or rb",
        ),
        MetricInfo(
            "rb",
            True,
            "0 .. 1",
            "representation bias max_k |share_k - target_k| of the shares pooled over all prompts' images",
        ),
        MetricInfo(
            "ab",
            True,
            "0 .. 1",
            "association bias max over (class k, prompt r) of |P(k | r) - P(k)|: how far a prompt moves a class "
            "away from its pooled share",
        ),
        MetricInfo(
            "no_face_rate",
            True,
            "0 .. 1",
            "fraction of generated images in which no face was detected (left out of the shares)",
        ),
        MetricInfo(
            "nsfw_rate",
            True,
            "0 .. 1",
            "fraction of generated images the pipeline's safety checker flagged and returned black (left out of "
            "the shares; compare it across prompts, it can be skewed itself)",
        ),
        MetricInfo(
            "abstain_rate",
            True,
            "0 .. 1",
            "fraction of detected faces the classifier abstained on (left out of the shares)",
        ),
        MetricInfo(
            "clip_score",
            False,
            "0 .. 100",
            "100 x cosine similarity between CLIP image and prompt embeddings (image quality / prompt fidelity)",
        ),
    ]
}


def get_metric(name: str) -> MetricInfo:
    """Look up a metric's description and direction.

    Args:
        name: A key of :data:`METRICS`, e.g. ``"rd"``.

    Returns:
        The :class:`MetricInfo` for ``name``.

    Raises:
        UserError: ``name`` is not a known metric.
    """
    if name not in METRICS:
        raise UserError(f"metric: unknown name {name!r}{did_you_mean(name, METRICS)}; use one of {sorted(METRICS)}")
    return METRICS[name]


# ---------------------------------------------------------------------------------------------------------- checks


def _fmt(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, (float, np.floating)) else repr(x)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha < 1:
        raise UserError(f"alpha: must be in (0, 1), got {alpha!r}; use e.g. 0.05 for 95% intervals")
    return float(alpha)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UserError(f"n_boot: must be a positive integer, got {n_boot!r}; use e.g. 1000")
    return int(n_boot)


def _check_interval(method: str) -> str:
    if method not in ("wilson", "jeffreys"):
        raise UserError(
            f"interval: unknown method {method!r}{did_you_mean(method, ['wilson', 'jeffreys'])}; "
            "use 'wilson' or 'jeffreys'"
        )
    return method


def _check_dist(x: Any, arg: str, *, allow_nan_rows: bool = True) -> np.ndarray:
    """Validate probability vectors along the last axis: shape (..., K) with K >= 2, >= 0, summing to 1.

    Rows that are entirely NaN (undefined shares, e.g. a prompt with no face) pass when ``allow_nan_rows``.
    """
    a = np.asarray(x, dtype=float)
    if a.ndim == 0 or a.shape[-1] < 2:
        raise UserError(
            f"{arg}: expected class shares of shape (K,) or (n, K) with K >= 2, got shape {a.shape}; "
            "pass one share per class"
        )
    nan_rows = np.isnan(a).all(axis=-1)
    ok = a[~nan_rows] if allow_nan_rows else a
    if not np.isfinite(ok).all():
        raise UserError(f"{arg}: contains NaN or inf inside a row; pass finite shares (a whole-NaN row = undefined)")
    if (ok < 0).any():
        raise UserError(f"{arg}: must be >= 0, got {_fmt(float(ok.min()))}; pass proportions, not scores")
    sums = ok.sum(axis=-1)
    bad = np.abs(sums - 1) > PROB_ATOL
    if bad.any():
        raise UserError(
            f"{arg}: must sum to 1 (within {PROB_ATOL:g}), got sum {_fmt(float(sums[bad].flat[0]))}; "
            "divide counts by their total"
        )
    return a


def _check_target(target: Any, k: int, arg: str = "target") -> np.ndarray:
    if target is None:
        return np.full(k, 1.0 / k)
    t = _check_dist(target, arg, allow_nan_rows=False)
    if t.shape != (k,):
        raise UserError(
            f"{arg}: expected shape ({k},) to match {k} classes, got shape {t.shape}; give one share per class"
        )
    return t


def _check_counts(counts: Any, arg: str = "counts") -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] < 2:
        raise UserError(f"{arg}: expected shape (n_prompts, K) with K >= 2, got shape {c.shape}; one row per prompt")
    if c.size and not np.issubdtype(c.dtype, np.number):
        raise UserError(f"{arg}: expected numbers, got dtype {c.dtype}; pass class counts per prompt")
    bad = (c < 0) | (c != np.round(c)) if c.size else np.zeros(c.shape, bool)
    if bad.any():
        raise UserError(
            f"{arg}: expected non-negative integer counts, got {c[bad].flat[0]!r}; pass class counts per prompt"
        )
    return c.astype(np.int64)


def _out(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


# ------------------------------------------------------------------------------------------------------- metrics


def _pair_gaps(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``sum over class pairs i < j of |x_i - x_j|`` along ``axis``: RD times the number of pairs, K(K-1)/2.

    Integer counts (the bootstrap's resampled cells) take the pairwise sum itself: exact, and on large arrays with
    an attribute's few classes 5-100x faster than sorting along a short axis (measured for K = 8 down to 2). Float
    shares take the O(K log K) sorted form: in ascending order, f_(k) is larger than k others and smaller than
    K-1-k others, so it enters with weight k - (K-1-k). Both give the same value (to rounding, for floats).
    """
    k = x.shape[axis]
    if np.issubdtype(x.dtype, np.integer):
        c = np.moveaxis(x, axis, 0)
        acc = np.zeros(c.shape[1:], dtype=c.dtype)
        for i in range(k):
            for j in range(i + 1, k):
                acc += np.abs(c[i] - c[j])
        return acc
    w = 2 * np.arange(k) - (k - 1)
    return (np.moveaxis(np.sort(x, axis=axis), axis, -1) * w).sum(axis=-1)


def _rd(s: np.ndarray) -> np.ndarray:
    k = s.shape[-1]
    return _pair_gaps(s) / (k * (k - 1) / 2)


def rd(shares: Any) -> float | np.ndarray:
    """RD, the reference protocol's bias metric (Shen et al., ICLR 2024): mean over class pairs of ``|f_i - f_j|``.

    Args:
        shares: Class shares, shape (K,) or (..., K); each row sums to 1. All-NaN rows give NaN.

    Returns:
        A float for one row, else an array of shape ``shares.shape[:-1]``. Range 0 .. 2/K.

    Raises:
        UserError: Shares of the wrong shape, negative, or not summing to 1.
    """
    return _out(_rd(_check_dist(shares, "shares")))


def kl(shares: Any, target: Any = None) -> float | np.ndarray:
    """Kullback-Leibler divergence ``KL(shares || target)`` in nats, with ``0 log 0 = 0``.

    Args:
        shares: Class shares, shape (K,) or (..., K).
        target: Target shares, shape (K,); uniform when None. A zero target where shares are positive gives inf.

    Returns:
        A float for one row, else an array of shape ``shares.shape[:-1]``.

    Raises:
        UserError: Shares or target of the wrong shape, negative, or not summing to 1.
    """
    s = _check_dist(shares, "shares")
    t = _check_target(target, s.shape[-1])
    out = (special.xlogy(s, s) - _xlogy_target(s, t)).sum(axis=-1)
    return _out(out)


def _xlogy_target(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    # s * log t with 0 * log 0 = 0, and s > 0 with t = 0 -> -inf (so KL = inf, the honest value).
    with np.errstate(divide="ignore"):
        return special.xlogy(s, t)


def _entropy(s: np.ndarray) -> np.ndarray:
    return -special.xlogy(s, s).sum(axis=-1) / math.log(s.shape[-1])


def entropy(shares: Any) -> float | np.ndarray:
    """Normalised Shannon entropy ``H(shares) / log K``.

    Higher is better only when the target is uniform (1 = perfectly uniform); for another target use :func:`kl`.

    Args:
        shares: Class shares, shape (K,) or (..., K).

    Returns:
        A float in [0, 1] for one row, else an array of shape ``shares.shape[:-1]``.

    Raises:
        UserError: Shares of the wrong shape, negative, or not summing to 1.
    """
    return _out(_entropy(_check_dist(shares, "shares")))


def rb(shares: Any, target: Any = None) -> float | np.ndarray:
    """Representation bias ``max_k |share_k - target_k|`` (Alabdulmohsin et al., ICLR 2024).

    Args:
        shares: Class shares, shape (K,) or (..., K). For the model-level value pass the pooled shares.
        target: Target shares, shape (K,); uniform when None.

    Returns:
        A float for one row, else an array of shape ``shares.shape[:-1]``.

    Raises:
        UserError: Shares or target of the wrong shape, negative, or not summing to 1.
    """
    s = _check_dist(shares, "shares")
    t = _check_target(target, s.shape[-1])
    return _out(np.abs(s - t).max(axis=-1))


def _ab_cells(shares: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    return np.abs(shares - pooled)


def ab(shares: Any, weights: Any = None) -> float:
    """Association bias ``max_{k, r} |P(k | r) - P(k)|`` (Alabdulmohsin et al., ICLR 2024).

    ``P(k)`` is the share pooled over prompts: the weighted mean of the rows, weights being the number of
    classified faces per prompt (so it equals the share of class k among all images). All-NaN rows are skipped.

    Args:
        shares: Per-prompt shares ``P(k | r)``, shape (R, K).
        weights: Faces per prompt, shape (R,); equal weights when None.

    Returns:
        The association bias (NaN when no row is defined).

    Raises:
        UserError: Shares of the wrong shape or not summing to 1, or weights of the wrong shape or negative.
    """
    s = _check_dist(shares, "shares")
    if s.ndim != 2:
        raise UserError(f"shares: expected shape (n_prompts, K), got shape {s.shape}; one row per prompt")
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(s),) or (w < 0).any():
        raise UserError(
            f"weights: expected {len(s)} non-negative values (faces per prompt), got shape {w.shape}; "
            "pass one weight per row of shares"
        )
    keep = ~np.isnan(s).all(axis=1) & (w > 0)
    if not keep.any():
        return float("nan")
    s, w = s[keep], w[keep]
    pooled = (w[:, None] * s).sum(axis=0) / w.sum()
    return float(_ab_cells(s, pooled).max())


# ------------------------------------------------------------------------------------------------ shares and CIs


def counts_from_labels(labels: Any, k: int) -> np.ndarray:
    """Count hard labels per class.

    Args:
        labels: Class indices in ``[0, k)``, shape (n,).
        k: Number of classes.

    Returns:
        Integer counts, shape (k,).

    Raises:
        UserError: Labels not 1-D integers in range.
    """
    return np.bincount(_check_labels(labels, k, "labels"), minlength=k)


def _check_labels(labels: Any, k: int, arg: str) -> np.ndarray:
    a = np.asarray(labels)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        raise UserError(f"{arg}: expected a 1-D array of class indices, got shape {a.shape}; pass one index per image")
    if not np.issubdtype(a.dtype, np.integer):
        raise UserError(
            f"{arg}: expected integer class indices, got dtype {a.dtype}; pass argmax indices, e.g. probs.argmax(1)"
        )
    if a.min() < 0 or a.max() >= k:
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise UserError(f"{arg}: class index {bad} is out of range for {k} classes; pass indices in 0..{k - 1}")
    return a.astype(np.int64)


def shares_from_counts(counts: Any) -> np.ndarray:
    """Hard shares from class counts; rows with no count are undefined (NaN).

    Args:
        counts: Non-negative counts, shape (K,) or (R, K).

    Returns:
        Float shares of the same shape; all-NaN rows where the count total is 0.
    """
    c = np.asarray(counts, dtype=float)
    n = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, c / np.where(n > 0, n, 1), np.nan)


def soft_shares(probs: Any) -> np.ndarray:
    """Soft shares: the mean of per-image probability vectors.

    Args:
        probs: Per-image class probabilities, shape (n, K), rows summing to 1.

    Returns:
        Shares, shape (K,); all NaN when ``n == 0``.

    Raises:
        UserError: Probabilities of the wrong shape, negative, or rows not summing to 1.
    """
    p = _check_probs(probs, None, None, "probs")
    return p.mean(axis=0) if len(p) else np.full(p.shape[1], np.nan)


def _check_probs(probs: Any, n: int | None, k: int | None, arg: str) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.size == 0 and n == 0 and k is not None:
        return np.zeros((0, k))
    want = f"({n if n is not None else 'n'}, {k if k is not None else 'K'})"
    if p.ndim != 2 or (n is not None and p.shape[0] != n) or (k is not None and p.shape[1] != k) or p.shape[1] < 2:
        raise UserError(
            f"{arg}: expected shape {want} (one probability row per classified face), got shape {p.shape}; "
            "pass the probabilities of the same images as labels, in the same order"
        )
    if not np.isfinite(p).all() or (p < 0).any():
        raise UserError(f"{arg}: contains negative, NaN or inf values; pass softmax probabilities, not logits")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1) > PROB_ATOL)
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"{arg}: row {i} sums to {sums[i]:.6g}, expected 1 (within {PROB_ATOL:g}); "
            "pass softmax probabilities, not logits or scores"
        )
    return p


def wilson_interval(k: Any, n: Any, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``k / n`` (vectorised).

    Args:
        k: Successes, any shape.
        n: Trials, broadcastable to ``k``. ``n == 0`` gives NaN bounds.
        alpha: 1 - confidence level.

    Returns:
        ``(low, high)`` arrays clipped to [0, 1].

    Raises:
        UserError: ``alpha`` outside (0, 1).
    """
    z = stats.norm.ppf(1 - _check_alpha(alpha) / 2)
    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    nan = n <= 0
    return np.where(nan, np.nan, low), np.where(nan, np.nan, high)


def jeffreys_interval(k: Any, n: Any, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Jeffreys interval: equal-tailed Beta(k + 1/2, n - k + 1/2) quantiles (vectorised).

    Following Brown, Cai and DasGupta (2001), the lower bound is 0 when ``k == 0`` and the upper bound 1 when
    ``k == n``, which keeps coverage near nominal at the boundaries.

    Args:
        k: Successes, any shape.
        n: Trials, broadcastable to ``k``. ``n == 0`` gives NaN bounds.
        alpha: 1 - confidence level.

    Returns:
        ``(low, high)`` arrays.

    Raises:
        UserError: ``alpha`` outside (0, 1).
    """
    a = _check_alpha(alpha)
    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    with np.errstate(invalid="ignore"):
        low = np.where(k <= 0, 0.0, stats.beta.ppf(a / 2, k + 0.5, n - k + 0.5))
        high = np.where(k >= n, 1.0, stats.beta.ppf(1 - a / 2, k + 0.5, n - k + 0.5))
    nan = n <= 0
    return np.where(nan, np.nan, low), np.where(nan, np.nan, high)


def share_intervals(counts: Any, alpha: float = 0.05, method: Interval = "wilson") -> np.ndarray:
    """Per-class intervals for the hard shares of each row of ``counts`` (class k vs the rest).

    Args:
        counts: Class counts, shape (K,) or (R, K).
        alpha: 1 - confidence level.
        method: ``"wilson"`` (default) or ``"jeffreys"``.

    Returns:
        Bounds of shape ``counts.shape + (2,)``: ``[..., k, 0]`` low, ``[..., k, 1]`` high; NaN for empty rows.

    Raises:
        UserError: Unknown method or ``alpha`` outside (0, 1).
    """
    fn = wilson_interval if _check_interval(method) == "wilson" else jeffreys_interval
    c = np.asarray(counts, dtype=float)
    low, high = fn(c, c.sum(axis=-1, keepdims=True), alpha)
    return np.stack([low, high], axis=-1)


# ------------------------------------------------------------------------------------- noise floor and debiased RD

# Half-width of the linear core of the debiased pair estimator, in standard deviations of c_i - c_j under balance:
# at 160 images per prompt it keeps the spread at balance near raw RD's (sd 0.054 vs 0.048 for gender) while its
# shrinkage at slight skew stays below 0.045 (benchmarks/bench_coverage.py, floor table).
DEBIAS_KAPPA = 2.0
# Replicates of the per-prompt parametric bootstrap behind rd_debiased_ci for K > 2 (one interval per prompt).
PROMPT_BOOT = 200
# Bootstrap work is chunked so one chunk's (replicates, prompts, K) arrays stay around 8 MB; chunks are seeded by
# index, so results depend on the seed and the data only, never on the number of threads.
_CHUNK_CELLS = 1 << 20


@functools.lru_cache(maxsize=65536)
def _pair_abs_gap(n: int, s: float, q: float) -> float:
    """``E|c_i - c_j| / n`` for ``(c_i, c_j, rest) ~ Multinomial(n, (s q, s (1 - q), 1 - s))``, exactly.

    ``m = c_i + c_j ~ Binomial(n, s)`` and, given m, ``c_i ~ Binomial(m, q)``: a double sum over (m, c_i). Values of
    m with probability below 1e-15 of the most likely one are skipped (their total is far below float precision).
    """
    if n == 0 or s <= 0:
        return 0.0
    m = np.arange(n + 1)
    pm = stats.binom.pmf(m, n, s)
    keep = pm > pm.max() * 1e-15
    m, pm = m[keep], pm[keep]
    x = np.arange(int(m.max()) + 1)
    px = stats.binom.pmf(x[None, :], m[:, None], q)
    return float(pm @ (px * np.abs(2 * x[None, :] - m[:, None])).sum(axis=1)) / n


def expected_rd(n: Any, shares: Any) -> float | np.ndarray:
    """Exact expected RD of an audit with ``n`` classified images per prompt drawn from ``shares``.

    ``E[rd(c / n)]`` for ``c ~ Multinomial(n, shares)``, summed pair by pair: RD is a mean over class pairs of
    ``|c_i - c_j| / n`` and each pair's counts are a trinomial (:func:`_pair_abs_gap`), so no K-dimensional
    enumeration is needed. With the uniform shares this is the *noise floor* of RD (:func:`rd_floor`).

    Args:
        n: Classified images per prompt, an integer or shape (R,).
        shares: Class probabilities, shape (K,) or (R, K).

    Returns:
        A float, or shape (R,); NaN where ``n == 0``.

    Raises:
        UserError: Shares that are not probability vectors, or counts that are not non-negative integers.
    """
    s = _check_dist(shares, "shares", allow_nan_rows=False)
    nn = np.asarray(n)
    if nn.size and (not np.issubdtype(nn.dtype, np.number) or (nn < 0).any() or (nn != np.round(nn)).any()):
        raise UserError(f"n: expected non-negative integer image counts, got {n!r}; pass classified images per prompt")
    nn, s2 = np.broadcast_arrays(nn.astype(np.int64)[..., None], s)
    nn = nn[..., 0]
    k = s2.shape[-1]
    flat_n, flat_s = nn.ravel(), s2.reshape(-1, k)
    out = np.empty(len(flat_n))
    for r, (m, p) in enumerate(zip(flat_n.tolist(), flat_s)):
        if m == 0:
            out[r] = np.nan
            continue
        total = 0.0
        for i in range(k):
            for j in range(i + 1, k):
                tot = p[i] + p[j]
                total += _pair_abs_gap(m, round(float(tot), 12), round(float(p[i] / tot), 12) if tot > 0 else 0.5)
        out[r] = total / (k * (k - 1) / 2)
    return _out(out.reshape(nn.shape))


def rd_floor(counts: Any, target: Any = None) -> np.ndarray:
    """The noise floor of RD per prompt: the expected RD of a generator that matches ``target`` exactly, audited
    with this prompt's number of classified images (:func:`expected_rd` at the target shares).

    With a uniform target, RD's true value is 0 and the floor is what sampling noise alone adds: 0.063 for gender
    (K = 2), 0.044 for race (K = 4) and 0.032 for gender x race (K = 8) at 160 images, 0.099 for gender at 64. It
    falls as 1/sqrt(n). Raw RD near the floor says nothing beyond "close to balanced"; use :func:`debiased_rd`.

    Args:
        counts: Class counts per prompt, shape (R, K).
        target: Target shares, shape (K,); uniform when None.

    Returns:
        Shape (R,); NaN for prompts without a classified face.
    """
    c = _check_counts(counts)
    t = _check_target(target, c.shape[1])
    n = c.sum(axis=1)
    out = np.full(len(c), np.nan)
    for m in np.unique(n[n > 0]):
        out[n == m] = expected_rd(int(m), t)
    return out


def _debiased(c: np.ndarray, axis: int = -1) -> np.ndarray:
    c = np.moveaxis(np.asarray(c), axis, 0).astype(float)
    k = len(c)
    n = c.sum(axis=0)
    acc = np.zeros(c.shape[1:])
    for i in range(k):
        for j in range(i + 1, k):
            d, m = c[i] - c[j], c[i] + c[j]
            h = DEBIAS_KAPPA * np.sqrt(np.maximum(m, 1.0))
            acc += c[i] * np.clip((d - 1) / h, -1, 1) - c[j] * np.clip((d + 1) / h, -1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, acc / np.where(n > 0, n, 1), np.nan) / (k * (k - 1) / 2)


def debiased_rd(counts: Any) -> float | np.ndarray:
    """A bias-corrected estimate of the population RD per prompt, exactly unbiased at balance.

    Estimator. For a class pair (i, j) let each classified image contribute ``X = +1`` (class i), ``-1`` (class j)
    or 0, so ``D = c_i - c_j = sum X`` and ``|p_i - p_j| = |E X|``. The pair's estimate is the leave-one-out sum

        ``T_ij = (1/n) sum_images X * psi(D - X)``,  ``psi(d) = clip(d / h, -1, 1)``,  ``h = kappa sqrt(c_i + c_j)``

    i.e. ``(c_i psi(D - 1) - c_j psi(D + 1)) / n``; RD's estimate is the mean of ``T_ij`` over pairs. Inside the
    linear core (``|D| + 1 <= h``) this is ``(D^2 - c_i - c_j) / (n h)``, a multiple of the unbiased estimate of
    ``(p_i - p_j)^2``; outside it equals the plug-in ``|D| / n``.

    Properties (exact, for any n and K, because an image's ``X`` is independent of the other images' ``D - X``
    given ``c_i + c_j``):

    - ``E[T_ij] = (p_i - p_j) E[psi(D')]`` with ``D'`` the gap of the other images, so ``0 <= E[T_ij] <= |p_i -
      p_j|``: it is unbiased at balance (E = 0 exactly) and, when ``|p_i - p_j|`` is several standard deviations,
      equal to the plug-in (unbiased up to exponentially small terms). In between it shrinks towards 0 (at 160
      images and K = 2 by at most 0.045 near shares 0.55/0.45). Raw RD errs the other way, so in expectation
      ``rd_debiased <= true RD <= rd``.
    - It can be negative (any estimator unbiased at 0 must be): at balance half the prompts give values below 0.
      Means over prompts are therefore reported unclipped; intervals are clipped to the RD range.
    - Spread at balance close to raw RD's (sd 0.054 vs 0.048, gender at 160 images, ``kappa = 2``).

    Args:
        counts: Class counts, shape (K,) or (R, K).

    Returns:
        A float for one row, else shape (R,); NaN where a row has no count.
    """
    c = np.asarray(counts)
    c2 = _check_counts(c.reshape(1, -1) if c.ndim == 1 else c)
    out = _debiased(c2)
    return float(out[0]) if c.ndim == 1 else out


def _smoothed_shares(c: np.ndarray) -> np.ndarray:
    # Two pseudo-images spread evenly (Agresti-Coull's "add two"): a prompt whose faces all fall in one class
    # still resamples with spread, instead of a zero-width interval at the boundary.
    k = c.shape[-1]
    return (c + 2.0 / k) / (c.sum(axis=-1, keepdims=True) + 2.0)


def _binomial_chain(g: np.random.Generator, n: np.ndarray, p: np.ndarray, b: int) -> np.ndarray:
    """``b`` multinomial draws per row as a chain of binomials (several times faster than numpy's multinomial for
    many rows with different probabilities); returns shape (b, R, K)."""
    r, k = p.shape
    out = np.empty((b, r, k), dtype=np.int64)
    left = np.broadcast_to(n, (b, r)).astype(np.int64)
    rest = np.ones(r)
    for j in range(k - 1):
        x = g.binomial(left, np.clip(p[:, j] / np.maximum(rest, 1e-300), 0.0, 1.0))
        out[..., j] = x
        left = left - x
        rest = rest - p[:, j]
    out[..., k - 1] = left
    return out


def rd_debiased_intervals(counts: Any, alpha: float = 0.05, method: Interval = "wilson", n_boot: int = PROMPT_BOOT,
                          seed: int = 0) -> np.ndarray:
    """Per-prompt interval for the population RD, valid near zero.

    - K = 2: RD = ``|2 p - 1|`` is a function of one share, so the share's own interval (Wilson or Jeffreys) maps
      onto it exactly: ``[0, max(|2 lo - 1|, |2 hi - 1|)]`` when the share interval contains 1/2, else the image of
      its ends. Its coverage is the share interval's.
    - K > 2: a bracket. Lower end: the lower percentile bound of :func:`debiased_rd` (biased low), upper end: the
      upper bound of raw RD (biased high), each from a parametric bootstrap of the prompt's images (``n_boot``
      replicates, drawn from the shares smoothed by two pseudo-images so that a prompt with every face in one class
      still has spread), each re-centred on its estimate. Because ``E[debiased] <= RD <= E[raw]``, the bracket
      covers RD at about the nominal rate whatever the skew; exactly balanced prompts are covered more often
      (the upper end cannot miss).

    Args:
        counts: Class counts per prompt, shape (R, K).
        alpha: 1 - confidence level.
        method: Share interval for K = 2.
        n_boot: Bootstrap replicates per prompt for K > 2.
        seed: Seed of that bootstrap.

    Returns:
        Shape (R, 2), clipped to [0, 2/K]; NaN rows for prompts without a classified face.
    """
    a = _check_alpha(alpha)
    c = _check_counts(counts)
    r, k = c.shape
    out = np.full((r, 2), np.nan)
    n = c.sum(axis=1)
    used = np.flatnonzero(n > 0)
    if not len(used):
        return out
    if k == 2:
        lo, hi = share_intervals(c[used], a, method)[:, 1].T
        ends = np.abs(2 * np.stack([lo, hi], axis=1) - 1)
        inside = (lo <= 0.5) & (0.5 <= hi)
        out[used, 0] = np.where(inside, 0.0, ends.min(axis=1))
        out[used, 1] = ends.max(axis=1)
        return out
    nb = _check_n_boot(n_boot)
    cu, nu = c[used], n[used]
    raw, deb = _rd(cu / nu[:, None]), _debiased(cu)
    per = max(1, _CHUNK_CELLS // (nb * k))
    starts = list(range(0, len(used), per))
    seeds = np.random.SeedSequence(seed).spawn(len(starts))

    def chunk(i: int) -> np.ndarray:
        sl = slice(starts[i], starts[i] + per)
        cb = _binomial_chain(np.random.default_rng(seeds[i]), nu[sl], _smoothed_shares(cu[sl]), nb)
        rb_, db_ = _rd(cb / nu[sl][None, :, None]), _debiased(cb)
        low = deb[sl] - (np.quantile(db_, 1 - a / 2, axis=0) - db_.mean(axis=0))
        high = raw[sl] + (rb_.mean(axis=0) - np.quantile(rb_, a / 2, axis=0))
        return np.stack([low, high], axis=1)

    workers = min(len(starts), os.cpu_count() or 1, 8)
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:  # numpy's samplers release the GIL
            parts = list(ex.map(chunk, range(len(starts))))
    else:
        parts = [chunk(i) for i in range(len(starts))]
    out[used] = np.clip(np.concatenate(parts), 0.0, 2 / k)
    return out


# ------------------------------------------------------------------------------------------------------ bootstrap

def expanded_alpha(alpha: float, n_units: int | None) -> float:
    """The tail level of Hesterberg's *expanded percentile* interval for a bootstrap over ``n_units`` units.

    A percentile interval of a mean over few units (prompts) is too narrow: the bootstrap variance divides by n
    instead of n - 1, and normal instead of t quantiles apply. The expanded interval takes the replicates'
    quantiles at ``alpha' / 2`` with ``z_{alpha'/2} = sqrt(n / (n - 1)) t_{alpha/2, n-1}`` (Hesterberg 2015,
    "What teachers should know about the bootstrap"); with 8 prompts 95% becomes the 0.6 / 99.4 percentiles. It
    restores nominal coverage from 8 prompts up (benchmarks/bench_coverage.py).

    Args:
        alpha: 1 - confidence level.
        n_units: Units resampled (e.g. prompts); None or < 2 leaves ``alpha`` as it is.
    """
    if n_units is None or n_units < 2:
        return alpha
    z = math.sqrt(n_units / (n_units - 1)) * stats.t.ppf(1 - alpha / 2, n_units - 1)
    return float(2 * stats.norm.sf(z))


def percentile_ci(
    samples: Any, alpha: float = 0.05, center: float | None = None, bounds: tuple[float, float] = (-math.inf, math.inf),
    n_units: int | None = None,
) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap replicates, optionally re-centred and expanded.

    With ``center``, the replicates are shifted by ``center - mean(replicates)`` before taking quantiles: the
    interval keeps its width but is placed around the estimate instead of around the replicates' mean (which a
    non-linear statistic such as a max or an absolute difference moves away from the estimate). With ``n_units``
    the tails are taken at :func:`expanded_alpha` (small-sample correction).

    Args:
        samples: Replicate values, shape (n_boot,). NaN replicates are ignored.
        alpha: 1 - confidence level.
        center: The point estimate to centre on; plain percentile interval when None.
        bounds: The metric's range; the interval is clipped to it.
        n_units: Units the bootstrap resampled (prompts), for the expanded interval; None for the plain one.

    Returns:
        ``(low, high)``; NaNs when no replicate (or a NaN ``center``) is defined.

    Raises:
        UserError: ``alpha`` outside (0, 1).
    """
    a = expanded_alpha(_check_alpha(alpha), n_units)
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if not len(s) or (center is not None and not math.isfinite(center)):
        return float("nan"), float("nan")
    if center is not None:
        s = s + (center - s.mean())
    low, high = np.clip(np.quantile(s, [a / 2, 1 - a / 2]), *bounds)
    return float(low), float(high)


def bootstrap_mean(
    values: Any, alpha: float = 0.05, n_boot: int = 1000, seed: int | np.random.Generator = 0
) -> tuple[float, tuple[float, float], np.ndarray]:
    """Mean of ``values`` with an expanded percentile bootstrap interval (values resampled ``n_boot`` times).

    Args:
        values: Finite values, shape (n,) with n >= 1 (e.g. one per prompt).
        alpha: 1 - confidence level.
        n_boot: Number of replicates.
        seed: Seed, or a ``numpy.random.Generator`` to draw from (several means from one stream).

    Returns:
        ``(mean, (low, high), replicates)``, the replicates of shape (n_boot,).

    Raises:
        UserError: No values, ``alpha`` outside (0, 1) or ``n_boot`` < 1.
    """
    a, nb = _check_alpha(alpha), _check_n_boot(n_boot)
    v = np.asarray(values, dtype=float).ravel()
    if not len(v):
        raise UserError("values: empty; a bootstrap mean needs at least one value")
    reps = v[np.random.default_rng(seed).integers(0, len(v), size=(nb, len(v)))].mean(axis=1)
    return float(v.mean()), percentile_ci(reps, a, n_units=len(v)), reps


def _prompt_values(c: np.ndarray, t: np.ndarray, debiased_shift=None) -> dict[str, np.ndarray]:
    """Per-prompt metrics of counts of shape (..., K) (every row with at least one count)."""
    s = c / c.sum(axis=-1, keepdims=True)
    deb = _debiased(c) - (debiased_shift(s) if debiased_shift is not None else 0.0)
    return {"rd": _rd(s), "rd_debiased": deb, "kl": (special.xlogy(s, s) - _xlogy_target(s, t)).sum(axis=-1),
            "entropy": _entropy(s)}


def bootstrap_replicates(counts: Any, target: Any = None, n_boot: int = 1000, seed: int = 0,
                         debiased_shift: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Bootstrap of the aggregate metrics over prompts: prompts are resampled with replacement, each with its images.

    The estimand is the metric of the population of prompts the audited ones stand for, each audited with its
    number of images. Resampling prompts already carries each prompt's within-image noise (its observed shares are
    noisy), so images are not resampled again: a second, within-prompt level counts that noise twice and its
    intervals covered 99% instead of 95% for a balanced generator (benchmarks/bench_coverage.py). With a single
    prompt there is nothing to resample between prompts and its images are resampled instead (a multinomial draw
    from its shares): the interval is then about that prompt alone.

    Rows with no face are dropped first (they have no shares).

    Args:
        counts: Hard class counts per prompt, shape (R, K).
        target: Target shares, shape (K,); uniform when None.
        n_boot: Number of replicates.
        seed: Seed; the same seed and data give the same replicates on any machine.
        debiased_shift: Per-prompt shares (R, K) -> a bias to subtract from each prompt's debiased RD (an image
            plan's stopping bias, :func:`audit.sequential.stopping_bias`); None for none.

    Returns:
        Replicates of shape (n_boot,) for ``rd``, ``rd_debiased``, ``kl``, ``entropy`` (means over prompts) and
        ``rb``, ``ab`` (on the pooled shares); all NaN when no prompt has a face.

    Raises:
        UserError: Counts of the wrong shape or not non-negative integers; bad target or n_boot.
    """
    c = _check_counts(counts)
    t = _check_target(target, c.shape[1])
    nb = _check_n_boot(n_boot)
    n = c.sum(axis=1)
    c, n = c[n > 0], n[n > 0]
    names = ("rd", "rd_debiased", "kl", "entropy", "rb", "ab")
    if not len(c):
        return {m: np.full(nb, np.nan) for m in names}
    g = np.random.default_rng(seed)
    r, k = c.shape
    if r == 1:
        cb = g.multinomial(n[0], c[0] / n[0], size=nb)[:, None, :]
        out = {m: v[:, 0] for m, v in _prompt_values(cb, t, debiased_shift).items()}
        return out | {"rb": np.abs(cb[:, 0] / n[0] - t).max(axis=1), "ab": np.zeros(nb)}
    values = _prompt_values(c, t, debiased_shift)
    shares = c / n[:, None]
    out = {m: np.empty(nb) for m in names}
    per = max(1, _CHUNK_CELLS // (r * k))
    for start in range(0, nb, per):
        b = min(per, nb - start)
        idx = g.integers(0, r, size=(b, r))
        # w[b, i]: how often replicate b drew prompt i; every mean over the drawn prompts is then one product.
        w = np.bincount((idx + r * np.arange(b)[:, None]).ravel(), minlength=b * r).reshape(b, r)
        sl = slice(start, start + b)
        for m, v in values.items():
            out[m][sl] = w @ v / r
        pooled = (w @ c) / (w @ n)[:, None]
        out["rb"][sl] = np.abs(pooled - t).max(axis=1)
        out["ab"][sl] = np.where(w > 0, np.abs(shares[None] - pooled[:, None]).max(axis=2), 0.0).max(axis=1)
    return out


def bootstrap_rd(counts: Any, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean RD over prompts with its bootstrap interval over prompts (:func:`bootstrap_replicates`).

    The interval is the expanded percentile interval of the replicates re-centred on the estimate, clipped to the
    RD range [0, 2/K].

    Args:
        counts: Hard class counts per prompt, shape (R, K); rows with no face are left out.
        alpha: 1 - confidence level.
        n_boot: Number of replicates.
        seed: Seed.

    Returns:
        ``(mean_rd, low, high)``; NaNs when no prompt has a face.

    Raises:
        UserError: Bad counts, alpha or n_boot.
    """
    _check_alpha(alpha)
    c = _check_counts(counts)
    value = _nanmean(_rd(shares_from_counts(c)))
    reps = bootstrap_replicates(c, None, n_boot, seed)["rd"]
    low, high = percentile_ci(reps, alpha, center=value, bounds=(0.0, 2 / c.shape[1]),
                              n_units=int((c.sum(axis=1) > 0).sum()))
    return value, low, high


# ------------------------------------------------------------------------------------------- classifier correction


def _check_confusion(confusion: Any, k: int | None) -> np.ndarray:
    c = np.asarray(confusion, dtype=float)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or (k is not None and c.shape[0] != k):
        want = f"({k}, {k})" if k is not None else "(K, K)"
        raise UserError(
            f"confusion: expected shape {want} with C[i][j] = P(predict j | true i), got shape {c.shape}; "
            "measure it on labelled images with the same classes"
        )
    if not np.isfinite(c).all() or (c < 0).any():
        raise UserError("confusion: entries must be finite and >= 0; pass row-normalised counts")
    sums = c.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1) > PROB_ATOL)
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"confusion: row {i} sums to {sums[i]:.6g}, expected 1; normalise each row (true class) to sum to 1"
        )
    return c


def correct_shares(observed: Any, confusion: Any) -> np.ndarray:
    """Undo classifier error: the shares ``p`` on the simplex that best solve ``C^T p = observed``.

    With ``C[i][j] = P(predict j | true i)``, the expected observed shares are ``C^T p``. When ``C`` is invertible
    and the exact solution is non-negative it is returned (it then sums to 1 automatically, because the rows of
    ``C`` do); otherwise the least-squares solution with ``p >= 0`` and ``sum p = 1`` is found by NNLS with a
    heavily weighted sum-to-one row.

    Args:
        observed: Observed shares, shape (K,) or (R, K); all-NaN rows stay NaN.
        confusion: Confusion matrix, shape (K, K), rows summing to 1.

    Returns:
        Corrected shares of the same shape as ``observed``.

    Raises:
        UserError: Shapes that disagree, or rows that are not probability vectors.
    """
    q = _check_dist(observed, "observed")
    c = _check_confusion(confusion, q.shape[-1])
    flat = q.reshape(-1, q.shape[-1])
    out = np.full_like(flat, np.nan)
    defined = ~np.isnan(flat).all(axis=1)
    todo = np.flatnonzero(defined)
    if np.linalg.cond(c) < 1e10:
        # All prompts in one solve; a row that needs a negative share is not on the simplex and goes to NNLS.
        exact = np.linalg.solve(c.T, flat[todo].T).T
        ok = (exact >= -1e-12).all(axis=1)
        out[todo[ok]] = np.clip(exact[ok], 0, None)
        todo = todo[~ok]
    if len(todo):
        w = 1e3  # weighted this much, the sum-to-one row is met to ~1e-6 before the renormalisation below
        a = np.vstack([c.T, np.full((1, len(c)), w)])
        for i in todo:
            p, _ = optimize.nnls(a, np.append(flat[i], w))
            out[i] = p
    out[defined] /= out[defined].sum(axis=1, keepdims=True)
    return out.reshape(q.shape)


def corrected_intervals(intervals: Any, confusion: Any) -> np.ndarray:
    """Intervals for the error-corrected shares: the range of each corrected share over the observed shares'
    intervals.

    The corrected shares are linear in the observed ones, ``p = A q`` with ``A = (C^T)^-1``. For each class the
    smallest and largest ``a_k . q`` over the box of the observed per-class intervals intersected with the simplex
    (``sum q = 1``) are found greedily (a fractional knapsack: start from the lower ends, give the remaining mass
    to the classes with the smallest, or largest, coefficients first). With two classes this is the exact image of
    the observed share's interval, so its coverage is that interval's; with more it is conservative. The
    confusion matrix is taken as exact: the uncertainty of its own estimate (from the calibration set) is not
    included.

    Args:
        intervals: Observed share intervals, shape (R, K, 2) as :func:`share_intervals` returns them.
        confusion: Confusion matrix (K, K), ``C[i][j] = P(predict j | true i)``.

    Returns:
        Shape (R, K, 2), clipped to [0, 1]; NaN rows where the observed interval is undefined, all NaN when the
        confusion matrix is (nearly) singular.
    """
    b = np.asarray(intervals, dtype=float)
    c = _check_confusion(confusion, b.shape[1])
    out = np.full(b.shape, np.nan)
    if np.linalg.cond(c) >= 1e10:
        return out
    a = np.linalg.inv(c.T)
    lo, hi = b[..., 0], b[..., 1]
    ok = np.isfinite(b).all(axis=(1, 2))
    lo, hi = lo[ok], hi[ok]
    for k in range(len(a)):
        for col, order in ((0, np.argsort(a[k])), (1, np.argsort(-a[k]))):
            q = lo.copy()
            left = 1.0 - q.sum(axis=1)
            for j in order:
                add = np.clip(np.minimum(left, hi[:, j] - lo[:, j]), 0.0, None)
                q[:, j] += add
                left = left - add
            out[ok, k, col] = q @ a[k]
    return np.clip(out, 0.0, 1.0)


# -------------------------------------------------------------------------------------------------- joint labels


def joint_labels(a: Any, b: Any, k_a: int, k_b: int) -> np.ndarray:
    """Combine two label arrays into joint-cell labels ``a * k_b + b`` (e.g. gender x race: 2 x 4 = 8 cells).

    Args:
        a: First attribute's class indices in ``[0, k_a)``, shape (n,).
        b: Second attribute's class indices in ``[0, k_b)``, shape (n,).
        k_a: Number of classes of the first attribute.
        k_b: Number of classes of the second attribute.

    Returns:
        Joint labels in ``[0, k_a * k_b)``, shape (n,); cell order matches :func:`joint_classes`.

    Raises:
        UserError: Arrays of different length, or labels not integers in range.
    """
    for name, k in (("k_a", k_a), ("k_b", k_b)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise UserError(f"{name}: expected a number of classes >= 2, got {k!r}; e.g. 2 for gender, 4 for race")
    la, lb = np.asarray(a), np.asarray(b)
    if la.shape != lb.shape:
        raise UserError(f"a: has shape {la.shape} but b has shape {lb.shape}; pass both attributes of the same images")
    return _check_labels(la, k_a, "a") * k_b + _check_labels(lb, k_b, "b")


def joint_probs(pa: Any, pb: Any) -> np.ndarray:
    """Joint-cell probabilities per image as the outer product of two attributes' probabilities.

    This assumes the two attribute predictions are independent given the image (true for two separate
    zero-shot CLIP heads); for a classifier that predicts the joint cells directly, use its output instead.

    Args:
        pa: First attribute's probabilities, shape (n, K_a).
        pb: Second attribute's probabilities, shape (n, K_b).

    Returns:
        Probabilities of shape (n, K_a * K_b), cell ``i * K_b + j``.

    Raises:
        UserError: Shapes that disagree or rows that are not probability vectors.
    """
    a = _check_probs(pa, None, None, "pa")
    b = _check_probs(pb, len(a), None, "pb")
    return (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)


def joint_classes(classes_a: Sequence[str], classes_b: Sequence[str], sep: str = "/") -> list[str]:
    """Names of the joint cells, in the order of :func:`joint_labels`, e.g. ``"female/Asian"``.

    Args:
        classes_a: First attribute's class names.
        classes_b: Second attribute's class names.
        sep: Separator between the two names.

    Returns:
        ``len(classes_a) * len(classes_b)`` names.
    """
    return [f"{x}{sep}{y}" for x in classes_a for y in classes_b]


# -------------------------------------------------------------------------------------------------- paired change

# Above this many non-zero differences the exact null distribution (cost ~ n^3) gives way to the normal one.
EXACT_SIGNED_RANK_MAX = 200


def signed_rank_test(differences: Any) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of "no change", exact whenever it can be.

    Zero differences are dropped first (Wilcoxon's own convention, scipy's ``zero_method="wilcox"``): a prompt
    whose value did not move carries no sign. The remaining absolute differences are ranked with mid-ranks for
    ties. Up to :data:`EXACT_SIGNED_RANK_MAX` differences the p-value comes from the exact null distribution of
    the positive rank sum given those (tied) ranks, every sign pattern equally likely, counted by dynamic
    programming over the doubled ranks (integers); beyond it from the normal approximation with the tie
    correction. scipy's own ``wilcoxon`` silently switches to the normal approximation as soon as a zero or a tie
    is present (on 19 equal-signed differences plus one zero it reports 1.3e-4; the exact value is 2 / 2^19 =
    3.8e-6).

    Args:
        differences: The per-prompt changes, shape (n,), finite.

    Returns:
        ``statistic`` (the smaller of the positive and negative rank sums, as scipy reports it), ``p_value``,
        ``method`` ("exact", "normal", or "none" when every difference is zero: no evidence of change, p = 1),
        ``n_zero`` (differences dropped).
    """
    d = np.asarray(differences, dtype=float).ravel()
    nz = d[d != 0]
    n_zero = int(len(d) - len(nz))
    if not len(nz):
        return {"statistic": 0.0, "p_value": 1.0, "method": "none", "n_zero": n_zero}
    ranks2 = np.round(2 * stats.rankdata(np.abs(nz))).astype(np.int64)  # mid-ranks are halves: doubled, integers
    total2 = int(ranks2.sum())
    plus2 = int(ranks2[nz > 0].sum())
    low2 = min(plus2, total2 - plus2)
    if len(nz) <= EXACT_SIGNED_RANK_MAX:
        # dist[s]: P(positive doubled rank sum = s) when each sign is + or - with probability 1/2.
        dist = np.zeros(total2 + 1)
        dist[0] = 1.0
        for r2 in ranks2.tolist():
            shifted = np.zeros_like(dist)
            shifted[r2:] = dist[:-r2]
            dist = (dist + shifted) / 2
        p, method = min(1.0, 2 * float(dist[: low2 + 1].sum())), "exact"
    else:
        ranks = ranks2 / 2
        mean = ranks.sum() / 2
        var = (ranks**2).sum() / 4  # = n(n+1)(2n+1)/24 less the tie correction
        z = (low2 / 2 - mean) / math.sqrt(var) if var > 0 else 0.0
        p, method = min(1.0, float(2 * stats.norm.cdf(z))), "normal"
    return {"statistic": low2 / 2, "p_value": p, "method": method, "n_zero": n_zero}


def paired_change(
    before: Any, after: Any, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired before/after comparison of a per-prompt metric (same prompts, same seeds).

    Pairs where either value is undefined (NaN/None, e.g. no face) are dropped and counted. The test is
    :func:`signed_rank_test` (zero differences dropped, exact p-value up to 200 non-zero pairs); when every
    difference is zero there is no evidence of change and the result is ``statistic 0, p_value 1``. The interval
    of the mean change is the expanded percentile bootstrap over prompts (:func:`bootstrap_mean`).

    Args:
        before: Per-prompt values before, shape (R,).
        after: Per-prompt values after, same prompts in the same order, shape (R,).
        alpha: 1 - confidence level of the mean-change interval.
        n_boot: Bootstrap replicates (prompts resampled) for the mean-change interval.
        seed: Seed.

    Returns:
        JSON-ready dict: ``n`` (pairs used), ``n_dropped``, ``mean_change`` (after - before), ``ci``,
        ``median_change``, ``n_down``/``n_up``/``n_tied`` (prompts whose value fell/rose/stayed), ``statistic``,
        ``p_value``, ``test_method`` ("exact", "normal" or "none"), and ``changes`` (per prompt, input order,
        ``None`` where dropped).

    Raises:
        UserError: Arrays of different shapes, or no prompt defined in both.
    """
    a = _check_alpha(alpha)
    nb = _check_n_boot(n_boot)
    x = np.asarray([np.nan if v is None else v for v in np.asarray(before, dtype=object).ravel()], dtype=float)
    y = np.asarray([np.nan if v is None else v for v in np.asarray(after, dtype=object).ravel()], dtype=float)
    if np.ndim(before) != 1 or np.ndim(after) != 1 or x.shape != y.shape:
        raise UserError(
            f"after: has shape {np.shape(after)} but before has shape {np.shape(before)}; "
            "pass one value per prompt, same prompts in the same order"
        )
    d = y - x
    keep = ~np.isnan(d)
    if not keep.any():
        raise UserError("before/after: no prompt has a value in both runs; check that both audits found faces")
    dk = d[keep]
    test = signed_rank_test(dk)
    mean, (low, high), _ = bootstrap_mean(dk, a, nb, seed)
    return {
        "n": int(keep.sum()),
        "n_dropped": int((~keep).sum()),
        "mean_change": mean,
        "ci": [low, high],
        "median_change": float(np.median(dk)),
        "n_down": int((dk < 0).sum()),
        "n_up": int((dk > 0).sum()),
        "n_tied": int((dk == 0).sum()),
        "statistic": test["statistic"],
        "p_value": test["p_value"],
        "test_method": test["method"],
        "changes": [None if np.isnan(v) else float(v) for v in d],
    }


# ---------------------------------------------------------------------------------------------------- summary


def _json(x: Any) -> Any:
    """Plain Python data for json.dumps(allow_nan=False): numpy -> float/int/list, NaN/inf -> None."""
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _json_floats(a: np.ndarray) -> list:
    """A float array as nested lists with NaN/inf as None, converting once instead of element by element."""
    a = np.asarray(a, dtype=float)
    bad = ~np.isfinite(a)
    if not bad.any():
        return a.tolist()
    o = a.astype(object)
    o[bad] = None
    return o.tolist()


def summarize_attribute(
    prompts: Sequence[str],
    labels: Sequence[Any],
    probs: Sequence[Any] | None,
    classes: Sequence[str],
    n_images: Sequence[int],
    n_abstain: Sequence[int],
    target: Any = None,
    confusion: Any = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    interval: Interval = "wilson",
    share_alpha: float | None = None,
    debiased_shift: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """All bias metrics of one attribute (e.g. gender) over a prompt set, per prompt and aggregated.

    Per prompt r: ``labels[r]`` are the hard class indices of its classified face images; ``n_abstain[r]`` faces
    were detected but not classified; the remaining ``n_images[r] - len(labels[r]) - n_abstain[r]`` images had no
    face. Shares are over classified faces only. Prompts with no classified face get ``None`` shares and metrics,
    are left out of every mean and of the bootstrap, and are listed in ``empty_prompts``.

    Aggregates: ``rd``, ``rd_soft``, ``kl``, ``entropy`` are means over prompts with faces (equal weight per
    prompt, as in the reference protocol); ``rb`` is computed on the shares pooled over all classified images,
    and ``ab`` compares each prompt's shares with those pooled shares. ``*_ci`` are intervals from the bootstrap
    over prompts on hard labels (:func:`bootstrap_replicates`): expanded percentile intervals (:func:`expanded_alpha`)
    re-centred on the estimate and clipped to the metric's range. They are about the population of prompts the
    audited ones stand for, at this audit's image counts: raw ``rd`` includes the noise floor.

    Noise floor and debiased RD, per prompt and aggregated: ``rd_floor`` (:func:`rd_floor`: the RD a generator
    matching the target exactly would show at these counts), ``rd_debiased`` (:func:`debiased_rd`: unbiased at
    balance, unclipped, so it can be slightly negative) and ``rd_debiased_ci``: per prompt
    :func:`rd_debiased_intervals`; aggregated the bracket from the lower bound of the debiased mean to the upper
    bound of raw RD (in expectation ``rd_debiased <= true RD <= rd``), clipped to [0, 2/K]. An interval that
    reaches 0 means the attribute is indistinguishable from balanced. ``rd_soft`` has no interval; ``corrected``
    has per-prompt share intervals (:func:`corrected_intervals`).

    Args:
        prompts: Prompt texts, length R.
        labels: Per prompt, hard class indices of the classified faces, shape (n_r,).
        probs: Per prompt, class probabilities of the same faces, shape (n_r, K); None for no soft metrics.
        classes: Class names, length K >= 2 (for gender x race use :func:`joint_classes`).
        n_images: Per prompt, images generated (faces + no-face).
        n_abstain: Per prompt, detected faces the classifier abstained on.
        target: Target shares, shape (K,), all positive (KL must be finite); uniform when None.
        confusion: Classifier confusion matrix (K, K), ``C[i][j] = P(predict j | true i)``; when given, the
            ``corrected`` block holds the metrics on error-corrected shares (no intervals).
        alpha: 1 - confidence level for all intervals.
        n_boot: Bootstrap replicates.
        seed: Bootstrap seed.
        interval: Per-class share interval, ``"wilson"`` or ``"jeffreys"``.
        share_alpha: 1 - confidence level of the per-prompt share intervals and per-prompt ``rd_debiased_ci``
            when it differs from ``alpha``: the level an adaptive image plan calibrated so that its intervals stay
            valid under its stopping rule (:mod:`audit.sequential`). None: ``alpha``.
        debiased_shift: Per-prompt shares (R, K) -> the bias an image plan's stopping rule adds to each prompt's
            debiased RD, subtracted from it (:func:`audit.sequential.stopping_bias`); None for fixed counts.

    Returns:
        A JSON-ready dict (plain floats, undefined values ``None``) with ``classes``, ``target``, counts
        (``n_prompts``, ``n_prompts_empty``, ``empty_prompts``, ``n_images``, ``n_faces``, ``n_classified``,
        ``n_abstain``), ``no_face_rate``, ``abstain_rate``, ``shares`` and ``soft_shares`` (pooled), ``rd``,
        ``rd_ci``, ``rd_soft``, ``kl``, ``kl_ci``, ``entropy``, ``entropy_ci``, ``rb``, ``rb_ci``, ``ab``,
        ``ab_ci``, ``ab_at`` ({class, prompt} where the association bias is largest), ``rd_floor``,
        ``rd_debiased``, ``rd_debiased_ci``, ``corrected`` (dict or None), settings (``alpha``, ``share_alpha``,
        ``n_boot``, ``seed``, ``interval``), and ``per_prompt``: a list of {prompt, n_images, n_faces,
        n_classified, n_abstain, no_face_rate, counts, shares, shares_ci, soft_shares, rd, rd_floor,
        rd_debiased, rd_debiased_ci, rd_soft, kl, entropy, rb}.

    Raises:
        UserError: Any input of the wrong length, shape, type or range (checked before any work is done).
    """
    # ---- checks (all before any work, so bad input never yields a partial summary)
    classes = list(classes)
    k = len(classes)
    if k < 2 or len(set(classes)) != k:
        raise UserError(f"classes: expected at least 2 distinct class names, got {classes!r}; e.g. ['male', 'female']")
    r_n = len(prompts)
    for r, text in enumerate(prompts):
        if not isinstance(text, str):
            raise UserError(f"prompts[{r}]: expected the prompt text, got {text!r}; pass one string per prompt")
    for name, seq in (("labels", labels), ("n_images", n_images), ("n_abstain", n_abstain)) + (
        (("probs", probs),) if probs is not None else ()
    ):
        if len(seq) != r_n:
            raise UserError(
                f"{name}: has {len(seq)} entries but prompts has {r_n}; pass one entry per prompt, in prompt order"
            )
    alpha = _check_alpha(alpha)
    share_alpha = alpha if share_alpha is None else _check_alpha(share_alpha)
    n_boot = _check_n_boot(n_boot)
    interval = _check_interval(interval)
    t = _check_target(target, k)
    if (t <= 0).any():
        i = int(np.flatnonzero(t <= 0)[0])
        raise UserError(
            f"target: share of class {classes[i]!r} is {t[i]:g}, but every class needs a positive target for KL; "
            "drop the class from classes or give it a small positive share"
        )
    conf = _check_confusion(confusion, k) if confusion is not None else None
    labs = [_check_labels(lab, k, f"labels[{r}]") for r, lab in enumerate(labels)]
    prbs = (
        [_check_probs(p, len(labs[r]), k, f"probs[{r}]") for r, p in enumerate(probs)] if probs is not None else None
    )
    n_img = np.zeros(r_n, dtype=np.int64)
    n_abs = np.zeros(r_n, dtype=np.int64)
    for r in range(r_n):
        for name, seq, dst in (("n_images", n_images, n_img), ("n_abstain", n_abstain, n_abs)):
            v = seq[r]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise UserError(f"{name}[{r}]: expected a non-negative integer, got {v!r}; pass a count of images")
            dst[r] = v
        if n_img[r] < len(labs[r]) + n_abs[r]:
            raise UserError(
                f"n_images[{r}]: {n_img[r]} is fewer than the {len(labs[r])} classified + {n_abs[r]} abstained faces "
                "of that prompt; pass all images generated for the prompt, faces and no-face"
            )

    # ---- per prompt
    counts = np.stack([np.bincount(lab, minlength=k) for lab in labs]) if r_n else np.zeros((0, k), np.int64)
    n_cls = counts.sum(axis=1)
    shares = shares_from_counts(counts).reshape(r_n, k)
    cis = share_intervals(counts, share_alpha, interval).reshape(r_n, k, 2)
    p_rd = _rd(shares)
    p_floor = rd_floor(counts, t) if r_n else np.zeros(0)
    p_deb = _debiased(counts) - (debiased_shift(shares) if debiased_shift is not None else 0.0) if r_n \
        else np.zeros(0)
    p_deb_ci = rd_debiased_intervals(counts, share_alpha, interval, min(n_boot, PROMPT_BOOT), seed) if r_n \
        else np.zeros((0, 2))
    p_kl = (special.xlogy(shares, shares) - _xlogy_target(shares, t)).sum(axis=-1)
    p_ent = _entropy(shares)
    p_rb = np.abs(shares - t).max(axis=-1)
    soft = None
    if prbs is not None:
        soft = np.stack([p.mean(axis=0) if len(p) else np.full(k, np.nan) for p in prbs]) if r_n else np.zeros((0, k))
    p_rd_soft = _rd(soft) if soft is not None else np.full(r_n, np.nan)
    used = n_cls > 0
    n_faces = n_cls + n_abs

    # ---- aggregate
    tot_cls = int(n_cls.sum())
    pooled = counts.sum(axis=0) / tot_cls if tot_cls else np.full(k, np.nan)
    pooled_soft = None
    if prbs is not None:
        pooled_soft = np.concatenate(prbs).mean(axis=0) if tot_cls else np.full(k, np.nan)
    ab_val, ab_at = float("nan"), None
    if used.any():
        cells = _ab_cells(shares[used], pooled)
        i, j = np.unravel_index(int(np.argmax(cells)), cells.shape)
        ab_val, ab_at = float(cells[i, j]), {"class": classes[j], "prompt": prompts[int(np.flatnonzero(used)[i])]}
    reps = bootstrap_replicates(counts.reshape(r_n, k), t, n_boot, seed, debiased_shift) if r_n else None
    est = {
        "rd": _nanmean(p_rd),
        "rd_debiased": _nanmean(p_deb),
        "kl": _nanmean(p_kl),
        "entropy": _nanmean(p_ent),
        "rb": float(np.abs(pooled - t).max()),
        "ab": ab_val,
    }
    bounds = {"rd": (0.0, 2 / k), "rd_debiased": (0.0, 2 / k), "kl": (0.0, math.inf), "entropy": (0.0, 1.0),
              "rb": (0.0, 1.0), "ab": (0.0, 1.0)}
    units = int(used.sum())
    ci = {
        m: list(percentile_ci(reps[m], alpha, center=est[m], bounds=bounds[m], n_units=units))
        if reps is not None else [None, None]
        for m in est
    }
    # The bracket: the debiased mean errs low, raw RD high (see debiased_rd), so together they hold the truth.
    ci["rd_debiased"] = [ci["rd_debiased"][0], ci["rd"][1]]

    corrected = None
    if conf is not None:
        c_sh = correct_shares(shares, conf) if r_n else np.zeros((0, k))
        c_pooled = correct_shares(pooled, conf)
        c_cells = _ab_cells(c_sh[used], c_pooled) if used.any() else np.array([np.nan])
        corrected = {
            "shares": c_pooled,
            "rd": _nanmean(_rd(c_sh)),
            "kl": _nanmean((special.xlogy(c_sh, c_sh) - _xlogy_target(c_sh, t)).sum(axis=-1)),
            "entropy": _nanmean(_entropy(c_sh)),
            "rb": float(np.abs(c_pooled - t).max()),
            "ab": float(np.max(c_cells)),
            "per_prompt_shares": c_sh,
            "per_prompt_shares_ci": corrected_intervals(cis, conf) if r_n else np.zeros((0, k, 2)),
        }

    tot_img, tot_faces = int(n_img.sum()), int(n_faces.sum())
    # Columns become Python lists in one pass each: per-element conversion of 1,000 prompts x 15 fields is slow.
    with np.errstate(invalid="ignore", divide="ignore"):
        nfr = np.where(n_img > 0, (n_img - n_faces) / np.maximum(n_img, 1), np.nan)
    cols = {
        "prompt": list(prompts),
        "n_images": n_img.tolist(),
        "n_faces": n_faces.tolist(),
        "n_classified": n_cls.tolist(),
        "n_abstain": n_abs.tolist(),
        "no_face_rate": _json_floats(nfr),
        "counts": counts.tolist(),
        "shares": _json_floats(shares),
        "shares_ci": _json_floats(cis),
        "soft_shares": _json_floats(soft) if soft is not None else [None] * r_n,
        "rd": _json_floats(p_rd),
        "rd_floor": _json_floats(p_floor),
        "rd_debiased": _json_floats(p_deb),
        "rd_debiased_ci": _json_floats(p_deb_ci),
        "rd_soft": _json_floats(p_rd_soft),
        "kl": _json_floats(p_kl),
        "entropy": _json_floats(p_ent),
        "rb": _json_floats(p_rb),
    }
    per_prompt = [dict(zip(cols, row)) for row in zip(*cols.values())]
    return _json(
        {
            "classes": classes,
            "target": t,
            "n_prompts": r_n,
            "n_prompts_empty": int((~used).sum()),
            "empty_prompts": [prompts[r] for r in np.flatnonzero(~used)],
            "n_images": tot_img,
            "n_faces": tot_faces,
            "n_classified": tot_cls,
            "n_abstain": int(n_abs.sum()),
            "no_face_rate": (tot_img - tot_faces) / tot_img if tot_img else None,
            "abstain_rate": int(n_abs.sum()) / tot_faces if tot_faces else None,
            "shares": pooled,
            "soft_shares": pooled_soft,
            "rd": est["rd"],
            "rd_ci": ci["rd"],
            "rd_floor": _nanmean(p_floor),
            "rd_debiased": est["rd_debiased"],
            "rd_debiased_ci": ci["rd_debiased"],
            "rd_soft": _nanmean(p_rd_soft),
            "kl": est["kl"],
            "kl_ci": ci["kl"],
            "entropy": est["entropy"],
            "entropy_ci": ci["entropy"],
            "rb": est["rb"],
            "rb_ci": ci["rb"],
            "ab": est["ab"],
            "ab_ci": ci["ab"],
            "ab_at": ab_at,
            "corrected": corrected,
            "alpha": alpha,
            "share_alpha": share_alpha,
            "n_boot": n_boot,
            "seed": seed,
            "interval": interval,
        }
    ) | {"per_prompt": per_prompt}
