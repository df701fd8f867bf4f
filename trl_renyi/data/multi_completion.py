r"""Multi-annotator rows: one prompt with several weighted completions.

Format (plain or conversational, next to TRL's prompt/completion format)::

    {"prompt": str | list[message], "completions": [c_1, …, c_m], "completion_weights": [w_1, …, w_m]}

``completion_weights`` is optional (all ones); weights are non-negative, e.g. annotator counts.

Meaning. A row with integer weights is *the same training data* as the expanded one-completion rows in which
completion j appears w_j times. With :math:`J(\ell_{ijk})` the α-Rényi bound of completion j of row i and
:math:`n_{ij}` its completion tokens, the batch loss of the expanded rows is

.. math::

    \mathcal{L} = -\frac{\sum_i \sum_j w_{ij}\, J(\ell_{ij\cdot})}{\sum_i \sum_j w_{ij}\, n_{ij}}

(each copy is a separate example of the bound, so the mixture over members is taken per completion, not over the
row), and that is what ``RenyiSFTTrainer`` computes for a weighted row: numerator and normaliser both weighted.
Real-valued weights generalise it. Rows are expanded before TRL's tokenisation into one-completion rows that
carry a ``completion_weight`` column; the collator turns it into a per-example weight.
"""

from __future__ import annotations

import torch
from datasets import Dataset

MULTI_COMPLETION_COLUMNS = ("prompt", "completions")
WEIGHT_COLUMN = "completion_weight"
#: the multi-annotator row an expanded row came from (kept when the trainer shares each prompt's pass)
GROUP_COLUMN = "completion_group"
#: the source of every expanded row (``source_column`` routing; a string, then its integer id)
SOURCE_ID_COLUMN = "source_id"
#: columns of a prepared dataset regrouped into one row per prompt (see :func:`group_completions`)
GROUPED_COLUMNS = ("group_input_ids", "group_labels", "group_weights")
#: the regrouped column of the completions' source ids, present with ``source_column`` routing
GROUPED_SOURCES = "group_sources"


def row_sources(row: dict, column: str, num_completions: int | None) -> list:
    """The source of each completion of ``row`` (``num_completions`` of them), or of a one-completion row (``None``):
    ``row[column]`` is one id for the row or, in a multi-annotator row, a list parallel to ``completions``."""
    value = row.get(column)
    if value is None:
        raise ValueError(f"source_column {column!r}: a row has no source ({column}=None)")
    if num_completions is None:
        if isinstance(value, list):
            raise ValueError(f"source_column {column!r}: a prompt/completion row needs one source, got a list {value!r}")
        return [value]
    if isinstance(value, list):
        if len(value) != num_completions:
            raise ValueError(
                f"source_column {column!r}: {len(value)} sources for {num_completions} completions in a row "
                "(give one source per completion, or one for the row)"
            )
        return list(value)
    return [value] * num_completions


def is_multi_completion(dataset) -> bool:
    """Whether ``dataset`` is in the multi-annotator format (``prompt`` + ``completions`` columns)."""
    names = getattr(dataset, "column_names", None) or []
    return all(c in names for c in MULTI_COMPLETION_COLUMNS)


