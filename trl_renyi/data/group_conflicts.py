r"""Group-annotated items: answers of several groups of people to the same questions, and the training rows and
evaluation targets built from them.

One JSON object per line (the format of HS-Brexit's annotator groups and OpinionQA's ideological groups)::

    {"id": str, "prompt": str, "options": [o_1, …, o_C],            # C ≥ 2 answer strings
     "groups": {name: [n_1, …, n_C], …},                            # ≥ 2 groups, vote counts (≥ 0, sum > 0)
     "annotations": [{"annotator": str, "group": str, "option": int}, …]}   # optional, per annotator

**Group names are evaluation targets.** No training row built here carries a group name or anything derived from
one beyond the votes themselves: :func:`group_vote_rows` gives one multi-annotator row per (item, group) whose rows are
shuffled together; :func:`annotator_vote_rows` carries the annotator id (a person, which may be used);
:func:`preference_pairs` gives DPO pairs in which one group's chosen answer is, on contested items, the other group's
rejected one. :func:`group_targets` computes what the evaluation compares with:

* each group's distribution :math:`p_g = n_g / \sum_c n_{gc}`;
* the between-group Jensen–Shannon divergence (equal group weights, nats)
  :math:`\mathrm{JSD} = H\big(\tfrac1G \sum_g p_g\big) - \tfrac1G \sum_g H(p_g)`;
* the mean within-group entropy :math:`\tfrac1G \sum_g H(p_g)` (disagreement *inside* the groups: aleatoric);
* ``contested``: no answer is modal in every group (the group majorities differ); otherwise ``agreed``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

logger = logging.getLogger(__name__)

#: how the answer follows the item's prompt in the training rows and at scoring (plain text, one option per answer)
ANSWER_CUE = "\nAnswer:"
#: the column of :func:`annotator_vote_rows` that names each vote's annotator
ANNOTATOR_COLUMN = "annotator"


@dataclass
class GroupItem:
    """One item of a group-annotated file.

    Attributes:
        id: the item's id.
        prompt: the question (its options are named in it).
        options: the answer strings, ``C ≥ 2``.
        groups: ``{group name: vote counts per option}``; evaluation only.
        annotations: ``[(annotator id, group name, option index)]`` where individual annotators are known.
        split: the source's own split or wave, if any.
    """

    id: str
    prompt: str
    options: list[str]
    groups: dict[str, list[float]]
    annotations: list[tuple[str, str, int]] = field(default_factory=list)
    split: str | None = None

    @property
    def group_names(self) -> list[str]:
        """The groups that voted on the item, in file order."""
        return list(self.groups)

    def distribution(self, group: str) -> list[float]:
        """The group's label distribution over the item's choices."""
        counts = self.groups[group]
        total = sum(counts)
        return [c / total for c in counts]

    def pooled_counts(self) -> list[float]:
        """Vote counts over the choices, all groups pooled."""
        return [sum(votes) for votes in zip(*self.groups.values())]

    def pooled_distribution(self) -> list[float]:
        """All votes together, every person counted once (what one model trained on every vote would learn)."""
        counts = self.pooled_counts()
        total = sum(counts)
        return [c / total for c in counts]

    def modal_options(self, group: str) -> set[int]:
        """The choices the group voted for most (several on a tie)."""
        counts = self.groups[group]
        top = max(counts)
        return {i for i, c in enumerate(counts) if c == top}

    def majority(self, group: str) -> int:
        """The group's most voted option (the first of a tie)."""
        counts = self.groups[group]
        return max(range(len(counts)), key=counts.__getitem__)

    @property
    def contested(self) -> bool:
        """Whether no option is modal in every group."""
        return not set.intersection(*(self.modal_options(g) for g in self.groups))


# ----------------------------------------------------------------------------------------------------------- reading
def _fail(path, line: int, message: str):
    raise ValueError(f"{path}, line {line}: {message}")


