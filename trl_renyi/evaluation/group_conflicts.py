r"""Metrics of group conflicts: does the ensemble's epistemic uncertainty flag the items on which groups of people
disagree, and does a member speak for each group? (targets from :mod:`trl_renyi.data.group_conflicts`)

Inputs per item i: the mixture's choice distribution :math:`p_i`, the members' :math:`p_{ik}` (rows of a ``(K, C_i)``
matrix; items may have different numbers of options), the choice-level mutual information and total entropy, and
the targets (each group's distribution :math:`q_{ig}`, majority, the between-group JSD, contested or agreed).

* ``auroc_*_contested``: AUROC of a score separating contested (positive) from agreed items; a constant score (the MI
  of one member) gives 0.5. ``*_contested_vs_split``: the same against the *split-agreed* items only, agreed items
  whose mean within-group entropy is at or above the median over all evaluated items.
* :func:`best_members`: for each group g the member :math:`k^*_g = \arg\min_k \sum_i \mathrm{CE}(q_{ig}, p_{ik})`
  over contested *training* items (a member chosen on data it was trained on, evaluated on held-out items).
* :func:`group_alignment`: on held-out contested items, the share where :math:`\arg\max p_{ik^*_g}` is g's majority,
  averaged over groups.
* :func:`group_cross_entropy`: :math:`\frac1G \sum_g \frac1N \sum_i \mathrm{CE}(q_{ig}, \cdot)` under each group's
  best member (``best_member_group_nll``) or under the mixture (``group_nll``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from trl_renyi.evaluation.metrics import error_detection_auroc

PROBABILITY_FLOOR = 1e-12


def contested_auroc(scores: Sequence[float], contested: Sequence[bool]) -> float:
    """AUROC of ``scores`` for the contested items (``nan`` when only one kind is present; 0.5 for constant scores)."""
    # error_detection_auroc(u, ok) is the AUROC of u for "not ok"
    return error_detection_auroc(list(scores), [not c for c in contested])


def split_agreed_mask(contested: Sequence[bool], within_entropy: Sequence[float]) -> list[bool]:
    """Agreed items whose mean within-group entropy is at or above the median of all items."""
    median = statistics.median(within_entropy)
    return [not c and h >= median for c, h in zip(contested, within_entropy)]


def contested_vs_split_auroc(scores: Sequence[float], contested: Sequence[bool], within_entropy: Sequence[float]) -> float:
    """:func:`contested_auroc` over the contested items and the split-agreed ones only."""
    split = split_agreed_mask(contested, within_entropy)
    keep = [i for i in range(len(scores)) if contested[i] or split[i]]
    return contested_auroc([scores[i] for i in keep], [contested[i] for i in keep])


def cross_entropy(target: Sequence[float], predicted: Sequence[float]) -> float:
    r""":math:`-\sum_c q_c \log p_c` (nats), ``p`` floored at 1e-12."""
    return -sum(q * math.log(max(float(p), PROBABILITY_FLOOR)) for q, p in zip(target, predicted) if q > 0)


def best_members(member_probs: Sequence[torch.Tensor], group_distributions: Mapping[str, Sequence[Sequence[float]]]) -> dict:
    """``{group: k*}``: the member whose choice distributions best explain the group's votes (least total cross-entropy)
    over the given items; ``member_probs[i]`` is item i's ``(K, C_i)`` matrix."""
    if not member_probs:
        raise ValueError("best_members needs at least one item")
    num_members = member_probs[0].shape[0]
    best = {}
    for group, targets in group_distributions.items():
        totals = [sum(cross_entropy(q, probs[k].tolist()) for q, probs in zip(targets, member_probs)) for k in range(num_members)]
        best[group] = min(range(num_members), key=totals.__getitem__)
    return best


def group_alignment(member_probs: Sequence[torch.Tensor], majorities: Mapping[str, Sequence[int]], best: Mapping[str, int]) -> float:
    """Mean over groups of the share of items where the group's best member answers the group's majority."""
    if not member_probs:
        return math.nan
    shares = []
    for group, answers in majorities.items():
        k = best[group]
        shares.append(sum(int(probs[k].argmax()) == a for probs, a in zip(member_probs, answers)) / len(answers))
    return sum(shares) / len(shares)


def alignment_matrix(member_probs: Sequence[torch.Tensor], majorities: Mapping[str, Sequence[int]]) -> list[list[float]]:
    """``(K, G)``: the share of items where member k's top answer is group g's majority (the alignment heatmap)."""
    if not member_probs:
        return []
    num_members = member_probs[0].shape[0]
    return [
        [sum(int(p[k].argmax()) == a for p, a in zip(member_probs, answers)) / len(answers) for answers in majorities.values()]
        for k in range(num_members)
    ]


def group_cross_entropy(predicted: Mapping[str, Sequence[Sequence[float]]], group_distributions: Mapping[str, Sequence[Sequence[float]]]) -> float:
    """Mean over groups of the mean cross-entropy of each group's vote distributions under ``predicted[group]``."""
    values = []
    for group, targets in group_distributions.items():
        values.append(sum(cross_entropy(q, p) for q, p in zip(targets, predicted[group])) / len(targets))
    return sum(values) / len(values)
