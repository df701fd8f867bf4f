r"""Calibration and selective-prediction metrics for choice predictions (multiple choice, preference pairs).

Every item i has predicted probabilities :math:`p_{ic}` over its own C_i choices (C may differ between items) and a
0/1 label per choice (one 1 for single-answer tasks such as TruthfulQA mc1; several for mc2). With the predicted
choice :math:`\hat c_i = \arg\max_c p_{ic}`, the confidence :math:`\max_c p_{ic}`, the correctness
:math:`a_i = [y_{i\hat c_i} = 1]` and the target distribution :math:`t_{ic} = y_{ic} / \sum_c y_{ic}`:

* accuracy :math:`\frac1N \sum_i a_i`;
* NLL :math:`-\frac1N \sum_i \log \sum_{c:\,y_{ic}=1} p_{ic}` (the probability of answering with a true choice);
* ECE with M equal-width confidence bins :math:`B_m`:
  :math:`\sum_m \frac{|B_m|}{N} \big|\operatorname{acc}(B_m) - \operatorname{conf}(B_m)\big|` (torchmetrics);
* Brier score :math:`\frac1N \sum_i \sum_c (p_{ic} - t_{ic})^2` (range [0, 2], the multiclass definition, not halved
  for two choices);
* AUROC of an uncertainty score u for detecting errors: the probability that a wrong answer gets a higher u than a
  right one (torchmetrics; ``nan`` when all answers are right or all wrong);
* accuracy at coverage X: answer only the :math:`\lceil X N \rceil` most certain items (lowest u, ties in item order)
  and take their accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_calibration_error,
)

DEFAULT_COVERAGES = (0.5, 0.8)
#: the floor of a probability under a logarithm, wherever the library takes one (NLL, cross-entropies); a benchmark's
#: own scorer keeps its own (ChaosNLI's in :mod:`~trl_renyi.evaluation.distributions`, LeWiDi's in
#: :mod:`~trl_renyi.evaluation.group_conflicts`)
PROBABILITY_FLOOR = 1e-12


def _as_float(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def _as_bool(values) -> torch.Tensor:
    return torch.as_tensor(values).flatten().bool()


def _check_lengths(**tensors) -> int:
    sizes = {name: len(t) for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Metric inputs must have the same length, got {sizes}.")
    size = next(iter(sizes.values()))
    if size == 0:
        raise ValueError("Metrics need at least one item.")
    return size


def _probabilities(probs: Sequence) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(probs):
        p = torch.as_tensor(p, dtype=torch.float64).flatten()
        if p.numel() < 1 or not torch.isfinite(p).all() or (p < 0).any():
            raise ValueError(f"Item {i}: probabilities must be finite and non-negative, got {p.tolist()}.")
        if abs(float(p.sum()) - 1.0) > 1e-4:
            raise ValueError(f"Item {i}: probabilities must sum to 1, got sum {float(p.sum()):.6f}.")
        out.append(p)
    return out


def _labels(labels: Sequence, probs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, (y, p) in enumerate(zip(labels, probs, strict=True)):
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        if y.shape != p.shape:
            raise ValueError(f"Item {i}: {y.numel()} labels for {p.numel()} choices.")
        if not ((y == 0) | (y == 1)).all() or y.sum() < 1:
            raise ValueError(f"Item {i}: labels must be 0/1 with at least one 1, got {y.tolist()}.")
        out.append(y)
    return out


def choice_outcomes(probs: Sequence, labels: Sequence) -> dict[str, torch.Tensor]:
    """Per-item ``confidence`` (max probability), ``correct`` (the argmax is a true choice) and ``prob_true``
    (probability mass on the true choices), each ``(N,)``, from per-item probability vectors and 0/1 labels."""
    if len(probs) != len(labels):
        raise ValueError(f"Got {len(probs)} probability vectors but {len(labels)} label vectors.")
    probs = _probabilities(probs)
    labels = _labels(labels, probs)
    confidence = torch.stack([p.max() for p in probs])
    correct = torch.stack([y[p.argmax()] == 1 for p, y in zip(probs, labels, strict=True)])
    prob_true = torch.stack([(p * y).sum() for p, y in zip(probs, labels, strict=True)])
    return {"confidence": confidence, "correct": correct, "prob_true": prob_true}


def accuracy(correct) -> float:
    """Fraction of correct answers."""
    correct = _as_bool(correct)
    _check_lengths(correct=correct)
    return float(correct.double().mean())


def negative_log_likelihood(prob_true, eps: float = PROBABILITY_FLOOR) -> float:
    """Mean ``−log p(true answer)``, with probabilities floored at ``eps``."""
    p = _as_float(prob_true)
    _check_lengths(prob_true=p)
    return float(-(p.clamp(min=eps).log()).mean())


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins on [0, 1] (``torchmetrics`` binary calibration error of the
    confidence against the 0/1 correctness, L1 norm)."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    conf, corr = _as_float(confidence), _as_bool(correct)
    _check_lengths(confidence=conf, correct=corr)
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError("confidence values must lie in [0, 1].")
    return float(binary_calibration_error(conf.float(), corr.long(), n_bins=n_bins, norm="l1"))


def reliability_bins(confidence, correct, n_bins: int = 10) -> dict[str, list[float]]:
    """Equal-width confidence bins for a reliability diagram: ``lower``/``upper`` edges, ``count``, mean
    ``confidence`` and ``accuracy`` per bin (``nan`` for empty bins). Bins are ``[lower, upper)``; a confidence of
    exactly 1 falls in the last bin."""
    conf, corr = _as_float(confidence), _as_bool(correct).double()
    _check_lengths(confidence=conf, correct=corr)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, corr)
    safe = count.clamp(min=1)
    empty = count == 0
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "confidence": (conf_sum / safe).masked_fill(empty, math.nan).tolist(),
        "accuracy": (acc_sum / safe).masked_fill(empty, math.nan).tolist(),
    }


def brier_score(probs: Sequence, labels: Sequence) -> float:
    """Mean over items of ``Σ_c (p_c − t_c)²`` with ``t`` the labels normalised to a distribution."""
    if len(probs) != len(labels):
        raise ValueError(f"Got {len(probs)} probability vectors but {len(labels)} label vectors.")
    probs = _probabilities(probs)
    labels = _labels(labels, probs)
    _check_lengths(probs=probs)
    return float(torch.stack([((p - y / y.sum()) ** 2).sum() for p, y in zip(probs, labels, strict=True)]).mean())


def error_detection_auroc(uncertainty, correct) -> float:
    """AUROC of ``uncertainty`` as a detector of wrong answers (``nan`` if only one class is present)."""
    u, corr = _as_float(uncertainty), _as_bool(correct)
    _check_lengths(uncertainty=u, correct=corr)
    errors = (~corr).long()
    if errors.sum() == 0 or errors.sum() == len(errors):
        return math.nan
    return float(binary_auroc(u, errors))


def _selection_order(uncertainty) -> torch.Tensor:
    return torch.sort(uncertainty, stable=True).indices


def accuracy_at_coverage(uncertainty, correct, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage · N)`` items with the lowest uncertainty (ties broken by item order)."""
    if not (0.0 < float(coverage) <= 1.0):
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}.")
    u, corr = _as_float(uncertainty), _as_bool(correct)
    size = _check_lengths(uncertainty=u, correct=corr)
    keep = max(1, math.ceil(float(coverage) * size - 1e-9))
    return float(corr[_selection_order(u)[:keep]].double().mean())