def _parse_item(row, path, line: int) -> GroupItem:
    if not isinstance(row, dict):
        _fail(path, line, f"expected a JSON object, got {type(row).__name__}")
    for name in ("prompt", "options", "groups"):
        if name not in row:
            _fail(path, line, f"missing field {name!r}")
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        _fail(path, line, f"field 'prompt' must be a non-empty string, got {prompt!r}")
    options = row["options"]
    if not isinstance(options, list) or len(options) < 2:
        _fail(path, line, f"field 'options' must be a list of at least 2 answer strings, got {options!r}")
    for index, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            _fail(path, line, f"field 'options'[{index}] must be a non-empty string, got {option!r}")
    if len(set(options)) != len(options):
        _fail(path, line, f"field 'options' repeats an answer: {options!r}")
    groups = row["groups"]
    if not isinstance(groups, dict) or len(groups) < 2:
        _fail(path, line, f"field 'groups' must map at least 2 group names to vote counts, got {groups!r}")
    parsed_groups = {}
    for name, votes in groups.items():
        where = f"field 'groups'[{name!r}]"
        if not isinstance(votes, list) or len(votes) != len(options):
            _fail(path, line, f"{where} must hold {len(options)} vote counts (one per option), got {votes!r}")
        for count in votes:
            if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count < 0:
                _fail(path, line, f"{where} must hold non-negative finite counts, got {votes!r}")
        if sum(votes) <= 0:
            _fail(path, line, f"{where} has no votes")
        parsed_groups[str(name)] = [float(c) for c in votes]
    annotations = []
    for index, entry in enumerate(row.get("annotations") or []):
        where = f"field 'annotations'[{index}]"
        if not isinstance(entry, dict) or not {"annotator", "option"} <= set(entry):
            _fail(path, line, f"{where} must be an object with 'annotator' and 'option', got {entry!r}")
        annotator, option = entry["annotator"], entry["option"]
        if not isinstance(annotator, (str, int)) or isinstance(annotator, bool) or str(annotator) == "":
            _fail(path, line, f"{where}: 'annotator' must be a non-empty id, got {annotator!r}")
        if isinstance(option, bool) or not isinstance(option, int) or not 0 <= option < len(options):
            _fail(path, line, f"{where}: 'option' must be an index in [0, {len(options)}), got {option!r}")
        group = entry.get("group")
        if group is not None and str(group) not in parsed_groups:
            _fail(path, line, f"{where}: group {group!r} is not one of {list(parsed_groups)}")
        annotations.append((str(annotator), None if group is None else str(group), option))
    item_id = row.get("id", f"line-{line}")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        _fail(path, line, f"field 'id' must be a string, got {item_id!r}")
    split = row.get("split")
    return GroupItem(str(item_id), prompt, list(options), parsed_groups, annotations, None if split is None else str(split))


def read_group_items(path: str | Path) -> list[GroupItem]:
    """Read a group-annotated JSON-lines file; a malformed row raises ``ValueError`` naming the file, line and field.

    Every item must have the same group names (the evaluation compares groups across items); ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"group-annotated file {path} does not exist")
    items, seen = [], {}
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                _fail(path, number, f"not valid JSON ({error.msg} at column {error.colno})")
            item = _parse_item(row, path, number)
            if item.id in seen:
                _fail(path, number, f"id {item.id!r} already used on line {seen[item.id]}")
            seen[item.id] = number
            if items and set(item.groups) != set(items[0].groups):
                _fail(path, number, f"groups {sorted(item.groups)} differ from the file's {sorted(items[0].groups)}")
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def has_annotators(items: Sequence[GroupItem]) -> bool:
    """Whether every item names its individual annotators."""
    return bool(items) and all(item.annotations for item in items)


def stratified_split(
    items: Sequence[GroupItem], held_out_share: float, seed: int = 0
) -> tuple[list[GroupItem], list[GroupItem]]:
    """``(train, held_out)``: a seeded ``held_out_share`` of the contested items and the same share of the agreed ones
    (at least one of each kind where the file has two), so both sides keep the file's contested share."""
    if not 0.0 < held_out_share < 1.0:
        raise ValueError(f"held_out_share must lie in (0, 1), got {held_out_share}")
    rng = random.Random(seed)
    train, held_out = [], []
    for contested in (True, False):
        kind = [item for item in items if item.contested == contested]
        rng.shuffle(kind)
        count = round(held_out_share * len(kind))
        if len(kind) >= 2:
            count = min(max(count, 1), len(kind) - 1)
        held_out += kind[:count]
        train += kind[count:]
    order = {item.id: i for i, item in enumerate(items)}
    return sorted(train, key=lambda it: order[it.id]), sorted(held_out, key=lambda it: order[it.id])


# ---------------------------------------------------------------------------------------------------- training rows
def answer_prompt(item: GroupItem) -> str:
    """The plain-text prompt the answer follows (the item's prompt and :data:`ANSWER_CUE`)."""
    return item.prompt.rstrip() + ANSWER_CUE


