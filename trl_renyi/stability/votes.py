r"""What the stability criterion is measured on: *votes* (one observed answer each, with a weight), grouped into the
*units* the α-Rényi bound is taken over, tokenised for one of three likelihoods.

* :class:`ChoiceVotes` — items with a fixed set of answer options (group-annotated files, multiple choice): member
  likelihood :math:`p(c \mid x) = \operatorname{softmax}_c(s_c)` with :math:`s_c` the option's summed token
  log-probability; the model's Fisher is exact, :math:`\sum_c p_c\, g_c g_c^\top`, one backward per option.
* :class:`SequenceVotes` — free text (TRL's SFT rows, tokenised as the trainer tokenises them): :math:`\ell` is the
  completion's summed token log-probability; the Fisher is estimated from completions sampled token by token along
  the observed prefix (the Gauss–Newton matrix of each position's softmax, exact in expectation).
* :class:`PairVotes` — DPO preference pairs: :math:`\ell = \log\sigma(m)`, m the DPO margin against the base model;
  the Fisher of that Bernoulli is exact, :math:`\sigma(m)\sigma(-m)\,\nabla m\nabla m^\top`.

A unit is a row, a completion of a multi-annotator row, a pair, or every vote of one source (``source_column``);
:func:`assign_units` turns per-vote keys into unit indices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl_renyi.data.multi_completion import (
    GROUPED_COLUMNS,
    GROUPED_SOURCES,
    SOURCE_ID_COLUMN,
    WEIGHT_COLUMN,
)

#: the units the criterion can be measured over
UNITS = ("row", "completion", "source")


def assign_units(keys: Sequence) -> tuple[list[int], list]:
    """``(unit index of every vote, unit names)`` for per-vote unit keys (first appearance order)."""
    index: dict = {}
    units = [index.setdefault(key, len(index)) for key in keys]
    return units, list(index)


@dataclass
class ChoiceVotes:
    """Choice items and the votes cast on them, in vote groups: one group is the votes of one unit on one item (one
    vote for a row with a ``label``; a group's vote counts for a row with ``label_counts``).

    Attributes:
        prompt_ids: per item, the prompt's token ids.
        option_ids: per item, each option's token ids (what follows the prompt).
        group_item: per vote group, its item …
        group_counts: … how many of its votes chose each option (integers) …
        group_weight: … the weight of each of its votes …
        group_unit: … and its unit.
        unit_names: the units' names.
    """

    prompt_ids: list[list[int]]
    option_ids: list[list[list[int]]]
    group_item: list[int]
    group_counts: list[list[int]]
    group_weight: list[float]
    group_unit: list[int]
    unit_names: list = field(default_factory=list)

    def __post_init__(self):
        lengths = {len(self.group_item), len(self.group_counts), len(self.group_weight), len(self.group_unit)}
        if len(lengths) != 1:
            raise ValueError(f"every vote group needs an item, counts, a weight and a unit; got lengths {sorted(lengths)}")
        for v, (item, counts) in enumerate(zip(self.group_item, self.group_counts)):
            if len(counts) != len(self.option_ids[item]):
                raise ValueError(f"vote group {v}: {len(counts)} counts for the {len(self.option_ids[item])} options of item {item}")
            if any(c < 0 or c != int(c) for c in counts) or sum(counts) <= 0:
                raise ValueError(f"vote group {v}: counts must be non-negative integers with at least one vote, got {counts}")
        _check_weights(self.group_weight)


@dataclass
class SequenceVotes:
    """Free-text votes: one teacher-forced sequence each (``labels`` −100 outside the completion)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    vote_weight: list[float]
    vote_unit: list[int]
    unit_names: list = field(default_factory=list)

    def __post_init__(self):
        if not len(self.input_ids) == len(self.labels) == len(self.vote_weight) == len(self.vote_unit):
            raise ValueError("every sequence vote needs input ids, labels, a weight and a unit")
        for v, labels in enumerate(self.labels):
            if all(t == -100 for t in labels[1:]):
                raise ValueError(f"sequence vote {v} has no completion token to score")
        _check_weights(self.vote_weight)


@dataclass
class PairVotes:
    """Preference pairs: prompt, chosen and rejected token ids, DPO's β."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    vote_weight: list[float]
    vote_unit: list[int]
    beta: float = 0.1
    unit_names: list = field(default_factory=list)

    def __post_init__(self):
        if not len(self.prompt_ids) == len(self.chosen_ids) == len(self.rejected_ids) == len(self.vote_unit):
            raise ValueError("every pair needs prompt, chosen and rejected ids and a unit")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be positive, got {self.beta}")
        _check_weights(self.vote_weight)


def _check_weights(weights: Sequence[float]) -> None:
    if not weights:
        raise ValueError("no votes to measure the stability criterion on")
    bad = next((w for w in weights if not (math.isfinite(w) and w > 0)), None)
    if bad is not None:
        raise ValueError(f"vote weights must be finite and positive, got {bad}")


# ------------------------------------------------------------------------------------------------ builders
def choice_votes(rows: Sequence[dict], tokenizer, unit: str = "row", source_key: str = "source") -> ChoiceVotes:
    """Choice votes from rows ``{"prompt": str, "options": [str, …], "label": int}`` or ``"label_counts": [n_1, …]``
    (integer vote counts: several votes at once), an optional ``"weight"`` (of each of the row's votes, default 1;
    e.g. 1/n for a group's distribution that weighs 1 in training), and ``source_key`` for ``unit="source"``.

    Options are scored as the text that follows the prompt (write the separator, e.g. a leading space, into the
    options); rows that share a prompt and options are one item, scored once. ``unit``: ``"row"`` (each row one unit,
    all its votes together), ``"source"`` (all rows of a source), or ``"completion"`` (every vote its own unit).
    """
    _check_unit(unit)
    items: dict[tuple, int] = {}
    prompts, options, keys = [], [], []
    group_item, group_counts, group_weight = [], [], []
    for r, row in enumerate(rows):
        where = f"choice row {r} (counting from 0)"
        for name in ("prompt", "options"):
            if name not in row:
                raise ValueError(f"{where} has no {name!r} field")
        opts = list(row["options"])
        if len(opts) < 2:
            raise ValueError(f"{where} needs at least 2 options, got {opts!r}")
        if row.get("label_counts") is not None:
            counts = list(row["label_counts"])
            if len(counts) != len(opts):
                raise ValueError(f"{where}: {len(counts)} label_counts for {len(opts)} options")
            if any(isinstance(c, bool) or not float(c).is_integer() or c < 0 for c in counts) or sum(counts) <= 0:
                raise ValueError(f"{where}: label_counts must be non-negative whole vote counts, got {counts!r}")
            counts = [int(c) for c in counts]
        elif "label" in row:
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(opts):
                raise ValueError(f"{where}: label must be an option index in [0, {len(opts)}), got {label!r}")
            counts = [int(c == label) for c in range(len(opts))]
        else:
            raise ValueError(f"{where} has neither 'label' nor 'label_counts'")
        weight = float(row.get("weight", 1.0))
        key = (row["prompt"], tuple(opts))
        if key not in items:
            items[key] = len(prompts)
            prompts.append(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            options.append([tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts])
        if unit == "completion":  # every vote its own unit
            singles = [c for c, n in enumerate(counts) for _ in range(n)]
            groups = [[int(c == s) for c in range(len(opts))] for s in singles]
        else:
            groups = [counts]
        for j, group in enumerate(groups):
            group_item.append(items[key])
            group_counts.append(group)
            group_weight.append(weight)
            keys.append(_unit_key(unit, row, r, j, source_key))
    units, names = assign_units(keys)
    return ChoiceVotes(prompts, options, group_item, group_counts, group_weight, units, names)


def sequence_votes(dataset, unit: str = "completion") -> SequenceVotes:
    """Sequence votes from a dataset prepared by ``SFTTrainer`` (``input_ids`` and ``labels``, optional
    ``completion_weight`` and ``source_id`` columns, ``completion_group`` for the row of a multi-annotator
    completion), or from the trainer's regrouped layout (``group_input_ids`` / ``group_labels`` / ``group_weights``
    / ``group_sources``: one row per prompt with all its completions)."""
    _check_unit(unit)
    names = dataset.column_names
    ids, labels, weights, keys = [], [], [], []
    if GROUPED_COLUMNS[0] in names:
        sources = dataset[GROUPED_SOURCES] if GROUPED_SOURCES in names else None
        for r, (row_ids, row_labels, row_weights) in enumerate(zip(*(dataset[c] for c in GROUPED_COLUMNS))):
            for j, (i, l, w) in enumerate(zip(row_ids, row_labels, row_weights)):
                ids.append(list(i))
                labels.append(list(l))
                weights.append(float(w))
                row = {"source": sources[r][j]} if sources is not None else {}
                keys.append(_unit_key(unit, row, r, j, "source"))
    else:
        if "labels" not in names or "input_ids" not in names:
            raise ValueError(f"sequence votes need a prepared SFT dataset with input_ids and labels, got columns {names}")
        row_weights = dataset[WEIGHT_COLUMN] if WEIGHT_COLUMN in names else [1.0] * len(dataset)
        sources = dataset[SOURCE_ID_COLUMN] if SOURCE_ID_COLUMN in names else None
        groups = dataset["completion_group"] if "completion_group" in names else None
        for r, (i, l, w) in enumerate(zip(dataset["input_ids"], dataset["labels"], row_weights)):
            ids.append(list(i))
            labels.append(list(l))
            weights.append(float(w))
            row = {"source": sources[r]} if sources is not None else {}
            keys.append(_unit_key(unit, row, groups[r] if groups is not None and unit == "row" else r, 0, "source"))
    units, unit_names = assign_units(keys)
    return SequenceVotes(ids, labels, weights, units, unit_names)


def pair_votes(dataset, beta: float, unit: str = "row", source_key: str = "source") -> PairVotes:
    """Pair votes from a dataset prepared by ``DPOTrainer`` (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    _check_unit(unit)
    names = dataset.column_names
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if column not in names:
            raise ValueError(f"pair votes need a prepared DPO dataset with {column}, got columns {names}")
    if unit == "source" and source_key not in names:
        raise ValueError(f"unit='source' needs the column {source_key!r}; the dataset has {names}")
    keys = [_unit_key(unit, dataset[r] if unit == "source" else {}, r, 0, source_key) for r in range(len(dataset))]
    units, unit_names = assign_units(keys)
    return PairVotes(
        [list(x) for x in dataset["prompt_ids"]],
        [list(x) for x in dataset["chosen_ids"]],
        [list(x) for x in dataset["rejected_ids"]],
        [1.0] * len(dataset),
        units,
        float(beta),
        unit_names,
    )


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def _unit_key(unit: str, row: dict, row_index, vote_index: int, source_key: str):
    if unit == "source":
        if row.get(source_key) is None:
            raise ValueError(
                f"unit='source': row {row_index} (counting from 0) names no source in {source_key!r}"
            )
        return ("source", str(row[source_key]))
    if unit == "completion":
        return ("vote", row_index, vote_index)
    return ("row", row_index)


def subsample_units(votes, max_units: int | None, seed: int = 0):
    """The votes of at most ``max_units`` units drawn at random (all when ``None`` or fewer)."""
    num_units = len(votes.unit_names)
    if max_units is None or num_units <= max_units:
        return votes
    keep = sorted(random.Random(seed).sample(range(num_units), max_units))
    remap = {old: new for new, old in enumerate(keep)}
    if isinstance(votes, ChoiceVotes):
        chosen = [v for v, u in enumerate(votes.group_unit) if u in remap]
        return ChoiceVotes(
            votes.prompt_ids, votes.option_ids, [votes.group_item[v] for v in chosen],
            [votes.group_counts[v] for v in chosen], [votes.group_weight[v] for v in chosen],
            [remap[votes.group_unit[v]] for v in chosen], [votes.unit_names[u] for u in keep],
        )  # fmt: skip
    chosen = [v for v, u in enumerate(votes.vote_unit) if u in remap]
    names = [votes.unit_names[u] for u in keep]
    units = [remap[votes.vote_unit[v]] for v in chosen]
    if isinstance(votes, SequenceVotes):
        return SequenceVotes(
            [votes.input_ids[v] for v in chosen], [votes.labels[v] for v in chosen],
            [votes.vote_weight[v] for v in chosen], units, names,
        )  # fmt: skip
    return PairVotes(
        [votes.prompt_ids[v] for v in chosen], [votes.chosen_ids[v] for v in chosen],
        [votes.rejected_ids[v] for v in chosen], [votes.vote_weight[v] for v in chosen], units, votes.beta, names,
    )  # fmt: skip


def answer_choice_votes(votes: SequenceVotes) -> ChoiceVotes | None:
    """The free-text votes as choices among the answers the data gives each prompt, where it gives some prompt more
    than one (``None`` otherwise, or when a sequence is not a prompt followed by its scored completion).

    Conflicting data asks one question several ways: the same prompt answered differently by different rows (votes,
    annotators, conventions). Restricted to the answers seen for the prompt, a member's likelihood of its row is
    :math:`p(y \\mid x, y \\in A_x)`, the model's Fisher over the answers is exact (no sampled completions), and
    directions that only move probability onto answers nobody gave — mass the data never checks — drop out. Prompts
    with one answer add no curvature there (every member gives it probability 1 within its answer set)."""
    items: dict[tuple, int] = {}
    prompts, answers, answer_index = [], [], []
    rows = []
    for ids, labels in zip(votes.input_ids, votes.labels):
        start = next((t for t, label in enumerate(labels) if label != -100), None)
        if start is None or any(label == -100 for label in labels[start:]) or list(labels[start:]) != list(ids[start:]):
            return None
        prompt, answer = tuple(ids[:start]), tuple(ids[start:])
        item = items.setdefault(prompt, len(prompts))
        if item == len(prompts):
            prompts.append(list(prompt))
            answers.append([])
            answer_index.append({})
        if answer not in answer_index[item]:
            answer_index[item][answer] = len(answers[item])
            answers[item].append(list(answer))
        rows.append((item, answer_index[item][answer]))
    if not any(len(a) > 1 for a in answers):
        return None
    counts = [[int(c == option) for c in range(len(answers[item]))] for item, option in rows]
    return ChoiceVotes(
        prompts, answers, [item for item, _ in rows], counts, list(votes.vote_weight), list(votes.vote_unit),
        list(votes.unit_names),
    )  # fmt: skip
