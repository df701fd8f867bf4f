"""Datasets: the bundled generator of contradictory data and the one loader of local data files.

``trl_renyi.data`` re-exports the generator's public names (:mod:`trl_renyi.data.conflict`) and the training rows of
a group-annotated file (:func:`~trl_renyi.data.group_conflicts.group_dataset`, :data:`GROUP_ROWS`).
"""

from trl_renyi.data.conflict import (
    DEFAULT_FAMILIES,
    DEFAULT_SYSTEM_PROMPT,
    DEMO_FAMILIES,
    FAMILIES,
    Item,
    TaskFamily,
    chat_answer,
    chat_prompt,
    conflict_preference_dataset,
    conflict_sft_dataset,
    held_out_items,
    resolve_families,
    sample_items,
    split_entities,
)
from trl_renyi.data.group_conflicts import (
    GROUP_ROW_SETTINGS,
    GROUP_ROWS,
    group_dataset,
    read_group_items,
)

__all__ = [
    "DEFAULT_FAMILIES",
    "DEFAULT_SYSTEM_PROMPT",
    "DEMO_FAMILIES",
    "FAMILIES",
    "GROUP_ROWS",
    "GROUP_ROW_SETTINGS",
    "Item",
    "TaskFamily",
    "chat_answer",
    "chat_prompt",
    "conflict_preference_dataset",
    "conflict_sft_dataset",
    "group_dataset",
    "held_out_items",
    "read_group_items",
    "resolve_families",
    "sample_items",
    "split_entities",
]