def answer_completions(item: GroupItem) -> list[str]:
    """Each option as a completion of :func:`answer_prompt` (a leading space)."""
    return [" " + option.strip() for option in item.options]


def _vote_weights(counts: Sequence[float], weighting: str) -> list[float]:
    if weighting == "counts":
        return [float(c) for c in counts]
    if weighting == "distribution":
        total = sum(counts)
        return [c / total for c in counts]
    raise ValueError(f"weighting must be 'distribution' or 'counts', got {weighting!r}")


def group_vote_rows(
    items: Sequence[GroupItem], weighting: str = "distribution", seed: int = 0, keep_zero: bool = False
) -> dict[str, list]:
    """One multi-annotator row per (item, group): ``prompt``, ``completions`` (the options) and
    ``completion_weights`` (that group's votes), with no group name; rows are shuffled (seeded) so that a row's
    position does not tell its group either.

    Args:
        weighting: ``"distribution"`` (each group's votes normalised to sum to 1: every group weighs the same on every
            item, whatever its size) or ``"counts"`` (the raw counts: every person weighs the same).
        keep_zero: keep options no member of the group chose (weight 0; they train nothing).
    """
    rows = []
    for item in items:
        for group in item.groups:
            weights = _vote_weights(item.groups[group], weighting)
            pairs = [(c, w) for c, w in zip(answer_completions(item), weights) if keep_zero or w > 0]
            rows.append((answer_prompt(item), [c for c, _ in pairs], [w for _, w in pairs]))
    random.Random(seed).shuffle(rows)
    return {
        "prompt": [r[0] for r in rows],
        "completions": [r[1] for r in rows],
        "completion_weights": [r[2] for r in rows],
    }


def pooled_vote_rows(items: Sequence[GroupItem], weighting: str = "distribution") -> dict[str, list]:
    """One multi-annotator row per item holding every group's votes together (``weighting`` as in
    :func:`group_vote_rows`, applied per group before pooling): what one model fitting everyone's answers sees."""
    out = {"prompt": [], "completions": [], "completion_weights": []}
    for item in items:
        per_group = [_vote_weights(item.groups[g], weighting) for g in item.groups]
        weights = [sum(ws) for ws in zip(*per_group)]
        pairs = [(c, w) for c, w in zip(answer_completions(item), weights) if w > 0]
        out["prompt"].append(answer_prompt(item))
        out["completions"].append([c for c, _ in pairs])
        out["completion_weights"].append([w for _, w in pairs])
    return out


def annotator_vote_rows(items: Sequence[GroupItem]) -> dict[str, list]:
    """One multi-annotator row per item whose completions are its annotators' votes, one each, with the annotator ids
    in the column :data:`ANNOTATOR_COLUMN` (parallel to ``completions``): expanded, one row per annotator vote carrying
    the annotator id, the source ``RenyiSFTConfig(source_column="annotator")`` routes by. Group names are left out."""
    if not has_annotators(items):
        missing = next(item.id for item in items if not item.annotations)
        raise ValueError(f"item {missing!r} names no annotators: annotator rows need 'annotations' on every item")
    out = {"prompt": [], "completions": [], "completion_weights": [], ANNOTATOR_COLUMN: []}
    for item in items:
        completions = answer_completions(item)
        out["prompt"].append(answer_prompt(item))
        out["completions"].append([completions[option] for _, _, option in item.annotations])
        out["completion_weights"].append([1.0] * len(item.annotations))
        out[ANNOTATOR_COLUMN].append([annotator for annotator, _, _ in item.annotations])
    return out


def preference_pairs(items: Sequence[GroupItem], seed: int = 0) -> dict[str, list]:
    """DPO pairs, one per (item, group), no group name, rows shuffled (seeded).

    Each group's chosen answer is its majority. On a contested item its rejected answer is the majority of the other
    group that prefers something else (with more than two groups, the one of those answers with the most pooled
    votes), so one group's chosen answer is the other's rejected one. On an agreed item every group gets the same pair:
    the shared majority against the answer with the most pooled votes after it.
    """
    rows = []
    for item in items:
        pooled = item.pooled_counts()
        completions = answer_completions(item)
        if item.contested:
            for group in item.groups:
                chosen = item.majority(group)
                rivals = {item.majority(g) for g in item.groups if item.majority(g) != chosen}
                rejected = max(sorted(rivals), key=pooled.__getitem__)
                rows.append((answer_prompt(item), completions[chosen], completions[rejected]))
        else:
            chosen = min(set.intersection(*(item.modal_options(g) for g in item.groups)))
            rejected = max((o for o in range(len(pooled)) if o != chosen), key=pooled.__getitem__)
            rows += [(answer_prompt(item), completions[chosen], completions[rejected])] * len(item.groups)
    random.Random(seed).shuffle(rows)
    return {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}


