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
import random
import statistics
from collections.abc import Mapping, Sequence

import torch

from trl_renyi.evaluation.metrics import PROBABILITY_FLOOR, error_detection_auroc


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


# ------------------------------------------------------------------------------------------ the field's own scores
#: LeWiDi 2023's scorer: predictions clipped to [1e-12, 1 − 1e-12], then ln(p + 1e-9)
LEWIDI_CLIP = 1e-12
LEWIDI_EPSILON = 1e-9


def lewidi_cross_entropy(targets: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]]) -> float:
    r"""LeWiDi 2023's soft-label cross-entropy, :math:`-\frac1N \sum_i \sum_c t_{ic} \ln(p_{ic} + 10^{-9})` with the
    predictions clipped to :math:`[10^{-12}, 1 - 10^{-12}]` and the targets the (pooled) vote shares."""
    if len(targets) != len(predicted) or not targets:
        raise ValueError(f"lewidi_cross_entropy needs as many predictions as targets (> 0), got {len(predicted)} and {len(targets)}")
    total = 0.0
    for target, prediction in zip(targets, predicted):
        for t, p in zip(target, prediction):
            p = min(max(float(p), LEWIDI_CLIP), 1.0 - LEWIDI_CLIP)
            total -= float(t) * math.log(p + LEWIDI_EPSILON)
    return total / len(targets)


def majority_label(distribution: Sequence[float]) -> int:
    """The most voted option; a tie goes to the first of the tied options (this project's rule: the organisers'
    tie-breaking is not part of the released files)."""
    return max(range(len(distribution)), key=lambda c: (distribution[c], -c))


def micro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Micro-averaged F1 of single-label predictions (equal to their accuracy), as LeWiDi reports it."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError("micro_f1 needs as many predictions as gold labels (> 0)")
    return sum(int(g == p) for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """F1 averaged over the labels present in ``gold`` or ``predicted`` (scikit-learn's ``average="macro"``; a label
    with no true and no predicted positive does not occur, so it is not averaged)."""
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(1 for g, p in zip(gold, predicted) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted) if g == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else math.nan


def training_prior(train_distributions: Sequence[Sequence[float]], widths: Sequence[int]) -> list[list[float]]:
    """The *training-prior baseline*: every evaluated item gets the mean training vote share of each option position
    (over the training items that have that position), renormalised to the item's number of options ``widths[i]``."""
    longest = max([len(d) for d in train_distributions] + list(widths))
    sums, counts = [0.0] * longest, [0] * longest
    for distribution in train_distributions:
        for c, share in enumerate(distribution):
            sums[c] += share
            counts[c] += 1
    means = [s / n if n else 0.0 for s, n in zip(sums, counts)]
    out = []
    for width in widths:
        part = means[:width]
        total = sum(part)
        out.append([p / total for p in part] if total > 0 else [1.0 / width] * width)
    return out


def per_annotator_macro_f1(
    train_member_probs: Sequence[torch.Tensor],
    train_votes: Sequence[Sequence[tuple[str, int]]],
    held_member_probs: Sequence[torch.Tensor],
    held_votes: Sequence[Sequence[tuple[str, int]]],
) -> dict:
    """Per-annotator macro-F1, as perspectivist systems report it: each annotator's own labels on the evaluated items,
    predicted by the member that explains that annotator best on the training items (largest summed log-probability of
    their votes). ``*_member_probs[i]`` is item i's ``(K, C_i)`` matrix, ``*_votes[i]`` its ``(annotator, option)``
    votes. Returns ``{"mean": …, "annotators": {annotator: F1}, "members": {annotator: k}}``."""
    num_members = train_member_probs[0].shape[0] if train_member_probs else held_member_probs[0].shape[0]
    fit: dict[str, list[float]] = {}
    for probs, votes in zip(train_member_probs, train_votes):
        for annotator, option in votes:
            scores = fit.setdefault(annotator, [0.0] * num_members)
            for k in range(num_members):
                scores[k] += math.log(max(float(probs[k, option]), PROBABILITY_FLOOR))
    members = {a: max(range(num_members), key=s.__getitem__) for a, s in fit.items()}
    gold: dict[str, list[int]] = {}
    predicted: dict[str, list[int]] = {}
    for probs, votes in zip(held_member_probs, held_votes):
        for annotator, option in votes:
            k = members.get(annotator, 0)
            gold.setdefault(annotator, []).append(option)
            predicted.setdefault(annotator, []).append(int(probs[k].argmax()))
    scores = {a: macro_f1(gold[a], predicted[a]) for a in sorted(gold)}
    return {"mean": statistics.fmean(scores.values()) if scores else math.nan, "annotators": scores, "members": members}


# ----------------------------------------------------------------------------------- annotators and contested items
def cohen_kappa(first: Sequence[int], second: Sequence[int]) -> float:
    r"""Cohen's κ of two annotators' labels on the same items: :math:`(p_o - p_e)/(1 - p_e)` with :math:`p_e` from
    their own marginals (1 when both always give the same single label)."""
    n = len(first)
    if n == 0 or n != len(second):
        return math.nan
    observed = sum(int(a == b) for a, b in zip(first, second)) / n
    labels = set(first) | set(second)
    expected = sum((first.count(c) / n) * (second.count(c) / n) for c in labels)
    return 1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected)


