r"""Metrics of a predicted label distribution against a human one (many annotators per item, as in ChaosNLI).

For item i with human label distribution :math:`h_i` (vote shares) and predicted distribution :math:`p_i`, as defined
by ChaosNLI (Nie et al., 2020) and used by its scoreboard:

* the predicted distribution is clipped at :math:`10^{-15}` and renormalised;
* JSD, the Jensen–Shannon *distance* (SciPy's ``jensenshannon``, natural log):
  :math:`\sqrt{\tfrac12 \mathrm{KL}(h_i\|m_i) + \tfrac12 \mathrm{KL}(p_i\|m_i)}` with :math:`m_i = (h_i + p_i)/2`;
* KL, :math:`\mathrm{KL}(h_i \| p_i) = \sum_c h_{ic} \log (h_{ic}/p_{ic})` (SciPy's ``entropy(h, p)``);

each averaged over items. The human entropy :math:`H(h_i)` measures how contested item i is; the majority share
:math:`\max_c h_{ic}` is what "contested" (< 0.6) and "agreed" (≥ 0.8) are defined by in the human-disagreement study.
Rank correlations are Spearman's ρ (torchmetrics), ``nan`` when either side is constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.regression import spearman_corrcoef

#: ChaosNLI's scorer clips predicted distributions here (kept for comparability with its scoreboard)
CHAOSNLI_FLOOR = 1e-15


def _rows(values: Sequence) -> torch.Tensor:
    rows = torch.as_tensor([list(map(float, v)) for v in values], dtype=torch.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError("expected a non-empty list of distributions of equal length")
    if (rows < 0).any() or (rows.sum(-1) <= 0).any():
        raise ValueError("distributions must be non-negative with a positive sum")
    return rows / rows.sum(-1, keepdim=True)


def clipped(predicted: Sequence) -> torch.Tensor:
    """Predicted distributions clipped at 1e-15 and renormalised (ChaosNLI's numerical guard)."""
    p = _rows(predicted).clamp_min(CHAOSNLI_FLOOR)
    return p / p.sum(-1, keepdim=True)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    terms = torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.log()), torch.zeros_like(a))
    return terms.sum(-1)


def kl_divergences(human: Sequence, predicted: Sequence) -> torch.Tensor:
    """Per item :math:`\\mathrm{KL}(h_i \\| p_i)` in nats."""
    h, p = _rows(human), clipped(predicted)
    _same_shape(h, p)
    return _kl(h, p)


def jensen_shannon_distances(human: Sequence, predicted: Sequence) -> torch.Tensor:
    """Per item Jensen–Shannon distance (square root of the divergence, natural log), as ChaosNLI reports."""
    h, p = _rows(human), clipped(predicted)
    _same_shape(h, p)
    m = (h + p) / 2
    return (0.5 * _kl(h, m) + 0.5 * _kl(p, m)).clamp_min(0).sqrt()


def entropies(distributions: Sequence) -> torch.Tensor:
    """Per item entropy in nats."""
    d = _rows(distributions)
    return -torch.where(d > 0, d * d.clamp_min(1e-300).log(), torch.zeros_like(d)).sum(-1)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); ``nan`` when x or y is constant."""
    a, b = torch.as_tensor(list(x), dtype=torch.float64), torch.as_tensor(list(y), dtype=torch.float64)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"spearman needs two sequences of equal length ≥ 2, got {a.numel()} and {b.numel()}")
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return math.nan
    return float(spearman_corrcoef(a, b))


def _same_shape(h: torch.Tensor, p: torch.Tensor) -> None:
    if h.shape != p.shape:
        raise ValueError(f"human and predicted distributions differ in shape: {tuple(h.shape)} vs {tuple(p.shape)}")