def expand_multi_completion(
    dataset: Dataset, keep_weights: bool = True, keep_groups: bool = False, source_column: str | None = None
) -> Dataset:
    """One row per (prompt, completion) with its weight in ``completion_weight`` (``keep_weights``), or TRL's plain
    prompt/completion rows with each completion repeated ``w_j`` times (``keep_weights=False``; integer weights).
    With ``keep_groups`` each row also records the index of the row it came from in ``completion_group``; with
    ``source_column`` each row records its source (:func:`row_sources`) in ``source_id``."""
    rows = {"prompt": [], "completion": []}
    if keep_weights:
        rows[WEIGHT_COLUMN] = []
    if keep_groups:
        rows[GROUP_COLUMN] = []
    if source_column is not None:
        if not keep_weights:
            raise ValueError("source routing keeps the completion weights: use keep_weights=True")
        if source_column not in dataset.column_names:
            raise ValueError(f"source_column {source_column!r} is not a column of the dataset ({dataset.column_names})")
        rows[SOURCE_ID_COLUMN] = []
    has_weights = "completion_weights" in dataset.column_names
    for index, row in enumerate(dataset):
        completions = row["completions"]
        weights = row["completion_weights"] if has_weights else [1.0] * len(completions)
        if len(weights) != len(completions):
            raise ValueError("completion_weights must have one weight per completion")
        sources = row_sources(row, source_column, len(completions)) if source_column else [None] * len(completions)
        for completion, weight, source in zip(completions, weights, sources):
            if weight < 0:
                raise ValueError(f"completion_weights must be non-negative, got {weight}")
            if keep_weights:
                if weight > 0:
                    rows["prompt"].append(row["prompt"])
                    rows["completion"].append(completion)
                    rows[WEIGHT_COLUMN].append(float(weight))
                    if keep_groups:
                        rows[GROUP_COLUMN].append(index)
                    if source_column is not None:
                        rows[SOURCE_ID_COLUMN].append(str(source))
            else:
                if float(weight) != int(weight):
                    raise ValueError("expanding into repeated rows needs integer completion_weights")
                for _ in range(int(weight)):
                    rows["prompt"].append(row["prompt"])
                    rows["completion"].append(completion)
                    if keep_groups:
                        rows[GROUP_COLUMN].append(index)
    return Dataset.from_dict(rows)


def group_completions(dataset: Dataset) -> Dataset:
    """Regroup a prepared (tokenised) expansion into one row per multi-annotator row: ``group_input_ids`` and
    ``group_labels`` hold the prepared ``input_ids`` / ``labels`` of its completions, ``group_weights`` their weights.
    Rows keep the order of their first completion; completions TRL dropped (no completion token left) stay dropped."""
    groups: dict[int, tuple[list, list, list, list]] = {}
    weights = dataset[WEIGHT_COLUMN] if WEIGHT_COLUMN in dataset.column_names else [1.0] * len(dataset)
    has_sources = SOURCE_ID_COLUMN in dataset.column_names
    sources = dataset[SOURCE_ID_COLUMN] if has_sources else [None] * len(dataset)
    rows = zip(dataset["input_ids"], dataset["labels"], weights, dataset[GROUP_COLUMN], sources)
    for ids, labels, weight, group, source in rows:
        entry = groups.setdefault(int(group), ([], [], [], []))
        entry[0].append(list(ids))
        entry[1].append(list(labels))
        entry[2].append(float(weight))
        entry[3].append(source)
    names = (*GROUPED_COLUMNS, GROUPED_SOURCES) if has_sources else GROUPED_COLUMNS
    columns = list(zip(*groups.values())) if groups else [[], [], [], []]
    return Dataset.from_dict({name: list(values) for name, values in zip(names, columns)})


class WeightedCollator:
    """Wraps a collator: removes ``completion_weight`` from each example and returns it as the ``(B,)`` tensor
    ``completion_weights`` of the batch (weight 1 for an example without it), and the integer ``source_id`` as the
    batch's ``source_ids`` where every example has one."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        weights = [float(e.pop(WEIGHT_COLUMN, 1.0)) if isinstance(e, dict) else 1.0 for e in examples]
        sources = [e.pop(SOURCE_ID_COLUMN, None) if isinstance(e, dict) else None for e in examples]
        batch = self.collator(examples)
        batch["completion_weights"] = torch.tensor(weights, dtype=torch.float32)
        if all(s is not None for s in sources):
            batch["source_ids"] = torch.tensor(sources, dtype=torch.long)
        return batch

    def __getattr__(self, name):
        return getattr(self.collator, name)


