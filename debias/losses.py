"""Training objectives for debiasing an image-token generator: pure functions, tensors in, tensor out.

Every function here takes per-image quantities that the trainers compute (mean per-token log-probabilities of image
tokens under the policy and, for the DPO-style variants, under a reference) and returns a scalar loss, so each can be
tested by hand and reused by any trainer.

* :func:`balanced_preference_loss` (BPO, arXiv 2502.03429 section 4): pulls two images of different demographic
  groups, drawn for the same neutral prompt, towards equal likelihood. No reference model. With K groups the pairs
  of :func:`pair_indices` cover all K(K-1)/2 group pairs of a prompt, and the mean over pairs is the K-group loss.
  :func:`balanced_preference_loss_from_logits` is the same loss on a given ``D`` (the diffusion trainer's).
* :func:`dpo_loss`, :func:`ipo_loss`: the standard preference losses with a reference, for comparison.
* :func:`frequency_weights` and :func:`reweighted_likelihood_loss`: an on-policy objective on the group *frequencies*
  themselves (BPO equalises likelihoods, which does not equalise how often each group is sampled).
* :func:`pair_indices`: the pairing helper. Pairs are built explicitly by row index, never by position arithmetic:
  the published code built race pairs cyclically with an index slip (some pairs never occurred) and misaligned pairs
  inside a batch after length re-packing.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

# log p is clamped to at most this value before log(1 - p): p = 1 exactly would give infinite log-odds.
LOG_P_MAX = -1e-6


def mean_token_logprob(token_logps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token log-probability of each sequence.

    Args:
        token_logps: ``(B, T)`` log-probabilities of the image tokens (teacher forced).
        mask: optional ``(B, T)`` 0/1 mask of the tokens to count (all tokens when ``None``).

    Returns:
        ``(B,)`` mean log-probability per sequence.
    """
    if mask is None:
        return token_logps.mean(dim=-1)
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(log_p))`` computed stably for ``log_p < 0`` (Maechler 2012).

    ``log(-expm1(x))`` is accurate near 0, ``log1p(-exp(x))`` for very negative ``x``; the switch is at ``-log 2``.
    """
    return torch.where(log_p > -math.log(2.0), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log p - log(1 - p)`` with ``p = exp(mean_logp)``, stable and finite (``log p`` clamped to ``<= -1e-6``)."""
    log_p = mean_logp.clamp(max=LOG_P_MAX)
    return log_p - log1mexp(log_p)


