"""Adaptive image counts: the stopping rule of an image plan and the interval level that keeps it valid.

An image plan (``images_per_prompt: {target_halfwidth, min, max, block}``, :class:`audit.config.ImagesPlan`) samples
each prompt in blocks of seeds and *looks* at ``n = min, min + block, ..., max`` images. At a look the prompt stops
when every per-class share interval of the plan's attributes has a half-width ``(high - low) / 2`` of at most
``target_halfwidth``, or when ``max`` is reached. Strongly skewed prompts (95/5) reach a given half-width after
a fraction of the images a balanced one needs, which is where the savings come from.

Validity. Stopping when an interval happens to be narrow selects samples whose shares look extreme, so an interval
computed as if the count had been fixed would cover less than nominal. The intervals of a plan are therefore
computed at a smaller level ``share_alpha`` (:func:`calibrated_alpha`): the largest level at which the exact
probability that the interval misses the true share *at the stopping look* (:func:`stopping_miss`, a dynamic
programme over the binomial counts at every look) is no worse than the fixed-count interval's own at ``max``
images, in every window of true shares 0.05 wide. For a two-class attribute this is exact, not an approximation;
with more classes or attributes (a prompt then waits for all of them) it is checked by the coverage benchmark.

Why not an anytime-valid confidence sequence or repeated confidence intervals valid at every look (Pocock's
constant, 2.63 instead of 1.96 for 19 looks): measured on a simulated 50-prompt audit with Janus-Pro-like skew
(mean gender RD 0.90), that design covered 99% at the stopping look and saved only 33% of the images of a fixed
160 (reaching the same worst-case half-width), because it protects every look, not only the one the rule stops at.
The calibrated level covers 95-96% and saves over 40% (``benchmarks/bench_coverage.py``, adaptive table; the
numbers are in the project notes).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import stats

from audit.metrics import Interval, debiased_rd, share_intervals
from generators.config import UserError

# Width of the window of true shares over which the stopping-time coverage is averaged before it is compared
# with the fixed-count interval's: Wilson's and Jeffreys' coverage oscillates with the share at any fixed count.
WINDOW = 0.05
_GRID = np.linspace(0.0025, 0.5, 200)  # true shares; both intervals are symmetric under share -> 1 - share


def looks(minimum: int, maximum: int, block: int) -> list[int]:
    """Image counts at which a prompt may stop: ``minimum, minimum + block, ...``, ending exactly at ``maximum``."""
    if block < 1 or minimum < 1 or maximum < minimum:
        raise UserError(f"image plan: need 1 <= min <= max and block >= 1, got min {minimum}, max {maximum}, "
                        f"block {block}")
    out = list(range(minimum, maximum, block))
    return out + [maximum]


def halfwidth(counts: np.ndarray, alpha: float, method: Interval) -> np.ndarray:
    """Largest per-class half-width ``(high - low) / 2`` of the share intervals of each row of ``counts`` (R, K);
    NaN for a row without counts."""
    ci = share_intervals(np.asarray(counts), alpha, method)
    return ((ci[..., 1] - ci[..., 0]) / 2).max(axis=-1)


def _bounds(n: int, alpha: float, method: Interval) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(n + 1)
    ci = share_intervals(np.stack([k, n - k], axis=1), alpha, method)[:, 0]
    return ci[:, 0], ci[:, 1]


def _walk(p: np.ndarray, plan_looks: Sequence[int], alpha: float, target: float, method: Interval):
    """The distribution of a class's count at each look over the paths still running; yields, per look, ``(n,
    stopped, low, high)`` with ``stopped[i, k]`` the probability of stopping there with count k (true share
    ``p[i]``) and the look's interval bounds per count."""
    dist = np.ones((len(p), 1))
    prev = 0
    for i, n in enumerate(plan_looks):
        step = n - prev
        pmf = stats.binom.pmf(np.arange(step + 1)[None, :], step, p[:, None])
        new = np.zeros((len(p), n + 1))
        for j in range(step + 1):
            new[:, j:j + dist.shape[1]] += dist * pmf[:, j:j + 1]
        low, high = _bounds(n, alpha, method)
        stop = (high - low) / 2 <= target + 1e-12
        if i == len(plan_looks) - 1:
            stop[:] = True
        yield n, np.where(stop, new, 0.0), low, high
        new[:, stop] = 0.0
        dist, prev = new, n


