"""Multi-annotator rows in ``RenyiSFTTrainer``: expansion before TRL's preparation and per-example weights.

See :mod:`trl_renyi.data.multi_completion` for the format and the loss it defines. A dataset with ``prompt`` +
``completions`` (+ ``completion_weights``) columns is expanded into one-completion rows that keep their weight; the
trainer keeps the ``completion_weight`` column through TRL's preparation and the collator passes it as the batch's
``completion_weights``, which weight both the bound and the token normaliser.
"""

from __future__ import annotations

from trl_renyi.data.multi_completion import (
    WEIGHT_COLUMN,
    WeightedCollator,
    expand_multi_completion,
    is_multi_completion,
)


def prepare_multi_completion(args, train_dataset, eval_dataset):
    """Expand multi-annotator datasets; returns ``(train, eval, weighted)``. Refuses, by name, the options whose
    meaning the weights would silently change."""

    def expand(dataset):
        if isinstance(dataset, dict):
            return {name: expand(d) for name, d in dataset.items()}
        return expand_multi_completion(dataset) if is_multi_completion(dataset) else dataset

    weighted = is_multi_completion(train_dataset) or (
        isinstance(eval_dataset, dict) and any(is_multi_completion(d) for d in eval_dataset.values())
    ) or is_multi_completion(eval_dataset)
    if weighted:
        if args.gradient_accumulation_steps > 1 and args.loglik_reduction == "sum":
            raise ValueError(
                "multi-annotator rows (completion_weights) with gradient_accumulation_steps > 1: the Trainer's "
                "num_items_in_batch counts unweighted tokens; use gradient_accumulation_steps=1"
            )
        if getattr(args, "packing", False):
            raise ValueError("multi-annotator rows (completion_weights) cannot be packed: set packing=False")
    return expand(train_dataset), expand(eval_dataset), weighted


def enable_completion_weights(trainer) -> None:
    """Keep the weight column through the Trainer's column removal and collate it into ``completion_weights``."""
    trainer._set_signature_columns_if_needed()
    if WEIGHT_COLUMN not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, WEIGHT_COLUMN]
    trainer.data_collator = WeightedCollator(trainer.data_collator)
