"""Evaluation and audit data: multiple-choice questions (TruthfulQA's mc1/mc2 format), preference pairs, and
training datasets in TRL's formats.

Every evaluation item becomes a :class:`ChoiceItem`: a prompt, its choices and a 0/1 label per choice (preference
pairs are two-choice items with the chosen response first and labelled 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl.data_utils import extract_prompt

from trl_renyi.data.formats import evaluation_format
from trl_renyi.data.loading import read_records
from trl_renyi.inference.encoding import is_conversational

FORMATS = ("mc1", "mc2", "preference")
DIALOGUE_MARKER = "\n\nAssistant:"


@dataclass
class ChoiceItem:
    """One evaluation item: ``prompt`` (a question, or a preference prompt: text or chat messages), ``choices`` and
    ``labels`` (1 marks a correct / preferred choice), with an ``id`` and free-form ``info`` (e.g. a category)."""

    prompt: object
    choices: list
    labels: list[int]
    id: str
    info: dict = field(default_factory=dict)


def split_dialogue(chosen, rejected) -> tuple[object, object, object]:
    """``(prompt, chosen, rejected)`` from two full dialogues sharing an implicit prompt.

    Text transcripts in the ``"\\n\\nHuman: … \\n\\nAssistant: …"`` style are cut after the last ``Assistant:`` turn
    marker they share; anything else (chat messages, other text) goes through TRL's ``extract_prompt``.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = os.path.commonprefix([chosen, rejected])
        cut = common.rfind(DIALOGUE_MARKER)
        if cut >= 0:
            end = cut + len(DIALOGUE_MARKER)
            return chosen[:end], chosen[end:], rejected[end:]
    out = extract_prompt({"chosen": chosen, "rejected": rejected})
    return out["prompt"], out["chosen"], out["rejected"]


def _multiple_choice_items(records: list[dict], target: str, path, offset: int = 0) -> list[ChoiceItem]:
    key = f"{target}_targets"
    items = []
    for i, record in enumerate(records, start=offset):
        where = f"{path}, item {i} (counting from 0)"
        question = record.get("question", record.get("prompt"))
        if not isinstance(question, (str, list)) or not question:
            raise ValueError(f"{where}: missing or empty field 'question'.")
        targets = record.get(key)
        if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
            raise ValueError(f"{where}: field {key!r} must be an object with 'choices' and 'labels'.")
        choices, labels = list(targets["choices"]), [int(v) for v in targets["labels"]]
        if len(choices) < 2 or len(choices) != len(labels):
            raise ValueError(f"{where}: {key} needs >= 2 choices and one label per choice ({len(choices)} vs {len(labels)}).")
        if not all(v in (0, 1) for v in labels) or sum(labels) < 1:
            raise ValueError(f"{where}: {key}.labels must be 0/1 with at least one 1, got {labels}.")
        if target == "mc1" and sum(labels) != 1:
            raise ValueError(f"{where}: mc1_targets.labels must mark exactly one correct choice, got {labels}.")
        info = {k: record[k] for k in ("category", "type") if k in record}
        items.append(ChoiceItem(question, choices, labels, str(record.get("id", i)), info))
    return items


def _preference_items(records: list[dict], path, offset: int = 0) -> list[ChoiceItem]:
    items = []
    for i, record in enumerate(records, start=offset):
        for key in ("chosen", "rejected"):
            if key not in record or not record[key]:
                raise ValueError(f"{path}, item {i} (counting from 0): missing or empty field {key!r}.")
        if "prompt" in record:
            prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        else:
            prompt, chosen, rejected = split_dialogue(record["chosen"], record["rejected"])
        if is_conversational(chosen) != is_conversational(rejected):
            raise ValueError(f"{path}, item {i} (counting from 0): 'chosen' and 'rejected' must both be text or both chat messages.")
        items.append(ChoiceItem(prompt, [chosen, rejected], [1, 0], str(record.get("id", i))))
    return items


