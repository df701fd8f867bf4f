"""Multi-annotator rows in ``RenyiSFTTrainer``: expansion before TRL's preparation, per-example weights, and one
prompt pass for all completions of a row.

See :mod:`trl_renyi.data.multi_completion` for the format and the loss it defines. A dataset with ``prompt`` +
``completions`` (+ ``completion_weights``) columns is expanded into one-completion rows that keep their weight, so
that TRL tokenises and truncates every completion exactly as it would a plain prompt/completion row.

* With ``share_prompt`` (the default where the model allows it) the prepared rows are regrouped into one row per
  prompt and :class:`SharedPromptCollator` packs each prompt with all its completions
  (:mod:`trl_renyi.model.shared_prompt`): the prompt runs once per member per step, and a batch holds
  ``per_device_train_batch_size`` prompts with all their completions.
* Without it, the trainer keeps the ``completion_weight`` column through TRL's preparation and the collator passes it
  as the batch's ``completion_weights``; a batch then holds ``per_device_train_batch_size`` completions.

Either way the weights scale both the bound and the token normaliser, and the loss equals that of the expanded rows.
"""

from __future__ import annotations

import torch
from datasets import IterableDataset

from trl_renyi.data.multi_completion import (
    GROUPED_COLUMNS,
    WEIGHT_COLUMN,
    WeightedCollator,
    expand_multi_completion,
    group_completions,
    is_multi_completion,
)
from trl_renyi.model.shared_prompt import attention_implementation, pack_shared_prompts


def _map_datasets(function, dataset):
    if isinstance(dataset, dict):
        return {name: _map_datasets(function, d) for name, d in dataset.items()}
    return function(dataset)


def has_multi_completion(train_dataset, eval_dataset) -> bool:
    datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
    return any(is_multi_completion(d) for d in datasets)


def share_prompt_blockers(args, train_dataset, data_collator) -> dict[str, bool]:
    """The reasons, beside the model's, why multi-annotator rows cannot share their prompt pass."""
    return {
        "a custom data_collator builds the batches (the shared layout needs the trainer's own collator)": (
            data_collator is not None
        ),
        "an IterableDataset cannot be regrouped by prompt": isinstance(train_dataset, IterableDataset),
        "group_by_length sorts single sequences, not prompts with their completions": bool(
            getattr(args, "group_by_length", False)
        ),
    }


def prepare_multi_completion(args, train_dataset, eval_dataset, share_prompt: bool = False):
    """Expand multi-annotator datasets; returns ``(train, eval, weighted)``. Refuses, by name, the options whose
    meaning the weights would silently change. With ``share_prompt`` each expanded row records its source row."""
    weighted = has_multi_completion(train_dataset, eval_dataset)
    if weighted:
        if args.gradient_accumulation_steps > 1 and args.loglik_reduction == "sum":
            raise ValueError(
                "multi-annotator rows (completion_weights) with gradient_accumulation_steps > 1: the Trainer's "
                "num_items_in_batch counts unweighted tokens; use gradient_accumulation_steps=1"
            )
        if getattr(args, "packing", False):
            raise ValueError("multi-annotator rows (completion_weights) cannot be packed: set packing=False")

    def expand(dataset):
        if not is_multi_completion(dataset):
            return dataset
        return expand_multi_completion(dataset, keep_groups=share_prompt)

    return _map_datasets(expand, train_dataset), _map_datasets(expand, eval_dataset), weighted


def enable_completion_weights(trainer, share_prompt: bool = False) -> None:
    """After TRL's preparation: regroup the rows by prompt and collate them into the shared layout (``share_prompt``),
    or keep the weight column through the Trainer's column removal and collate it into ``completion_weights``."""
    if share_prompt:
        trainer.train_dataset = _map_datasets(group_completions, trainer.train_dataset)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = _map_datasets(group_completions, trainer.eval_dataset)
        trainer._signature_columns = list(GROUPED_COLUMNS)
        base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
        trainer.data_collator = SharedPromptCollator(
            pad_token_id=trainer.processing_class.pad_token_id or 0,
            padding_free=bool(trainer.args.padding_free),
            pad_to_multiple_of=trainer.args.pad_to_multiple_of,
            attention_implementation=attention_implementation(base),
            dtype=base.dtype,
        )
        return
    trainer._set_signature_columns_if_needed()
    if WEIGHT_COLUMN not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, WEIGHT_COLUMN]
    trainer.data_collator = WeightedCollator(trainer.data_collator)


class SharedPromptCollator:
    """Collate regrouped multi-annotator rows (``group_input_ids``, ``group_labels``, ``group_weights``) into the
    shared-prompt layout: model inputs (``input_ids``, ``position_ids``, the 4-D ``attention_mask``, ``labels``) plus
    ``example_index`` (the completion each scored token belongs to), ``completion_weights`` (one per completion, in
    that order) and ``num_sequence_tokens`` (the tokens of the unshared sequences, for TRL's ``num_tokens``)."""

    def __init__(self, pad_token_id: int, padding_free: bool, pad_to_multiple_of, attention_implementation, dtype):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.attention_implementation = attention_implementation
        self.dtype = dtype

    def __call__(self, examples: list[dict]) -> dict:
        groups = [list(zip(e["group_input_ids"], e["group_labels"])) for e in examples]
        layout = pack_shared_prompts(groups, self.pad_token_id, self.padding_free, self.pad_to_multiple_of)
        batch = layout.model_inputs(self.attention_implementation, self.dtype)
        batch["example_index"] = layout.example_index
        batch["completion_weights"] = torch.tensor([w for e in examples for w in e["group_weights"]], dtype=torch.float32)
        batch["num_sequence_tokens"] = torch.tensor(layout.num_sequence_tokens)
        return batch