def balanced_preference_loss(
    mean_logp_i: torch.Tensor, mean_logp_j: torch.Tensor, beta: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Balanced preference loss (BPO) for pairs of images of different groups for the same neutral prompt.

    With ``p = exp(mean per-token log-prob)`` of each image, ``logodds = log p - log(1 - p)``,
    ``D = beta * (logodds_i - logodds_j)``, the loss is ``log(1 + (sigmoid(D) - 1/2)^2)``. It is 0 exactly when both
    images are equally likely, symmetric in ``i`` and ``j``, and its gradient lowers the more likely image and raises
    the less likely one. No reference model is involved.

    Args:
        mean_logp_i, mean_logp_j: ``(B,)`` mean per-token log-probs of the two images of each pair (pair ``b`` is
            ``(mean_logp_i[b], mean_logp_j[b])``; both images share a prompt, their groups differ).
        beta: scale of the log-odds difference (the paper's code uses 1).
        reduction: ``"mean"`` (mean over pairs), ``"sum"`` or ``"none"`` (``(B,)`` per-pair losses).

    Returns:
        The reduced loss.
    """
    return balanced_preference_loss_from_logits(beta * (log_odds(mean_logp_i) - log_odds(mean_logp_j)), reduction)


def balanced_preference_loss_from_logits(d: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The balanced preference loss ``log(1 + (sigmoid(D) - 1/2)^2)`` of given pair logits ``D``.

    :func:`balanced_preference_loss` takes ``D`` from the two images' log-odds; a trainer with another likelihood
    surrogate (the diffusion trainer's denoising errors) passes its own ``D``. 0 exactly at ``D = 0``, bounded by
    ``log 1.25``.

    Args:
        d: ``(B,)`` pair logits, ``D > 0`` when image ``i`` is the likelier one.
        reduction: ``"mean"`` (mean over pairs), ``"sum"`` or ``"none"`` (``(B,)`` per-pair losses).

    Returns:
        The reduced loss.
    """
    # sigmoid(d) - 1/2 == tanh(d/2) / 2: tanh is odd in floating point too, so swapping i and j gives the exact
    # same loss, and it keeps full precision near d = 0 where sigmoid(d) - 1/2 cancels.
    return _reduce(torch.log1p(0.25 * torch.tanh(0.5 * d) ** 2), reduction)


def dpo_loss(
    policy_i: torch.Tensor, policy_j: torch.Tensor, ref_i: torch.Tensor, ref_j: torch.Tensor, beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Standard DPO (sigmoid) loss, image ``i`` preferred over image ``j``.

    ``-log sigmoid(beta * ((policy_i - ref_i) - (policy_j - ref_j)))`` (Rafailov et al. 2023).

    Args:
        policy_i, policy_j: ``(B,)`` log-probs of the preferred / other image under the policy.
        ref_i, ref_j: the same under the frozen reference.
        beta: inverse temperature of the implicit reward.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss.
    """
    margin = (policy_i - ref_i) - (policy_j - ref_j)
    return _reduce(-F.logsigmoid(beta * margin), reduction)


def ipo_loss(
    policy_i: torch.Tensor, policy_j: torch.Tensor, ref_i: torch.Tensor, ref_j: torch.Tensor, beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """IPO loss, image ``i`` preferred: ``(margin - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17).

    Pass *mean* per-token log-probs (as TRL does) so that beta does not depend on the number of image tokens.
    """
    margin = (policy_i - ref_i) - (policy_j - ref_j)
    return _reduce((margin - 1.0 / (2.0 * beta)) ** 2, reduction)


def frequency_weights(
    assignments: torch.Tensor, shares: torch.Tensor, target: torch.Tensor, clip: float = 5.0
) -> torch.Tensor:
    """Per-sample weights ``target[g] / share[g]`` of an on-policy sample's classified group ``g``, clipped.

    Args:
        assignments: ``(B,)`` group indices (hard labels) or ``(B, K)`` class probabilities (soft labels; the weight
            is then the expectation ``sum_k q_k target_k / share_k``).
        shares: ``(B, K)`` current estimate of the group shares of each sample's prompt under the model
            (or ``(K,)`` shared by all samples). Must be > 0.
        target: ``(K,)`` target shares (e.g. uniform).
        clip: weights are clipped to ``[1/clip, clip]``, bounding the variance when a group is rarely sampled.

    Returns:
        ``(B,)`` weights.
    """
    if clip < 1:
        raise ValueError(f"frequency_weights: clip must be >= 1, got {clip}")
    ratio = (target / shares).clamp(1.0 / clip, clip)
    if ratio.dim() == 1:
        ratio = ratio.expand(assignments.shape[0], -1)
    if assignments.dim() == 1:
        return ratio.gather(1, assignments.long().unsqueeze(1)).squeeze(1)
    return (assignments.to(ratio.dtype) * ratio).sum(-1)


def reweighted_likelihood_loss(
    mean_logp: torch.Tensor, weights: torch.Tensor, baseline: float = 1.0
) -> torch.Tensor:
    """On-policy reweighted likelihood: ``-mean_b (w_b - baseline) * mean_logp_b``.

    Derivation. Let ``c(y)`` be the group a classifier assigns to image ``y`` and ``P_g(x) = E_{y ~ pi(.|x)}
    [1{c(y) = g}]`` the share of group ``g`` among the model's images for neutral prompt ``x``. To move the shares to
    a target ``t``, minimise ``KL(t || P) = -sum_g t_g log P_g + const``. By the score-function identity
    ``grad P_g = E_y[1{c(y) = g} grad log pi(y|x)]``, so

        grad KL = -sum_g (t_g / P_g) grad P_g = -E_{y ~ pi}[(t_{c(y)} / P_{c(y)}) grad log pi(y|x)].

    Sampling ``y`` from the current model, classifying it and weighting its log-likelihood by
    ``w = t_c / P_c`` therefore gives an unbiased estimate of the gradient of the group marginal objective, with
    ``P`` replaced by a running estimate (:func:`frequency_weights`; clipping trades a little bias for bounded
    variance). Because ``E_y[grad log pi(y|x)] = 0``, any constant ``b`` can be subtracted from ``w`` without
    changing the expectation; ``b = 1`` is the natural baseline since ``E_y[w] = sum_g P_g t_g / P_g = 1``: at the
    target every weight is 1 and each sample's gradient vanishes, instead of reinforcing the model's own samples
    (which sharpens the distribution). The mean over image tokens, not the sum, rescales the gradient by the
    constant ``1/T`` only (every image has ``T`` tokens).

    Args:
        mean_logp: ``(B,)`` mean per-token log-probs of on-policy samples (with gradient).
        weights: ``(B,)`` weights from :func:`frequency_weights` (treated as constants).
        baseline: subtracted from the weights; 0 gives the plain reweighted likelihood.

    Returns:
        Scalar loss.
    """
    return -((weights.detach() - baseline) * mean_logp).mean()


def pair_indices(
    prompts: Sequence[Hashable], groups: Sequence[Hashable], order: Sequence[Hashable] | None = None, *,
    rows: Sequence[int] | None = None, every: bool = False,
) -> list[tuple[int, int]]:
    """Pairs of row indices ``(i, j)`` of different groups for the same prompt, built explicitly by index.

    For each prompt, and for each of the K(K-1)/2 unordered pairs of groups ``(a, b)`` present for it (``a`` before
    ``b`` in ``order``, default sorted), rows of group ``a`` are paired with rows of group ``b`` (rows in the order
    of ``rows``): by default the n-th with the n-th, for ``n < min(count_a, count_b)``, so on balanced data (the
    same number of rows per group and prompt) every row appears in exactly K-1 pairs, once with each other group;
    with ``every``, each row of ``a`` with each row of ``b`` (``count_a * count_b`` pairs).

    Args:
        prompts: the neutral prompt (or any key, e.g. ``(prompt, attribute)``) of each row.
        groups: the group of each row.
        order: group order deciding which group is ``i`` in a pair; groups missing from it come after, sorted.
        rows: the row indices to pair, in the order rows are matched (e.g. after a filter, or sorted by seed); all
            rows in input order when None.
        every: pair every row of one group with every row of the other instead of the n-th with the n-th.

    Returns:
        ``[(i, j), ...]`` row indices, ordered by prompt (first appearance), then group pair, then row.
    """
    if len(prompts) != len(groups):
        raise ValueError(f"pair_indices: {len(prompts)} prompts but {len(groups)} groups")
    rank = {g: n for n, g in enumerate(order or [])}
    by_prompt: dict[Hashable, dict[Hashable, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index in range(len(prompts)) if rows is None else rows:
        by_prompt[prompts[index]][groups[index]].append(int(index))
    pairs: list[tuple[int, int]] = []
    for by_group in by_prompt.values():
        names = sorted(by_group, key=lambda g: (rank.get(g, len(rank)), str(g)))
        for a, b in itertools.combinations(names, 2):
            pairs.extend(itertools.product(by_group[a], by_group[b]) if every else zip(by_group[a], by_group[b]))
    return pairs


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
