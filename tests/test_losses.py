"""The debiasing objectives (debias.losses): hand-computed values, symmetry, gradient directions, pairing."""

import itertools
import math
from collections import Counter

import pytest
import torch

from debias.losses import (
    balanced_preference_loss,
    balanced_preference_loss_from_logits,
    dpo_loss,
    frequency_weights,
    ipo_loss,
    log_odds,
    pair_indices,
    reweighted_likelihood_loss,
)


def test_bpo_is_zero_at_equal_logprobs_and_symmetric():
    a = torch.tensor([-3.0, -0.5, -9.0])
    b = torch.tensor([-1.0, -2.0, -9.5])
    assert balanced_preference_loss(a, a).item() == 0.0
    ab, ba = balanced_preference_loss(a, b, reduction="none"), balanced_preference_loss(b, a, reduction="none")
    assert torch.equal(ab, ba)
    assert (balanced_preference_loss(a, b, reduction="none") > 0).all()


def test_bpo_equals_hand_computed_value():
    li, lj, beta = -0.5, -2.0, 1.5
    pi, pj = math.exp(li), math.exp(lj)
    d = beta * (math.log(pi / (1 - pi)) - math.log(pj / (1 - pj)))
    expected = math.log(1 + (1 / (1 + math.exp(-d)) - 0.5) ** 2)
    got = balanced_preference_loss(torch.tensor([li], dtype=torch.float64), torch.tensor([lj], dtype=torch.float64),
                                   beta)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bpo_gradient_lowers_the_more_likely_image():
    li = torch.tensor([-1.0], requires_grad=True)  # more likely
    lj = torch.tensor([-4.0], requires_grad=True)
    balanced_preference_loss(li, lj).backward()
    assert li.grad.item() > 0  # gradient descent lowers log p_i
    assert lj.grad.item() < 0  # and raises log p_j


def test_log_odds_is_finite_and_accurate_at_extremes():
    x = torch.tensor([0.0, -1e-12, -1e-3, -0.69, -0.7, -20.0, -800.0], dtype=torch.float64)
    lo = log_odds(x)
    assert torch.isfinite(lo).all()
    p = torch.exp(torch.tensor([-1e-3, -0.69, -0.7, -20.0], dtype=torch.float64))
    assert torch.allclose(lo[2:6], torch.log(p) - torch.log1p(-p), rtol=1e-10)
    g = torch.tensor([-20.0, -1e-3], requires_grad=True)
    log_odds(g).sum().backward()
    assert torch.isfinite(g.grad).all()


def all_pairs(k: int) -> list[tuple[int, int]]:
    """The ``k(k-1)/2`` unordered index pairs ``(a, b)``, ``a < b``, of ``k`` groups, in lexicographic order."""
    return list(itertools.combinations(range(k), 2))