def annotator_agreement(items) -> tuple[list[str], list[list[float]]]:
    """``(annotators, κ matrix)``: Cohen's κ of every pair of annotators over the items both labelled (``nan`` when
    they share none)."""
    labels: dict[str, dict[str, int]] = {}
    for item in items:
        for annotator, _, option in item.annotations:
            labels.setdefault(annotator, {})[item.id] = option
    names = sorted(labels)
    matrix = [[1.0 if a == b else math.nan for b in names] for a in names]
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            shared = sorted(set(labels[a]) & set(labels[names[j]]))
            value = cohen_kappa([labels[a][s] for s in shared], [labels[names[j]][s] for s in shared])
            matrix[i][j] = matrix[j][i] = value
    return names, matrix


def cluster_annotators(items, num_clusters: int) -> dict[str, int]:
    """Annotators clustered by their agreement (average-linkage agglomerative clustering on the distance 1 − κ, pairs
    with no shared item at the largest distance), merged until ``num_clusters`` remain; ``{annotator: cluster}`` with
    clusters numbered by their first annotator's order. Group names are not read."""
    names, kappa = annotator_agreement(items)
    if not 1 <= num_clusters <= len(names):
        raise ValueError(f"num_clusters must lie in [1, {len(names)}] (the annotators), got {num_clusters}")
    distance = [[2.0 if math.isnan(k) else 1.0 - k for k in row] for row in kappa]
    clusters = [[i] for i in range(len(names))]
    while len(clusters) > num_clusters:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = statistics.fmean(distance[i][j] for i in clusters[a] for j in clusters[b])
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    clusters.sort(key=min)
    return {names[i]: c for c, members in enumerate(clusters) for i in members}


def chance_contested_share(items, draws: int = 200, seed: int = 0) -> float:
    """The share of items that would be contested if each item's votes were dealt to the groups at random (group sizes
    kept): every item's votes are shuffled among its groups ``draws`` times and the contested share averaged. With few
    votes per group many items are contested by chance alone; compare with the observed share."""
    rng = random.Random(seed)
    total = 0.0
    for item in items:
        votes = [c for counts in item.groups.values() for c, n in enumerate(counts) for _ in range(int(round(n)))]
        sizes = [int(round(sum(counts))) for counts in item.groups.values()]
        contested = 0
        for _ in range(draws):
            rng.shuffle(votes)
            contested += int(_contested_split(votes, sizes, len(item.options)))
        total += contested / draws
    return total / len(items)


def _contested_split(votes: Sequence[int], sizes: Sequence[int], num_options: int) -> bool:
    """Whether groups holding consecutive slices of ``votes`` (of ``sizes``) share no modal option."""
    modal, start = None, 0
    for size in sizes:
        counts = [0] * num_options
        for option in votes[start : start + size]:
            counts[option] += 1
        top = max(counts)
        tops = {c for c, n in enumerate(counts) if n == top}
        modal = tops if modal is None else modal & tops
        start += size
    return not modal