def group_choice_rows(items: Sequence[GroupItem], weighting: str = "counts") -> list[dict]:
    """Choice rows for the stability criterion (:func:`trl_renyi.stability.choice_votes`), one per (item, group):
    ``prompt`` (:func:`answer_prompt`), ``options`` (:func:`answer_completions`), ``label_counts`` (the group's votes)
    and ``weight`` (of each vote: 1 for ``weighting="counts"``, 1/n for ``"distribution"``, where the group's
    distribution weighs 1 as in :func:`group_vote_rows`). No group name: rows of one item differ only in their votes.
    Measure them per row (a group's votes on an item together) or per vote (``unit="completion"``)."""
    rows = []
    for item in items:
        for group in item.groups:
            counts = item.groups[group]
            if any(not float(c).is_integer() for c in counts):
                raise ValueError(f"item {item.id!r}: group vote counts must be whole numbers for choice rows, got {counts}")
            total = sum(counts)
            rows.append({
                "prompt": answer_prompt(item), "options": answer_completions(item),
                "label_counts": [int(c) for c in counts], "weight": 1.0 if weighting == "counts" else 1.0 / total,
            })  # fmt: skip
        if weighting not in ("counts", "distribution"):
            raise ValueError(f"weighting must be 'counts' or 'distribution', got {weighting!r}")
    return rows


def annotator_choice_rows(items: Sequence[GroupItem]) -> list[dict]:
    """Choice rows for the stability criterion, one per annotator vote: ``prompt``, ``options``, ``label`` and the
    annotator id in :data:`ANNOTATOR_COLUMN` (measure them with ``unit="source", source_key="annotator"``)."""
    if not has_annotators(items):
        missing = next(item.id for item in items if not item.annotations)
        raise ValueError(f"item {missing!r} names no annotators: annotator rows need 'annotations' on every item")
    return [
        {"prompt": answer_prompt(item), "options": answer_completions(item), "label": option, ANNOTATOR_COLUMN: annotator}
        for item in items
        for annotator, _, option in item.annotations
    ]


#: The training rows a group-annotated file can become (``group_dataset(rows=...)``, ``--group_rows``), with the
#: trainer settings each needs. Group names are dropped in every one.
GROUP_ROWS = {
    "vote": "every vote its own example: one prompt/completion row per annotator vote where annotators are named, "
    "else one multi-annotator row per item weighted by the vote counts (SFT)",
    "annotator": "one multi-annotator row per item, its annotators' votes as completions, each carrying its "
    f"annotator id (one example per vote), routed by annotator (source_column='{ANNOTATOR_COLUMN}'; SFT; needs "
    "annotations)",
    "group": "one multi-annotator row per (item, group) holding that group's vote distribution, group unseen (SFT; "
    "routed whole with multi_annotator_routing='row')",
    "pooled": "one multi-annotator row per item, every group's distribution weighing 1 (SFT)",
    "pairs": "one preference pair per (item, group): the group's majority against the rival answer (DPO)",
}
#: what each kind of rows needs from the trainer (config field -> value)
GROUP_ROW_SETTINGS = {"annotator": {"source_column": ANNOTATOR_COLUMN}, "group": {"multi_annotator_routing": "row"}}
#: the rows each trainer can train on, its default first
GROUP_ROWS_BY_TRAINER = {"sft": ("vote", "annotator", "group", "pooled"), "dpo": ("pairs",)}


def is_group_annotated(columns) -> bool:
    """Whether a dataset's columns are those of a group-annotated file (``prompt``, ``options``, ``groups``)."""
    return {"prompt", "options", "groups"} <= set(columns)


def group_training_rows(items: Sequence[GroupItem], rows: str, seed: int = 0) -> dict[str, list]:
    """The training rows ``rows`` (a key of :data:`GROUP_ROWS`) of ``items``, as dataset columns."""
    if rows not in GROUP_ROWS:
        raise ValueError(f"group rows must be one of {list(GROUP_ROWS)}, got {rows!r}")
    if rows == "vote":
        if has_annotators(items):
            return {
                "prompt": [answer_prompt(i) for i in items for _ in i.annotations],
                "completion": [answer_completions(i)[option] for i in items for _, _, option in i.annotations],
            }
        return pooled_vote_rows(items, weighting="counts")
    if rows == "annotator":
        return annotator_vote_rows(items)
    if rows == "group":
        return group_vote_rows(items, seed=seed)
    if rows == "pooled":
        return pooled_vote_rows(items)
    return preference_pairs(items, seed)