def risk_coverage_curve(uncertainty, correct) -> dict[str, list[float]]:
    """Accuracy of the n most certain items for n = 1 … N: ``coverage`` (n / N) and ``accuracy`` lists."""
    u, corr = _as_float(uncertainty), _as_bool(correct)
    size = _check_lengths(uncertainty=u, correct=corr)
    hits = corr[_selection_order(u)].double().cumsum(0)
    n = torch.arange(1, size + 1, dtype=torch.float64)
    return {"coverage": (n / size).tolist(), "accuracy": (hits / n).tolist()}


def summarize(
    probs: Sequence,
    labels: Sequence,
    uncertainties: Mapping[str, Sequence] | None = None,
    n_bins: int = 10,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
) -> dict:
    """All metrics of one model: accuracy, NLL, ECE, Brier, and, for every uncertainty score (``max_prob``, i.e.
    ``1 − confidence``, is always included), its error-detection AUROC and the accuracy at each coverage."""
    outcomes = choice_outcomes(probs, labels)
    scores = {"max_prob": 1.0 - outcomes["confidence"]}
    for name, values in (uncertainties or {}).items():
        scores[name] = _as_float(values)
    correct = outcomes["correct"]
    return {
        "num_items": len(correct),
        "accuracy": accuracy(correct),
        "nll": negative_log_likelihood(outcomes["prob_true"]),
        "ece": expected_calibration_error(outcomes["confidence"], correct, n_bins),
        "brier": brier_score(probs, labels),
        "mean_confidence": float(outcomes["confidence"].mean()),
        "auroc": {name: error_detection_auroc(u, correct) for name, u in scores.items()},
        "selective_accuracy": {
            name: {f"{c:g}": accuracy_at_coverage(u, correct, c) for c in coverages} for name, u in scores.items()
        },
    }
