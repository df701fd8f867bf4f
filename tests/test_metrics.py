"""Calibration and selective-prediction metrics against independent computations (numpy, scikit-learn)."""

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from trl_renyi.evaluation.metrics import (
    accuracy_at_coverage,
    brier_score,
    choice_outcomes,
    error_detection_auroc,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    risk_coverage_curve,
    summarize,
)


def random_problem(seed=0, n=200, num_choices=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, num_choices)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # labels drawn from the predictions, so the model is roughly calibrated and makes errors
    y = np.array([rng.choice(num_choices, p=p) for p in probs])
    labels = np.eye(num_choices, dtype=int)[y]
    return probs, labels, y


def numpy_ece(confidence, correct, n_bins):
    """Guo et al. (2017): bins (lo, hi], weight |B|/N, |acc − conf|."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_matches_numpy_and_reliability_bins(n_bins):
    probs, labels, y = random_problem(seed=n_bins)
    outcomes = choice_outcomes(list(probs), list(labels))
    confidence, correct = probs.max(1), probs.argmax(1) == y
    np.testing.assert_allclose(outcomes["confidence"].numpy(), confidence)
    np.testing.assert_array_equal(outcomes["correct"].numpy(), correct)
    ece = expected_calibration_error(confidence, correct, n_bins)
    assert ece == pytest.approx(numpy_ece(confidence, correct, n_bins), abs=1e-6)
    bins = reliability_bins(confidence, correct, n_bins)
    assert sum(bins["count"]) == len(y)
    from_bins = sum(
        c / len(y) * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c > 0
    )
    assert from_bins == pytest.approx(ece, abs=1e-6)
    assert ece > 0


def test_ece_of_fixed_inputs():
    # two bins of [0, 0.5) and [0.5, 1]: {0.3 wrong} and {0.6 right, 0.9 right, 0.8 wrong}
    confidence = [0.3, 0.6, 0.9, 0.8]
    correct = [False, True, True, False]
    expected = 0.25 * abs(0 - 0.3) + 0.75 * abs(2 / 3 - (0.6 + 0.9 + 0.8) / 3)
    assert expected_calibration_error(confidence, correct, n_bins=2) == pytest.approx(expected, abs=1e-7)


def test_brier_and_nll_match_sklearn():
    probs, labels, y = random_problem(seed=3, num_choices=3)
    assert brier_score(list(probs), list(labels)) == pytest.approx(
        brier_score_loss(y, probs, labels=[0, 1, 2], scale_by_half=False), rel=1e-9
    )
    prob_true = choice_outcomes(list(probs), list(labels))["prob_true"]
    assert negative_log_likelihood(prob_true) == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-9)


def test_brier_with_varying_choice_counts_and_several_true_answers():
    probs = [[0.7, 0.3], [0.2, 0.5, 0.3], [0.1, 0.2, 0.3, 0.4]]
    labels = [[1, 0], [0, 0, 1], [1, 1, 0, 0]]
    expected = np.mean(
        [
            (0.7 - 1) ** 2 + 0.3**2,
            0.2**2 + 0.5**2 + (0.3 - 1) ** 2,
            (0.1 - 0.5) ** 2 + (0.2 - 0.5) ** 2 + 0.3**2 + 0.4**2,
        ]
    )
    assert brier_score(probs, labels) == pytest.approx(expected)
    outcomes = choice_outcomes(probs, labels)
    assert outcomes["correct"].tolist() == [True, False, False]
    np.testing.assert_allclose(outcomes["prob_true"].numpy(), [0.7, 0.3, 0.3])


def test_auroc_matches_sklearn():
    probs, labels, y = random_problem(seed=7)
    correct = probs.argmax(1) == y
    entropy = -(probs * np.log(probs)).sum(1)
    assert error_detection_auroc(entropy, correct) == pytest.approx(roc_auc_score(~correct, entropy), abs=1e-6)
    # ties count one half
    assert error_detection_auroc([1, 1, 0, 0], [False, True, True, True]) == pytest.approx(
        roc_auc_score([1, 0, 0, 0], [1, 1, 0, 0])
    )
    assert math.isnan(error_detection_auroc([0.1, 0.2], [True, True]))


def test_accuracy_at_coverage_and_curve_match_an_independent_count():
    rng = np.random.default_rng(11)
    uncertainty = rng.random(37)
    correct = rng.random(37) < 1 - uncertainty  # more certain answers are right more often
    for coverage in (0.1, 0.5, 0.8, 1.0):
        keep = math.ceil(coverage * 37)
        chosen = np.argsort(uncertainty, kind="stable")[:keep]
        assert accuracy_at_coverage(uncertainty, correct, coverage) == pytest.approx(correct[chosen].mean())
    curve = risk_coverage_curve(uncertainty, correct)
    assert curve["accuracy"][-1] == pytest.approx(correct.mean())
    assert curve["accuracy"][9] == pytest.approx(correct[np.argsort(uncertainty)[:10]].mean())
    # ties are broken by item order
    assert accuracy_at_coverage([0.5, 0.5, 0.5, 0.1], [False, True, True, True], 0.5) == 0.5
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(uncertainty, correct, 0.0)


def test_summarize_and_input_errors():
    probs, labels, y = random_problem(seed=5)
    entropy = -(probs * np.log(probs)).sum(1)
    report = summarize(list(probs), list(labels), {"entropy": entropy}, n_bins=10, coverages=(0.5,))
    correct = probs.argmax(1) == y
    assert report["accuracy"] == pytest.approx(correct.mean())
    assert report["auroc"]["max_prob"] == pytest.approx(roc_auc_score(~correct, 1 - probs.max(1)), abs=1e-6)
    assert report["auroc"]["entropy"] == pytest.approx(roc_auc_score(~correct, entropy), abs=1e-6)
    assert set(report["selective_accuracy"]["entropy"]) == {"0.5"}
    with pytest.raises(ValueError, match="sum to 1"):
        summarize([[0.5, 0.6]], [[1, 0]])
    with pytest.raises(ValueError, match="labels"):
        summarize([[0.5, 0.5]], [[1, 0, 0]])
    with pytest.raises(ValueError, match="same length"):
        expected_calibration_error([0.5], [True, False])
