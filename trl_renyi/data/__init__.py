"""Datasets: the bundled generator of contradictory data and the one loader of local data files.

``trl_renyi.data`` re-exports the generator's public names (:mod:`trl_renyi.data.conflict`).
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

__all__ = [
    "DEFAULT_FAMILIES",
    "DEFAULT_SYSTEM_PROMPT",
    "DEMO_FAMILIES",
    "FAMILIES",
    "Item",
    "TaskFamily",
    "chat_answer",
    "chat_prompt",
    "conflict_preference_dataset",
    "conflict_sft_dataset",
    "held_out_items",
    "resolve_families",
    "sample_items",
    "split_entities",
]