def stopping_miss(shares: Sequence[float], plan_looks: Sequence[int], alpha: float, target: float,
                  method: Interval = "wilson") -> tuple[np.ndarray, np.ndarray]:
    """Exact probability that a class's share interval misses its true share at the look where the plan stops.

    A dynamic programme over the count of the class at each look (binomial increments between looks): at look
    ``n`` the counts whose interval (level ``alpha``) has half-width ``<= target`` stop (all counts at the last
    look), and those whose interval excludes the true share are misses.

    Args:
        shares: True shares of the class, shape (P,).
        plan_looks: The looks (:func:`looks`).
        alpha: Level of the intervals.
        target: The plan's target half-width.
        method: ``"wilson"`` or ``"jeffreys"``.

    Returns:
        ``(miss, expected_n)``, each shape (P,).
    """
    p = np.asarray(shares, dtype=float)
    miss, expected = np.zeros(len(p)), np.zeros(len(p))
    for n, stopped, low, high in _walk(p, plan_looks, alpha, target, method):
        out = (low[None, :] > p[:, None]) | (high[None, :] < p[:, None])
        miss += (stopped * out).sum(axis=1)
        expected += n * stopped.sum(axis=1)
    return miss, expected


@functools.lru_cache(maxsize=64)
def _debiased_at_stop(plan_looks: tuple[int, ...], target: float, alpha: float, method: Interval
                      ) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(0.0, 1.0, 401)
    mean = np.zeros(len(grid))
    for n, stopped, _, _ in _walk(grid, plan_looks, alpha, target, method):
        k = np.arange(n + 1)
        mean += stopped @ debiased_rd(np.stack([n - k, k], axis=1))
    # Against the same estimator at a fixed max images: only what stopping adds, not the estimator's own shrinkage
    # near balance (which a plug-in correction at slightly unbalanced observed shares would wrongly undo).
    n = plan_looks[-1]
    k = np.arange(n + 1)
    fixed = stats.binom.pmf(k[None, :], n, grid[:, None]) @ debiased_rd(np.stack([n - k, k], axis=1))
    return grid, mean - fixed


def stopping_bias(plan_looks: Sequence[int], target: float, alpha: float, method: Interval = "wilson"):
    """The bias that a plan's stopping rule adds to the debiased RD of a two-class attribute, as a function.

    Stopping once an interval is narrow stops early when the shares *look* extreme, so at the stopping look they
    are more extreme than the truth on average and RD comes out high (by up to 0.017 for a 95/5 prompt with a
    plan 32..320 and target 0.063). The bias is the exact expectation of :func:`audit.metrics.debiased_rd` at the
    stopping look (the dynamic programme of :func:`stopping_miss`) minus its expectation with a fixed ``max``
    images, for every true share on a grid: what the stopping rule adds, leaving the estimator's own (fixed-count)
    properties as they are, unbiased at balance included. The returned function evaluates it at observed shares
    (a plug-in correction: what remains is the bias's change between the observed and the true share).

    Returns:
        ``shares (R, 2) -> bias (R,)``, NaN rows giving NaN.
    """
    grid, bias = _debiased_at_stop(tuple(plan_looks), float(target), float(alpha), method)

    def shift(shares: np.ndarray) -> np.ndarray:
        s = np.asarray(shares, dtype=float)
        out = np.interp(np.nan_to_num(s[..., 1]), grid, bias)
        return np.where(np.isnan(s[..., 1]), np.nan, out)

    return shift


def _window_max(miss: np.ndarray) -> float:
    step = _GRID[1] - _GRID[0]
    width = max(1, int(round(WINDOW / step)))
    return float(np.convolve(miss, np.ones(width) / width, mode="valid").max())


@functools.lru_cache(maxsize=64)
def calibrated_alpha(plan_looks: tuple[int, ...], target: float, alpha: float, method: Interval = "wilson") -> float:
    """The interval level that keeps a plan's share intervals valid at its stopping look.

    The largest level ``a <= alpha`` whose windowed exact miss rate at the stopping look (:func:`stopping_miss`,
    averaged over every window of true shares :data:`WINDOW` wide) is no higher than that of the same interval at
    level ``alpha`` with a fixed ``max`` images (the toolkit's standard for fixed counts), nor than ``alpha``
    itself where that is higher. Found by bisection on ``log a`` (a plan needs only a little: 0.05 becomes about
    0.04 for Janus-Pro-like plans).

    Args:
        plan_looks: The plan's looks (a tuple, so the result is cached).
        target: Target half-width.
        alpha: Nominal 1 - confidence level.
        method: Share interval.

    Returns:
        The level to compute the plan's share intervals at.
    """
    if len(plan_looks) == 1:
        return alpha
    fixed, _ = stopping_miss(_GRID, plan_looks[-1:], alpha, 0.0, method)
    allowed = max(alpha, _window_max(fixed)) + 1e-9

    def ok(a: float) -> bool:
        miss, _ = stopping_miss(_GRID, plan_looks, a, target, method)
        return _window_max(miss) <= allowed

    if ok(alpha):
        return alpha
    lo, hi = math.log(alpha / 50), math.log(alpha)  # ok(lo) holds: at alpha/50 nothing narrow stops early
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(math.exp(mid)) else (lo, mid)
    return float(math.exp(lo))
