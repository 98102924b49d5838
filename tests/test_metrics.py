"""Oracle tests for audit.metrics: hand-computed values, edge cases, coverage and input errors."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import integrate, optimize

from audit import metrics as M
from generators.config import UserError

Z = 1.959963984540054  # standard normal 0.975 quantile


def _norm_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _summary(labels, k=2, probs=None, n_images=None, n_abstain=None, **kw):
    r = len(labels)
    return M.summarize_attribute(
        prompts=[f"p{i}" for i in range(r)],
        labels=[np.asarray(lab, dtype=np.int64) for lab in labels],
        probs=probs,
        classes=[f"c{i}" for i in range(k)],
        n_images=n_images if n_images is not None else [len(lab) for lab in labels],
        n_abstain=n_abstain if n_abstain is not None else [0] * r,
        **kw,
    )


# ------------------------------------------------------------------------------------------------ point metrics


def test_rd_hand_values():
    assert M.rd([0.7, 0.3]) == pytest.approx(0.4)
    # pairs: .1 .2 .3 .1 .2 .1 -> 1.0 / 6
    assert M.rd([0.4, 0.3, 0.2, 0.1]) == pytest.approx(1.0 / 6)
    assert M.rd([0.25] * 4) == 0.0
    assert M.rd([0.8, 0.2]) == pytest.approx(0.6)
    assert M.rd([0.7, 0.1, 0.1, 0.1]) == pytest.approx((3 * 0.6 + 3 * 0.0) / 6)
    np.testing.assert_allclose(M.rd([[0.5, 0.5], [0.9, 0.1]]), [0.0, 0.8])


@pytest.mark.parametrize("k, expected", [(2, 1.0), (4, 0.5), (8, 0.25)])
def test_rd_all_mass_in_one_class(k, expected):
    assert M.rd(np.eye(k)[k - 1]) == pytest.approx(expected)
    s = _summary([[k - 1] * 20, [0] * 5], k=k)
    assert s["rd"] == pytest.approx(expected)
    assert s["rd_ci"] == pytest.approx([expected, expected])


def test_rd_gender_x_race_joint_cells():
    gender = np.array([1, 1, 1, 1])
    race = np.array([2, 2, 2, 2])
    cells = M.joint_labels(gender, race, 2, 4)
    assert cells.tolist() == [6, 6, 6, 6]
    classes = M.joint_classes(["male", "female"], ["White", "Black", "Indian", "Asian"])
    assert len(classes) == 8 and classes[6] == "female/Indian"
    s = M.summarize_attribute(["a"], [cells], None, classes, [4], [0], n_boot=10)
    assert s["rd"] == pytest.approx(0.25)
    # balanced over the 8 cells -> 0
    g, r = np.repeat([0, 1], 4), np.tile([0, 1, 2, 3], 2)
    assert M.rd(np.bincount(M.joint_labels(g, r, 2, 4), minlength=8) / 8) == pytest.approx(0.0)
    with pytest.raises(UserError) as err:
        M.joint_labels([0, 2], [1, 1], 2, 4)
    assert str(err.value) == "a: class index 2 is out of range for 2 classes; pass indices in 0..1"


def test_joint_probs_is_outer_product():
    pa = np.array([[0.8, 0.2]])
    pb = np.array([[0.1, 0.2, 0.3, 0.4]])
    jp = M.joint_probs(pa, pb)
    np.testing.assert_allclose(jp, [[0.08, 0.16, 0.24, 0.32, 0.02, 0.04, 0.06, 0.08]])


def test_kl_hand_values():
    # 0.75 ln 1.5 + 0.25 ln 0.5
    assert M.kl([0.75, 0.25]) == pytest.approx(0.1308120, abs=1e-6)
    # 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    assert M.kl([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.2231436, abs=1e-6)
    assert M.kl([1.0, 0.0]) == pytest.approx(math.log(2))
    assert M.kl([0.5, 0.5]) == pytest.approx(0.0)
    assert M.kl([0.5, 0.5], [1.0, 0.0]) == math.inf


def test_entropy_hand_values():
    assert M.entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert M.entropy([1.0, 0.0]) == pytest.approx(0.0)
    # -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2
    assert M.entropy([0.75, 0.25]) == pytest.approx(0.8112781, abs=1e-6)


def test_rb_hand_values():
    assert M.rb([0.7, 0.2, 0.1, 0.0]) == pytest.approx(0.45)
    assert M.rb([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3)


def test_ab_hand_values():
    # pooled over 10 + 30 faces: P(c0) = (9 + 9) / 40 = 0.45; cells |0.9 - 0.45| = 0.45, |0.3 - 0.45| = 0.15
    assert M.ab([[0.9, 0.1], [0.3, 0.7]], weights=[10, 30]) == pytest.approx(0.45)
    # 3 classes, counts (8, 1, 1) and (6, 12, 12): pooled (14, 13, 13) / 40 = (.35, .325, .325); the largest cell
    # is |0.8 - 0.35| = 0.45 at (c0, p0), the others are 0.225, 0.15, 0.075.
    s = _summary([[0] * 8 + [1, 2], [0] * 6 + [1] * 12 + [2] * 12], k=3)
    assert s["ab"] == pytest.approx(0.45)
    assert s["ab_at"] == {"class": "c0", "prompt": "p0"}
    assert s["shares"] == pytest.approx([0.35, 0.325, 0.325])
    assert s["rb"] == pytest.approx(0.35 - 1 / 3)


def test_metric_directions():
    for name in ("rd", "kl", "entropy", "rb", "ab", "no_face_rate", "abstain_rate", "clip_score"):
        assert name in M.METRICS
    assert M.METRICS["rd"].lower_is_better and M.METRICS["ab"].lower_is_better
    assert not M.METRICS["entropy"].lower_is_better
    assert not M.METRICS["clip_score"].lower_is_better
    with pytest.raises(UserError) as err:
        M.get_metric("rdd")
    assert "did you mean 'rd'" in str(err.value)


# ---------------------------------------------------------------------------------------------------- intervals


def test_wilson_8_of_10():
    # centre (0.8 + z^2/20) / (1 + z^2/10), half z / (1 + z^2/10) * sqrt(0.016 + z^2/400)
    low, high = M.wilson_interval(8, 10)
    assert float(low) == pytest.approx(0.4901625, abs=1e-6)
    assert float(high) == pytest.approx(0.9433178, abs=1e-6)


def test_wilson_boundaries():
    low, high = M.wilson_interval(0, 10)
    assert float(low) == pytest.approx(0.0, abs=1e-12)
    assert float(high) == pytest.approx(Z**2 / (10 + Z**2))
    low, high = M.wilson_interval(1, 1)  # a single image: [1 / (1 + z^2), 1]
    assert float(low) == pytest.approx(1 / (1 + Z**2))
    assert float(high) == pytest.approx(1.0)
    assert np.isnan(M.wilson_interval(0, 0)[0])


def _beta_cdf(x, a, b):
    # Independent of scipy.stats.beta: integrate the density directly.
    norm = math.gamma(a) * math.gamma(b) / math.gamma(a + b)
    return integrate.quad(lambda u: u ** (a - 1) * (1 - u) ** (b - 1), 0, x)[0] / norm


def test_jeffreys_8_of_10():
    low, high = M.jeffreys_interval(8, 10)
    assert float(low) == pytest.approx(0.4972255, abs=1e-6)
    assert float(high) == pytest.approx(0.9559406, abs=1e-6)
    assert _beta_cdf(float(low), 8.5, 2.5) == pytest.approx(0.025, abs=1e-6)
    assert _beta_cdf(float(high), 8.5, 2.5) == pytest.approx(0.975, abs=1e-6)


def test_jeffreys_boundaries():
    low, high = M.jeffreys_interval(0, 10)
    assert float(low) == 0.0
    assert _beta_cdf(float(high), 0.5, 10.5) == pytest.approx(0.975, abs=1e-6)
    assert float(M.jeffreys_interval(10, 10)[1]) == 1.0


@pytest.mark.parametrize("method", ["wilson", "jeffreys"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_interval_coverage(method, p):
    rng = np.random.default_rng(7)
    n = 160
    k = rng.binomial(n, p, size=2000)
    counts = np.stack([k, n - k], axis=1)
    ci = M.share_intervals(counts, 0.05, method)[:, 0]
    covered = ((ci[:, 0] <= p) & (p <= ci[:, 1])).mean()
    assert 0.93 <= covered <= 0.97, covered


def test_share_intervals_in_summary():
    s = _summary([[0] * 8 + [1] * 2])
    assert s["per_prompt"][0]["shares_ci"][0] == pytest.approx([0.4901625, 0.9433178], abs=1e-6)
    s = _summary([[0] * 8 + [1] * 2], interval="jeffreys")
    assert s["per_prompt"][0]["shares_ci"][0] == pytest.approx([0.4972255, 0.9559406], abs=1e-6)


# ---------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_data_zero_width():
    counts = np.array([[160, 0, 0, 0], [0, 12, 0, 0], [0, 0, 0, 1]])
    value, low, high = M.bootstrap_rd(counts, n_boot=200)
    assert value == low == high == pytest.approx(0.5)


def test_bootstrap_small_case_by_hand():
    # Prompt A = (2, 0) has RD 1, prompt B = (1, 1) RD 0. Prompts are resampled with their images (no second,
    # within-prompt level): two draws give mean RD 1 (AA) w.p. 1/4, 0.5 (AB, BA) w.p. 1/2, 0 (BB) w.p. 1/4.
    counts = np.array([[2, 0], [1, 1]])
    reps = M.bootstrap_replicates(counts, n_boot=40000, seed=1)["rd"]
    freq = [np.mean(reps == v) for v in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(freq, [1 / 4, 1 / 2, 1 / 4], atol=0.01)
    # With 2 prompts the expanded interval takes the extreme replicates (t with 1 df): [0, 1], up to the re-centring.
    value, low, high = M.bootstrap_rd(counts, n_boot=40000, seed=1)
    assert value == pytest.approx(0.5)
    assert low == pytest.approx(0.0, abs=0.005) and high == pytest.approx(1.0, abs=0.005)


def test_bootstrap_single_prompt_resamples_its_images():
    # One prompt (1, 1): nothing to resample between prompts, so its two images are: RD 1 w.p. 1/2, 0 w.p. 1/2.
    reps = M.bootstrap_replicates(np.array([[1, 1]]), n_boot=40000, seed=2)["rd"]
    np.testing.assert_allclose([np.mean(reps == 0), np.mean(reps == 1)], [0.5, 0.5], atol=0.01)


def test_expanded_percentile_level():
    # z_{a'/2} = sqrt(n / (n - 1)) t_{0.975, n-1}: n = 8 gives sqrt(8/7) * 2.3646 = 2.5279, a' = 0.01147.
    assert M.expanded_alpha(0.05, 8) == pytest.approx(2 * (1 - _norm_cdf(math.sqrt(8 / 7) * 2.364624)), rel=1e-5)
    assert M.expanded_alpha(0.05, 8) == pytest.approx(0.011474, abs=2e-6)
    assert M.expanded_alpha(0.05, None) == M.expanded_alpha(0.05, 1) == 0.05
    assert 0.049 < M.expanded_alpha(0.05, 100000) < 0.05


def test_bootstrap_interval_contains_estimate_for_balanced_generator():
    # A two-level bootstrap (prompts, then images again) centred its replicates well above the estimate here
    # (within-prompt noise counted twice); resampling prompts alone keeps them on it.
    rng = np.random.default_rng(3)
    k = rng.binomial(160, 0.5, size=200)
    counts = np.stack([k, 160 - k], axis=1)
    reps = M.bootstrap_replicates(counts, n_boot=500)["rd"]
    value, low, high = M.bootstrap_rd(counts, n_boot=500)
    assert abs(reps.mean() - value) < 0.002 < np.quantile(reps, 0.975) - np.quantile(reps, 0.025)
    assert low < value < high


def test_bootstrap_seeded_and_thread_independent(monkeypatch):
    rng = np.random.default_rng(0)
    counts = rng.multinomial(160, [0.5, 0.2, 0.2, 0.1], size=600)
    a = M.bootstrap_replicates(counts, n_boot=300, seed=5)
    monkeypatch.setattr(M.os, "cpu_count", lambda: 1)
    b = M.bootstrap_replicates(counts, n_boot=300, seed=5)
    c = M.bootstrap_replicates(counts, n_boot=300, seed=6)
    for m in a:
        np.testing.assert_array_equal(a[m], b[m])
    assert not np.array_equal(a["rd"], c["rd"])


def test_bootstrap_replicates_match_plain_metrics():
    rng = np.random.default_rng(2)
    counts = np.stack([rng.multinomial(m, [0.4, 0.3, 0.2, 0.1]) for m in rng.integers(1, 30, 12)])
    t = np.array([0.4, 0.3, 0.2, 0.1])
    reps = M.bootstrap_replicates(counts, t, n_boot=20, seed=3)
    # Re-draw the same resampled prompts (one chunk from the seed's stream) and evaluate with the plain functions.
    g = np.random.default_rng(3)
    idx = g.integers(0, 12, size=(20, 12))
    cc = counts[idx]
    for b in range(20):
        sh = cc[b] / cc[b].sum(1, keepdims=True)
        pooled = cc[b].sum(0) / cc[b].sum()
        assert reps["rd"][b] == pytest.approx(M.rd(sh).mean())
        assert reps["kl"][b] == pytest.approx(M.kl(sh, t).mean())
        assert reps["entropy"][b] == pytest.approx(M.entropy(sh).mean())
        assert reps["rb"][b] == pytest.approx(M.rb(pooled, t))
        assert reps["ab"][b] == pytest.approx(M.ab(sh, cc[b].sum(1)))


# -------------------------------------------------------------------------------------------------- edge cases


def test_prompt_with_zero_faces():
    s = _summary([[0, 0, 1, 1], []], n_images=[4, 5], n_abstain=[0, 1])
    empty = s["per_prompt"][1]
    assert empty["shares"] == [None, None]
    assert empty["shares_ci"] == [[None, None], [None, None]]
    assert empty["rd"] is None and empty["kl"] is None
    assert empty["n_faces"] == 1 and empty["n_classified"] == 0 and empty["no_face_rate"] == pytest.approx(0.8)
    assert s["n_prompts_empty"] == 1 and s["empty_prompts"] == ["p1"]
    assert s["rd"] == pytest.approx(0.0)  # only the balanced prompt counts
    assert s["no_face_rate"] == pytest.approx(4 / 9)
    assert s["abstain_rate"] == pytest.approx(1 / 5)
    json.dumps(s, allow_nan=False)
    assert np.isnan(M.shares_from_counts([0, 0])).all()
    assert np.isnan(M.rd(M.shares_from_counts([[0, 0]]))).all()


def test_no_prompt_has_faces():
    s = _summary([[], []], n_images=[3, 3])
    assert s["rd"] is None and s["rd_ci"] == [None, None] and s["ab"] is None
    assert s["no_face_rate"] == pytest.approx(1.0) and s["abstain_rate"] is None
    json.dumps(s, allow_nan=False)


def test_single_image():
    s = _summary([[1]], n_images=[1], probs=[np.array([[0.3, 0.7]])])
    pp = s["per_prompt"][0]
    assert pp["shares"] == [0.0, 1.0]
    assert pp["rd"] == pytest.approx(1.0) and pp["rd_soft"] == pytest.approx(0.4)
    assert pp["shares_ci"][1] == pytest.approx([1 / (1 + Z**2), 1.0])
    assert s["rd_ci"] == pytest.approx([1.0, 1.0])


def test_soft_shares_and_rates():
    probs = [np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([[0.2, 0.8]])]
    s = _summary([[0, 0], [1]], probs=probs, n_images=[4, 2], n_abstain=[1, 0])
    assert s["per_prompt"][0]["soft_shares"] == pytest.approx([0.75, 0.25])
    assert s["rd_soft"] == pytest.approx((0.5 + 0.6) / 2)
    assert s["soft_shares"] == pytest.approx([1.7 / 3, 1.3 / 3])
    assert s["no_face_rate"] == pytest.approx(2 / 6)  # faces = 2 + 1 abstained + 1
    assert s["abstain_rate"] == pytest.approx(1 / 4)


def test_summary_is_plain_json():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, 30) for _ in range(5)]
    probs = [np.full((30, 4), 0.25) for _ in range(5)]
    conf = np.full((4, 4), 0.1) + np.eye(4) * 0.6
    s = _summary(labels, k=4, probs=probs, n_images=[32] * 5, n_abstain=[1] * 5, confusion=conf, n_boot=50)

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert x is None or type(x) in (str, int, float, bool), type(x)

    walk(s)
    json.dumps(s, allow_nan=False)
    for key in ("rd", "rd_ci", "rd_soft", "kl", "entropy", "rb", "ab", "abstain_rate", "corrected", "per_prompt"):
        assert key in s
    assert set(s["per_prompt"][0]) >= {"prompt", "n_images", "n_faces", "n_abstain", "counts", "shares",
                                       "shares_ci", "soft_shares", "rd", "kl", "entropy"}


# -------------------------------------------------------------------------------------------------- correction


CONF = np.array(
    [
        [0.85, 0.05, 0.05, 0.05],
        [0.10, 0.80, 0.05, 0.05],
        [0.05, 0.15, 0.70, 0.10],
        [0.05, 0.05, 0.20, 0.70],
    ]
)


def test_correction_undoes_known_confusion():
    rng = np.random.default_rng(11)
    true = np.array([0.6, 0.25, 0.15, 0.0])
    y = rng.choice(4, size=200_000, p=true)
    pred = (rng.random(len(y))[:, None] > np.cumsum(CONF, axis=1)[y]).sum(axis=1)
    observed = np.bincount(pred, minlength=4) / len(pred)
    assert np.abs(observed - true).max() > 0.05  # the confusion really distorts the shares
    corrected = M.correct_shares(observed, CONF)
    np.testing.assert_allclose(corrected, true, atol=0.01)
    assert corrected.min() >= 0 and corrected.sum() == pytest.approx(1.0)


def test_correction_exact_and_projected():
    true = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(M.correct_shares(CONF.T @ true, CONF), true, atol=1e-10)
    # all observed mass in class 0 lies outside C^T(simplex): the result must be the best point on the simplex
    observed = np.array([1.0, 0.0, 0.0, 0.0])
    p = M.correct_shares(observed, CONF)
    assert p.min() >= 0 and p.sum() == pytest.approx(1.0)
    ref = optimize.minimize(
        lambda q: np.sum((CONF.T @ q - observed) ** 2),
        np.full(4, 0.25),
        method="SLSQP",
        bounds=[(0, 1)] * 4,
        constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1}],
        options={"ftol": 1e-14},
    )
    assert np.sum((CONF.T @ p - observed) ** 2) <= ref.fun + 1e-6
    np.testing.assert_allclose(p, ref.x, atol=1e-3)


def test_summary_reports_raw_and_corrected():
    labels = [np.array([0] * 85 + [1] * 5 + [2] * 5 + [3] * 5)]  # = C^T e_0 over 100 images
    s = M.summarize_attribute(["a"], labels, None, ["a", "b", "c", "d"], [100], [0], confusion=CONF, n_boot=20)
    assert s["shares"] == pytest.approx([0.85, 0.05, 0.05, 0.05])
    assert s["corrected"]["shares"] == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-9)
    assert s["corrected"]["rd"] == pytest.approx(0.5)
    assert s["rd"] == pytest.approx((3 * 0.8) / 6)


# ---------------------------------------------------------------------------------------------- paired change


def test_paired_identical_gives_no_change():
    x = [0.9, 0.5, 0.7, None, 0.2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy versions warn or raise on all-zero differences: we must not reach it
        res = M.paired_change(x, x)
    assert res["mean_change"] == 0.0 and res["ci"] == [0.0, 0.0]
    assert res["p_value"] == 1.0 and res["statistic"] == 0.0
    assert res["n"] == 4 and res["n_dropped"] == 1 and res["n_tied"] == 4
    assert res["changes"] == [0.0, 0.0, 0.0, None, 0.0]
    json.dumps(res, allow_nan=False)


def test_paired_clear_decrease():
    before = np.linspace(0.6, 0.95, 12)
    after = before - np.linspace(0.3, 0.52, 12)
    res = M.paired_change(before, after)
    assert res["mean_change"] == pytest.approx(-0.41)
    assert res["n_down"] == 12 and res["statistic"] == 0.0
    assert res["p_value"] == pytest.approx(2 / 2**12)  # exact: only the all-negative sign pattern is as extreme
    assert res["ci"][0] < -0.41 < res["ci"][1] < 0


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_probs_row_sum_message():
    with pytest.raises(UserError) as err:
        _summary([[0, 1]], probs=[np.array([[0.5, 0.5], [0.5, 0.3]])])
    assert str(err.value) == (
        "probs[0]: row 1 sums to 0.8, expected 1 (within 0.001); pass softmax probabilities, not logits or scores"
    )


def test_bad_lengths_message():
    with pytest.raises(UserError) as err:
        M.summarize_attribute(["a", "b"], [np.array([0])], None, ["m", "f"], [1, 1], [0, 0])
    assert str(err.value) == "labels: has 1 entries but prompts has 2; pass one entry per prompt, in prompt order"


def test_bad_label_and_count_messages():
    with pytest.raises(UserError) as err:
        _summary([[0, 2]])
    assert str(err.value) == "labels[0]: class index 2 is out of range for 2 classes; pass indices in 0..1"
    with pytest.raises(UserError) as err:
        _summary([[0, 1]], n_images=[1])
    assert str(err.value) == (
        "n_images[0]: 1 is fewer than the 2 classified + 0 abstained faces of that prompt; "
        "pass all images generated for the prompt, faces and no-face"
    )


def test_bad_shares_and_target_messages():
    with pytest.raises(UserError) as err:
        M.rd([0.5, 0.6])
    assert str(err.value) == "shares: must sum to 1 (within 0.001), got sum 1.1; divide counts by their total"
    with pytest.raises(UserError) as err:
        M.kl([0.5, 0.5], [0.2, 0.3, 0.5])
    assert str(err.value) == "target: expected shape (2,) to match 2 classes, got shape (3,); give one share per class"
    with pytest.raises(UserError) as err:
        _summary([[0]], target=[1.0, 0.0])
    assert str(err.value) == (
        "target: share of class 'c1' is 0, but every class needs a positive target for KL; "
        "drop the class from classes or give it a small positive share"
    )


def test_bad_confusion_message():
    with pytest.raises(UserError) as err:
        M.correct_shares([0.5, 0.5], [[0.9, 0.2], [0.1, 0.9]])
    assert str(err.value) == "confusion: row 0 sums to 1.1, expected 1; normalise each row (true class) to sum to 1"


def test_bad_paired_message():
    with pytest.raises(UserError) as err:
        M.paired_change([0.1, 0.2], [0.1])
    assert str(err.value) == (
        "after: has shape (1,) but before has shape (2,); pass one value per prompt, same prompts in the same order"
    )


# ------------------------------------------------------------------------------------ noise floor and debiased RD


def _balanced_gender_floor(n: int) -> float:
    # E|2X - n| / n for X ~ Binomial(n, 1/2), summed with exact integers.
    return sum(math.comb(n, x) * abs(2 * x - n) for x in range(n + 1)) / 2**n / n


@pytest.mark.parametrize("n", [1, 2, 7, 64, 160])
def test_rd_floor_gender_matches_exact_binomial_sum(n):
    assert M.expected_rd(n, [0.5, 0.5]) == pytest.approx(_balanced_gender_floor(n), abs=1e-12)
    assert M.rd_floor(np.array([[n, 0]]))[0] == pytest.approx(_balanced_gender_floor(n), abs=1e-12)


def test_rd_floor_values_and_monte_carlo():
    # The values DESIGN.md quotes, and a Monte-Carlo check within 0.005 for K = 2, 4, 8.
    for k, n, quoted in [(2, 160, 0.063), (4, 160, 0.044), (8, 160, 0.032), (2, 64, 0.099)]:
        exact = M.expected_rd(n, np.full(k, 1 / k))
        assert exact == pytest.approx(quoted, abs=0.0015)
        c = np.random.default_rng(k).multinomial(n, np.full(k, 1 / k), size=40_000)
        assert abs(M.rd(c / n).mean() - exact) < 0.005


def test_rd_floor_with_a_target_by_enumeration():
    # n = 2, target (0.8, 0.2): counts (1, 1) w.p. 0.32 give RD 0, the others RD 1 -> 0.68. n = 1: RD is always 1.
    assert M.rd_floor(np.array([[2, 0], [1, 0], [0, 0]]), target=[0.8, 0.2]) == pytest.approx([0.68, 1.0, np.nan],
                                                                                             nan_ok=True)
    # K = 3, n = 2, uniform: (2,0,0)-type outcomes (3 of them, prob 1/9 each) RD 2/3; (1,1,0)-type (prob 2/9 each)
    # RD (0 + 1/2 + 1/2) / 3 = 1/3 -> 3/9 * 2/3 + 6/9 * 1/3 = 4/9.
    assert M.expected_rd(2, [1 / 3, 1 / 3, 1 / 3]) == pytest.approx(4 / 9)


def test_debiased_rd_hand_values():
    # (3, 1): D = 2, h = 2 sqrt(4) = 4: (3 psi(1) - psi(3)) / 4 = (3/4 - 3/4) / 4 = 0.
    assert M.debiased_rd([3, 1]) == pytest.approx(0.0)
    # (10, 0): far outside the core, the plug-in 1.
    assert M.debiased_rd([10, 0]) == pytest.approx(1.0)
    # (5, 5): inside the core, (D^2 - m) / (n h) = -10 / (10 * 2 sqrt(10)).
    assert M.debiased_rd([5, 5]) == pytest.approx(-1 / (2 * math.sqrt(10)))
    assert math.isnan(M.debiased_rd([0, 0]))


def _exact_mean_debiased(n, p):
    """E[debiased_rd] for K = 2 by summing over every count (exact expectation)."""
    x = np.arange(n + 1)
    pmf = np.array([math.comb(n, int(i)) * p[1] ** i * p[0] ** (n - i) for i in x])
    return float(pmf @ M.debiased_rd(np.stack([n - x, x], axis=1)))


@pytest.mark.parametrize("n", [10, 40, 160])
def test_debiased_rd_is_exactly_unbiased_at_balance_and_between_zero_and_truth(n):
    assert _exact_mean_debiased(n, [0.5, 0.5]) == pytest.approx(0.0, abs=1e-12)
    for female in (0.52, 0.6, 0.7, 0.9, 0.98):
        mean, true = _exact_mean_debiased(n, [1 - female, female]), abs(2 * female - 1)
        assert -1e-12 <= mean <= true + 1e-12, (female, mean)  # shrinks towards 0, never beyond the truth
    assert _exact_mean_debiased(160, [0.1, 0.9]) == pytest.approx(0.8, abs=1e-6)  # clear skew: unbiased
    # Raw RD errs upwards by the floor at balance.
    assert M.expected_rd(n, [0.5, 0.5]) > 0


def test_debiased_rd_unbiased_at_balance_for_three_classes_by_enumeration():
    n = 9
    total = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            c = n - a - b
            prob = math.factorial(n) / (math.factorial(a) * math.factorial(b) * math.factorial(c)) / 3**n
            total += prob * M.debiased_rd([a, b, c])
    assert total == pytest.approx(0.0, abs=1e-12)


def test_rd_debiased_interval_two_classes_is_the_share_interval_mapped():
    counts = np.array([[80, 80], [150, 10], [0, 0]])
    ci = M.share_intervals(counts, 0.05)[:, 1]
    out = M.rd_debiased_intervals(counts, 0.05)
    lo, hi = ci[0]
    assert out[0].tolist() == pytest.approx([0.0, max(1 - 2 * lo, 2 * hi - 1)])  # contains 1/2: reaches 0
    lo, hi = ci[1]
    assert out[1].tolist() == pytest.approx([1 - 2 * hi, 1 - 2 * lo])
    assert np.isnan(out[2]).all()


def test_rd_debiased_interval_more_classes_brackets_and_reaches_zero_at_balance():
    counts = np.array([[40, 40, 40, 40], [150, 4, 3, 3]])
    out = M.rd_debiased_intervals(counts, 0.05, seed=1)
    assert out[0, 0] == 0.0 < out[0, 1] < 0.2
    raw, deb = M.rd(counts[1] / 160), M.debiased_rd(counts[1])
    assert out[1, 0] < deb <= raw < out[1, 1] <= 0.5
    np.testing.assert_array_equal(out, M.rd_debiased_intervals(counts, 0.05, seed=1))  # seeded


def test_summary_reports_floor_and_debiased_beside_rd():
    rng = np.random.default_rng(4)
    labels = [rng.integers(0, 2, 160) for _ in range(20)]
    s = _summary(labels, n_boot=300)
    assert s["rd_floor"] == pytest.approx(_balanced_gender_floor(160), abs=1e-12)
    assert abs(s["rd_debiased"]) < s["rd"]
    assert s["rd_debiased_ci"][0] == 0.0 and s["rd_debiased_ci"][1] == s["rd_ci"][1]  # indistinguishable from 0
    row = s["per_prompt"][0]
    assert row["rd_floor"] == s["rd_floor"]
    assert row["rd_debiased"] == pytest.approx(M.debiased_rd(np.bincount(labels[0], minlength=2)))
    assert len(row["rd_debiased_ci"]) == 2
    skewed = _summary([np.r_[np.zeros(150, int), np.ones(10, int)]] * 5, n_boot=100)
    assert skewed["rd_debiased"] == pytest.approx(skewed["rd"])
    assert skewed["rd_debiased_ci"][0] > 0


def test_metric_directions_cover_floor_and_debiased():
    assert M.get_metric("rd_floor").lower_is_better and M.get_metric("rd_debiased").lower_is_better


def test_corrected_intervals_two_classes_map_the_observed_interval():
    conf = np.array([[0.9, 0.1], [0.2, 0.8]])
    counts = np.array([[60, 40]])
    ci = M.share_intervals(counts, 0.05)
    out = M.corrected_intervals(ci, conf)
    # observed share of class 1: q1 = 0.1 p0 + 0.8 p1 = 0.1 + 0.7 p1, so p1 = (q1 - 0.1) / 0.7, monotone.
    lo, hi = ci[0, 1]
    assert out[0, 1].tolist() == pytest.approx([(lo - 0.1) / 0.7, (hi - 0.1) / 0.7])
    assert out[0, 0].tolist() == pytest.approx([1 - (hi - 0.1) / 0.7, 1 - (lo - 0.1) / 0.7])
    s = _summary([[0] * 60 + [1] * 40], confusion=conf, n_boot=20)
    np.testing.assert_allclose(s["corrected"]["per_prompt_shares_ci"][0], out[0], atol=1e-12)


# ----------------------------------------------------------------------------------------- signed-rank test


def test_signed_rank_exact_with_a_zero_difference():
    # 19 negative changes and one zero: dropping the zero, only the all-negative sign pattern of 19 is as extreme,
    # two-sided p = 2 / 2^19 = 3.8e-6 (scipy's own wilcoxon switches to the normal approximation: 1.3e-4).
    d = np.r_[-np.arange(1, 20), 0.0]
    res = M.signed_rank_test(d)
    assert res == {"statistic": 0.0, "p_value": 2 / 2**19, "method": "exact", "n_zero": 1}
    paired = M.paired_change(np.arange(20.0) + 20, np.arange(20.0) + 20 + d)
    assert paired["p_value"] == 2 / 2**19 and paired["test_method"] == "exact" and paired["n_tied"] == 1


def test_signed_rank_exact_with_ties_by_enumeration():
    # [1, 1, 2, -3, 0]: drop 0; |d| ranks 1.5, 1.5, 3, 4; W+ = 6, W- = 4. Of the 16 sign patterns, those with
    # W+ <= 4 are {}, {1.5}, {1.5'}, {1.5, 1.5'}, {3}, {4}: 6, so p = 2 * 6/16 = 0.75.
    assert M.signed_rank_test([1, 1, 2, -3, 0]) == {"statistic": 4.0, "p_value": 0.75, "method": "exact",
                                                   "n_zero": 1}
    assert M.signed_rank_test([0, 0])["p_value"] == 1.0
