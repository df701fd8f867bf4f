"""Tokenize prompt/completion pairs exactly as TRL's SFTTrainer does, for scoring after training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from trl.data_utils import common_prefix_length


def is_conversational(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _ids(tokenizer, value, **chat_kwargs) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_chat(prompt, completion=None):
    """A plain-string prompt as one user message (and a plain-string completion as one assistant message), the way a
    chat user means them; message lists are returned unchanged."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return prompt, completion


def encode_prompt(tokenizer, prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt to continue: plain text as is (or, with ``chat``, as one user message in the tokenizer's
    chat template), chat messages with the generation prompt appended."""
    if chat and isinstance(prompt, str):
        prompt, _ = as_chat(prompt)
    if is_conversational(prompt):
        return _ids(tokenizer, prompt, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    return _ids(tokenizer, prompt)


def encode_prompt_completion(tokenizer, prompt, completion, chat: bool = False) -> tuple[list[int], int]:
    """Token ids of prompt + completion and the index where the completion starts.

    With ``chat``, a plain-string prompt becomes one user message and a plain-string completion one assistant message
    (:func:`as_chat`) before rendering; otherwise plain strings are rendered as plain text, as TRL trains them.

    Plain strings: the completion gets the eos token appended when it lacks one (as SFTTrainer does).
    Conversational message lists: the prompt is rendered with the generation prompt and the full conversation with
    the tokenizer's chat template; the completion starts where the two diverge (TRL's ``common_prefix_length``).
    """
    if is_conversational(prompt) != is_conversational(completion):
        raise ValueError("prompt and completion must both be plain strings or both be lists of chat messages.")
    if chat and isinstance(prompt, str):
        prompt, completion = as_chat(prompt, completion)
    if is_conversational(prompt):
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _ids(tokenizer, list(prompt) + list(completion))
    else:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"prompt and completion must be strings or message lists, got {type(prompt).__name__}.")
        eos = tokenizer.eos_token
        if eos is not None and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = _ids(tokenizer, prompt)
        full_ids = _ids(tokenizer, prompt + completion)
    start = common_prefix_length(prompt_ids, full_ids)
    return full_ids, start


def collate_scoring_batch(
    encoded: Sequence[tuple[list[int], int]], pad_token_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad encoded pairs into ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside completions)."""
    rows = []
    for ids, start in encoded:
        labels = [-100] * start + ids[start:]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