def balanced_preference_loss_all_pairs(
    mean_logps: torch.Tensor, beta: float = 1.0, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Oracle of the K-group BPO loss: the mean of the pair loss over all K(K-1)/2 group pairs of every row.

    Row ``n`` holds one image per group for one neutral prompt (column ``k`` = group ``k``); ``present`` masks the
    groups that have an image, pairs with a missing group are left out of the mean.
    """
    pairs = all_pairs(mean_logps.shape[1])
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    per = balanced_preference_loss(mean_logps[:, a], mean_logps[:, b], beta, reduction="none")  # (N, P)
    if present is None:
        return per.mean()
    valid = (present[:, a] & present[:, b]).to(per.dtype)
    return (per * valid).sum() / valid.sum()


def test_all_pairs_oracle_is_the_mean_over_every_group_pair():
    torch.manual_seed(0)
    logps = -torch.rand(3, 4) * 5
    expected = torch.stack([
        balanced_preference_loss(logps[:, a], logps[:, b], 0.7, reduction="none") for a, b in all_pairs(4)
    ]).mean()
    assert len(all_pairs(4)) == 6 and len(all_pairs(2)) == 1
    assert torch.allclose(balanced_preference_loss_all_pairs(logps, 0.7), expected)
    present = torch.ones(3, 4, dtype=torch.bool)
    present[0, 3] = False  # row 0 has no image of group 3: its 3 pairs with group 3 are left out
    per = torch.stack([balanced_preference_loss(logps[:, a], logps[:, b], 0.7, reduction="none")
                       for a, b in all_pairs(4)], 1)
    mask = torch.tensor([[not (n == 0 and 3 in pair) for pair in all_pairs(4)] for n in range(3)])
    assert torch.allclose(balanced_preference_loss_all_pairs(logps, 0.7, present), per[mask].mean())


@pytest.mark.parametrize("drop", [False, True])
def test_pairs_by_index_give_the_k_group_loss(drop):
    # What the trainers compute: pair_indices over image rows, then the pair loss of each pair, mean over pairs.
    torch.manual_seed(0)
    logps = -torch.rand(3, 4) * 5  # 3 prompts x 4 groups, one image each
    present = torch.ones(3, 4, dtype=torch.bool)
    if drop:
        present[0, 3] = False  # prompt 0 has no image of group 3
    cells = [(n, g) for n in range(3) for g in range(4) if present[n, g]]
    perm = torch.randperm(len(cells)).tolist()  # the row order must not matter
    cells = [cells[i] for i in perm]
    flat = torch.stack([logps[n, g] for n, g in cells])
    pairs = pair_indices([n for n, _ in cells], [g for _, g in cells])
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    got = balanced_preference_loss(flat[i], flat[j], 0.7)
    assert len(pairs) == 3 * 6 - 3 * drop
    assert torch.allclose(got, balanced_preference_loss_all_pairs(logps, 0.7, present if drop else None))


def test_bpo_from_logits_is_the_loss_of_d():
    d = torch.tensor([-3.0, -0.5, 0.0, 2.5], dtype=torch.float64)
    expected = torch.log1p((torch.sigmoid(d) - 0.5) ** 2)
    got = balanced_preference_loss_from_logits(d, "none")
    assert torch.allclose(got, expected, rtol=1e-12, atol=0.0)
    assert torch.equal(got, balanced_preference_loss_from_logits(-d, "none"))
    assert balanced_preference_loss_from_logits(torch.zeros(3)).item() == 0.0
    assert balanced_preference_loss_from_logits(d).item() == pytest.approx(expected.mean().item(), rel=1e-12)


def test_dpo_and_ipo_match_their_formulas():
    pi, pj, ri, rj = map(lambda v: torch.tensor([v], dtype=torch.float64), (-10.0, -12.0, -11.0, -11.5))
    margin = (-10.0 + 11.0) - (-12.0 + 11.5)
    assert dpo_loss(pi, pj, ri, rj, 0.1).item() == pytest.approx(math.log1p(math.exp(-0.1 * margin)))
    assert ipo_loss(pi, pj, ri, rj, 0.5).item() == pytest.approx((margin - 1.0) ** 2)


@pytest.mark.parametrize("k", [2, 4])
def test_pair_indices_cover_every_group_pair_of_every_prompt(k):
    groups = [f"g{n}" for n in range(k)]
    prompts, rows = [], []
    for p in ["nurse", "pilot", "judge"]:
        for g in groups:
            for seed in range(3):
                prompts.append(p)
                rows.append(g)
    # shuffle the row order: pairing must not depend on it
    order = list(range(len(rows)))
    torch.manual_seed(1)
    order = [order[i] for i in torch.randperm(len(order)).tolist()]
    prompts = [prompts[i] for i in order]
    rows = [rows[i] for i in order]

    pairs = pair_indices(prompts, rows)
    assert len(pairs) == 3 * (k * (k - 1) // 2) * 3
    assert len(set(pairs)) == len(pairs)
    for i, j in pairs:
        assert prompts[i] == prompts[j] and rows[i] != rows[j]
    for p in ["nurse", "pilot", "judge"]:
        seen = Counter(frozenset((rows[i], rows[j])) for i, j in pairs if prompts[i] == p)
        assert set(seen) == {frozenset(c) for c in itertools.combinations(groups, 2)}
        assert set(seen.values()) == {3}
    uses = Counter(i for pair in pairs for i in pair)
    assert set(uses.values()) == {k - 1}  # balanced data: every image once against each other group


def test_pair_indices_follow_the_given_group_order():
    pairs = pair_indices(["p", "p", "p"], ["male", "female", "male"], order=["female", "male"])
    assert pairs == [(1, 0)]  # female first, paired with the first male row; the second male has no partner
    prompts, groups, order = ["p", "p", "p"], ["male", "female", "male"], ["female", "male"]
    # the given rows, in their order: the filter drops row 0, so row 2 is now the first male row
    assert pair_indices(prompts, groups, order, rows=[2, 1]) == [(1, 2)]
    # every: each female row with each male row
    assert pair_indices(prompts, groups, order, every=True) == [(1, 0), (1, 2)]


def test_frequency_weights_hard_soft_and_clip():
    shares = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    target = torch.tensor([0.5, 0.5])
    w = frequency_weights(torch.tensor([0, 1]), shares, target, clip=5.0)
    assert torch.allclose(w, torch.tensor([0.625, 1.0]))
    soft = frequency_weights(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), shares, target)
    assert torch.allclose(soft, torch.tensor([0.5 * 0.625 + 0.5 * 2.5, 1.0]))
    clipped = frequency_weights(torch.tensor([1]), torch.tensor([0.99, 0.01]), target, clip=4.0)
    assert clipped.item() == pytest.approx(4.0)


def test_reweighted_likelihood_is_an_unbiased_gradient_of_the_group_marginal():
    """Exact expectation over a categorical 'generator' of 6 images in 3 groups equals grad KL(target || shares)."""
    torch.manual_seed(0)
    logits = torch.randn(6, requires_grad=True)
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.tensor([0.2, 0.3, 0.5])

    probs = logits.softmax(0)
    shares = torch.zeros(3).index_add(0, group, probs)
    kl = (target * (target.log() - shares.log())).sum()
    (expected,) = torch.autograd.grad(kl, logits)

    shares_now = shares.detach()
    weights = frequency_weights(group, shares_now, target, clip=100.0)
    logp = logits.log_softmax(0)
    # E_y[loss(y)] with the sampling probabilities held fixed (score-function estimator), enumerated exactly
    total = sum(probs[y].detach() * reweighted_likelihood_loss(logp[y:y + 1], weights[y:y + 1]) for y in range(6))
    (got,) = torch.autograd.grad(total, logits)
    assert torch.allclose(got, expected, atol=1e-6)

    # at the target every weight is 1 and, with the baseline, every sample's gradient vanishes
    w_at_target = frequency_weights(group, target, target)
    assert torch.allclose(w_at_target, torch.ones(6))
    assert reweighted_likelihood_loss(logp, w_at_target).item() == 0.0