def load_choice_items(
    path: str | os.PathLike, data_format: str = "auto", first_item: int = 0, max_items: int | None = None
) -> tuple[list[ChoiceItem], str]:
    """Read an evaluation file into :class:`ChoiceItem` s; returns ``(items, format)``.

    Args:
        data_format: ``"auto"``, ``"mc1"``, ``"mc2"`` or ``"preference"``.
        first_item, max_items: evaluate ``items[first_item : first_item + max_items]`` (e.g. held-out questions).
    """
    if data_format not in ("auto", *FORMATS):
        raise ValueError(f"data_format must be 'auto' or one of {FORMATS}, got {data_format!r}.")
    if first_item < 0 or (max_items is not None and max_items < 1):
        raise ValueError(f"first_item must be >= 0 and max_items >= 1, got {first_item} and {max_items}.")
    records = read_records(path)
    fmt = evaluation_format(records[0], path) if data_format == "auto" else data_format
    end = None if max_items is None else first_item + max_items
    records = records[first_item:end]
    if not records:
        raise ValueError(f"{path}: no items left after first_item={first_item}.")
    if fmt == "preference":
        items = _preference_items(records, path, first_item)
    else:
        items = _multiple_choice_items(records, fmt, path, first_item)
    return items, fmt


def question_prompt(question, tokenizer, chat: bool | None = None, system_prompt: str | None = None):
    """The model input for a question: chat messages (optional system message + the user's question) when the
    tokenizer has a chat template (or ``chat=True``), else ``"Q: {question}\\nA:"``."""
    if is_conversational(question):
        return question
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": question}]
    return f"Q: {question}\nA:"


def model_inputs(items: list[ChoiceItem], fmt: str, tokenizer, chat: bool | None = None, system_prompt=None):
    """``(prompts, choices)`` to score: questions rendered by :func:`question_prompt` (plain-text choices get a
    leading space), preference prompts and responses as they are."""
    if fmt == "preference":
        return [item.prompt for item in items], [item.choices for item in items]
    prompts = [question_prompt(item.prompt, tokenizer, chat, system_prompt) for item in items]
    choices = [
        [c if is_conversational(p) else " " + str(c).lstrip() for c in item.choices]
        for p, item in zip(prompts, items, strict=True)
    ]
    return prompts, choices


# ---------------------------------------------------------------------------------------------- training data
def training_format(columns, source: str = "dataset") -> str:
    """The format of a TRL training dataset with ``columns``, as named to the user: ``"preference pairs"`` (chosen /
    rejected, with or without prompt), ``"prompt/completion"``, ``"chat messages"`` or ``"text"``."""
    columns = set(columns)
    if {"chosen", "rejected"} <= columns:
        return "preference pairs"
    if {"prompt", "completion"} <= columns:
        return "prompt/completion"
    if "messages" in columns:
        return "chat messages"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{source} has columns {sorted(columns)}; expected prompt/completion, messages, text, or chosen/rejected "
        "(with or without prompt)."
    )


def training_examples(dataset, source: str = "dataset") -> tuple[str, dict[str, list]]:
    """The examples of a TRL training dataset as ``(kind, columns)``.

    ``kind`` is ``"sft"`` with ``prompt``/``completion`` lists (from prompt/completion, conversational ``messages``
    — the last assistant turn is the completion — or ``text`` language modelling), or ``"preference"`` with
    ``prompt``/``chosen``/``rejected`` lists (implicit prompts are extracted). :func:`training_format` names which.
    """
    fmt = training_format(dataset.column_names, source)
    if fmt == "preference pairs":
        if "prompt" in dataset.column_names:
            rows = list(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"]))
        else:
            rows = [split_dialogue(c, r) for c, r in zip(dataset["chosen"], dataset["rejected"])]
        prompt, chosen, rejected = (list(column) for column in zip(*rows))
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "prompt/completion":
        return "sft", {"prompt": list(dataset["prompt"]), "completion": list(dataset["completion"])}
    if fmt == "chat messages":
        prompts, completions = [], []
        for i, messages in enumerate(dataset["messages"]):
            if not is_conversational(messages) or messages[-1].get("role") != "assistant":
                raise ValueError(f"{source}, example {i} (counting from 0): 'messages' must be chat messages ending with an assistant turn.")
            prompts.append(messages[:-1])
            completions.append(messages[-1:])
        return "sft", {"prompt": prompts, "completion": completions}
    return "sft", {"prompt": [""] * len(dataset), "completion": list(dataset["text"])}
