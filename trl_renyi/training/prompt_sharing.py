"""Collators that run a prompt once for all the sequences that start with it (see :mod:`trl_renyi.model.shared_prompt`).

* :class:`SharedPromptCollator`: regrouped multi-annotator rows, one packed row per prompt with all its completions.
* :class:`SharedPrefixCollator`: ordinary SFT batches whose rows all start with the same unscored prefix (a system
  prompt, a chat template's header, a few-shot preamble): when sharing it saves at least ``min_saving`` of the
  batch's tokens, the batch becomes one packed row in which that prefix runs once; otherwise TRL's own collator
  builds the batch as usual. Either way the loss and the gradients are those of the unshared batch.
"""

from __future__ import annotations

import torch

from trl_renyi.data.multi_completion import GROUPED_SOURCES, WeightedCollator
from trl_renyi.model.shared_prompt import (
    SharedPromptBatch,
    attention_implementation,
    pack_shared_prompts,
    shared_prefix_length,
)


def layout_batch(layout: SharedPromptBatch, attention_implementation: str, dtype) -> dict:
    """The model inputs of a packed layout plus what the trainer reads besides: ``example_index`` (the sequence of
    every scored token) and ``num_sequence_tokens`` (the unshared sequences' tokens, for TRL's ``num_tokens``)."""
    batch = layout.model_inputs(attention_implementation, dtype)
    batch["example_index"] = layout.example_index
    batch["num_sequence_tokens"] = torch.tensor(layout.num_sequence_tokens)
    return batch


class SharedPromptCollator:
    """Collate regrouped multi-annotator rows (``group_input_ids``, ``group_labels``, ``group_weights``) into the
    shared-prompt layout: model inputs (``input_ids``, ``position_ids``, the 4-D ``attention_mask``, ``labels``) plus
    ``example_index`` (the completion each scored token belongs to), ``completion_weights`` (one per completion, in
    that order), ``num_sequence_tokens`` (the tokens of the unshared sequences, for TRL's ``num_tokens``) and, with
    ``row_index``, the batch row of every completion, and, for rows with sources, ``source_ids`` (one per
    completion)."""

    def __init__(
        self, pad_token_id: int, padding_free: bool, pad_to_multiple_of, attention_implementation, dtype,
        row_index: bool = False,
    ):  # fmt: skip
        self.row_index = row_index
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.attention_implementation = attention_implementation
        self.dtype = dtype

    def __call__(self, examples: list[dict]) -> dict:
        groups = [list(zip(e["group_input_ids"], e["group_labels"])) for e in examples]
        layout = pack_shared_prompts(groups, self.pad_token_id, self.padding_free, self.pad_to_multiple_of)
        batch = layout_batch(layout, self.attention_implementation, self.dtype)
        batch["completion_weights"] = torch.tensor([w for e in examples for w in e["group_weights"]], dtype=torch.float32)
        if self.row_index:
            batch["row_index"] = torch.tensor([i for i, e in enumerate(examples) for _ in e["group_weights"]])
        if examples and GROUPED_SOURCES in examples[0]:
            batch["source_ids"] = torch.tensor([s for e in examples for s in e[GROUPED_SOURCES]], dtype=torch.long)
        return batch


class SharedPrefixCollator:
    """Wraps TRL's SFT collator: a batch whose rows share an unscored prefix saving at least ``min_saving`` of its
    tokens (and packing into at most ``max_packed_tokens``) is packed into one row that runs the prefix once."""

    def __init__(self, collator, attention_implementation, dtype, min_saving: float = 0.25, max_packed_tokens=4096):
        self.collator = collator
        self.attention_implementation = attention_implementation
        self.dtype = dtype
        self.min_saving = min_saving
        self.max_packed_tokens = max_packed_tokens

    def __call__(self, examples: list[dict]) -> dict:
        if not all(isinstance(e, dict) and "input_ids" in e for e in examples):  # not tokenised here (e.g. vision)
            return self.collator(examples)
        sequences = [(e["input_ids"], e.get("labels", e["input_ids"])) for e in examples]
        total = sum(len(ids) for ids, _ in sequences)
        shared = shared_prefix_length([list(ids) for ids, _ in sequences], [list(lab) for _, lab in sequences])
        saving = (shared - 1) * (len(sequences) - 1) if shared > 1 else 0
        if len(sequences) < 2 or saving < self.min_saving * total or total - saving > self.max_packed_tokens:
            return self.collator(examples)
        layout = pack_shared_prompts([sequences], self.collator.pad_token_id or 0, padding_free=True)
        return layout_batch(layout, self.attention_implementation, self.dtype)

    def __getattr__(self, name):
        return getattr(self.collator, name)


def ensemble_collator(args, collator, model, share_prompt: bool, weighted: bool, vision: bool = False):
    """The SFT collator the ensemble needs, from the one TRL's constructor made (its default, with the pad token it
    set, or the user's):

    * multi-annotator rows with ``share_prompt``: :class:`SharedPromptCollator` (every prompt with all its completions
      in one packed row; the row index of each completion with ``multi_annotator_routing="row"``);
    * multi-annotator rows without it: ``collator`` in a :class:`~trl_renyi.data.multi_completion.WeightedCollator`,
      which passes the weights and sources on;
    * other rows with ``share_prompt``: ``collator`` in a :class:`SharedPrefixCollator` (a prefix common to a batch's
      rows, such as a system prompt, runs once);
    * otherwise ``collator`` itself.

    It is installed after TRL's constructor, not handed to it: TRL refuses any collator of the caller's under
    ``padding_free`` and sets the pad token only when it builds its own.
    """
    if vision or not (weighted or share_prompt):  # vision rows are tokenised by TRL's own collator
        return collator
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation, dtype = attention_implementation(base), base.dtype
    if weighted and share_prompt:
        return SharedPromptCollator(
            pad_token_id=getattr(collator, "pad_token_id", None) or 0, padding_free=bool(args.padding_free),
            pad_to_multiple_of=args.pad_to_multiple_of, attention_implementation=implementation, dtype=dtype,
            row_index=args.multi_annotator_routing == "row",
        )  # fmt: skip
    return WeightedCollator(collator) if weighted else SharedPrefixCollator(collator, implementation, dtype)