def group_training_dataset(
    dataset, rows: str | None, kind: str, source: str = "train_dataset", seed: int = 0, split: str | None = None
):
    """``(training rows, rows)`` of a group-annotated ``dataset`` (columns ``prompt``, ``options``, ``groups``) for
    trainer ``kind`` (``"sft"`` / ``"dpo"``): the rows ``rows`` of :data:`GROUP_ROWS` (``None``: the trainer's
    default, :data:`GROUP_ROWS_BY_TRAINER`), group names dropped; ``(dataset, None)`` for any other dataset. The items
    are checked as :func:`read_group_items` checks a file, errors naming ``source`` and the row. With ``split`` (e.g.
    ``"train"``) and a file whose items name their own split (a ``split`` column, as LeWiDi's), only that split's
    items are used, so held-out items never reach training; a file without it is used whole."""
    columns = getattr(dataset, "column_names", None)
    if dataset is None or columns is None or not is_group_annotated(columns):
        return dataset, None
    allowed = GROUP_ROWS_BY_TRAINER[kind]
    rows = rows or allowed[0]
    if rows not in allowed:
        other = next(k for k, v in GROUP_ROWS_BY_TRAINER.items() if rows in v)
        raise ValueError(
            f"group_rows={rows!r} builds {other.upper()} rows ({GROUP_ROWS[rows]}); the {kind.upper()} trainer takes "
            f"group_rows in {list(allowed)}."
        )
    items = group_items_from_rows(dataset.to_list(), source)
    if split is not None and any(item.split == split for item in items):
        kept = [item for item in items if item.split == split]
        if len(kept) < len(items):
            logger.info(
                "%s: %d of its %d items are of the file's split %r, the rest (%s) are left out of training.",
                source, len(kept), len(items), split, sorted({str(i.split) for i in items} - {split}),
            )  # fmt: skip
        items = kept
    built = Dataset.from_dict(group_training_rows(items, rows, seed))
    logger.info(
        "%s is group-annotated: %d items became %d %r training rows (%s), group names dropped.",
        source, len(items), len(built), rows, GROUP_ROWS[rows],
    )  # fmt: skip
    return built, rows


def group_dataset(path, rows: str = "vote", seed: int = 0):
    """A group-annotated file (:func:`read_group_items`) as a ``datasets.Dataset`` of training rows ``rows``
    (:data:`GROUP_ROWS`), group names dropped. Train it with the settings of :data:`GROUP_ROW_SETTINGS` (e.g.
    ``source_column="annotator"`` for ``rows="annotator"``)."""
    return Dataset.from_dict(group_training_rows(read_group_items(path), rows, seed))


def group_items_from_rows(records: Sequence[dict], source: str = "dataset") -> list[GroupItem]:
    """Group items from rows already loaded (e.g. by ``datasets``), checked as :func:`read_group_items` checks a
    file; errors name ``source`` and the row (counting from 0)."""
    items = []
    for index, row in enumerate(records):
        row = {k: v for k, v in row.items() if v is not None}
        try:
            items.append(_parse_item(row, source, index))
        except ValueError as error:
            raise ValueError(str(error).replace(f", line {index}:", f", row {index} (counting from 0):")) from None
    return items


# ------------------------------------------------------------------------------------------------ evaluation targets
def _entropy(distribution: Sequence[float]) -> float:
    return -sum(p * math.log(p) for p in distribution if p > 0)


def group_targets(item: GroupItem) -> dict:
    """What the evaluation compares with (module docstring): ``distributions`` per group, ``pooled`` distribution,
    ``majorities`` per group, ``between_group_jsd``, ``within_group_entropy`` and ``contested``."""
    distributions = {g: item.distribution(g) for g in item.groups}
    mean = [sum(ps) / len(ps) for ps in zip(*distributions.values())]
    within = sum(_entropy(p) for p in distributions.values()) / len(distributions)
    return {
        "distributions": distributions,
        "pooled": item.pooled_distribution(),
        "majorities": {g: item.majority(g) for g in item.groups},
        "between_group_jsd": max(_entropy(mean) - within, 0.0),
        "within_group_entropy": within,
        "contested": item.contested,
    }
