"""Which dataset format a training dataset is in, checked before any model loads.

The formats are TRL's (https://huggingface.co/docs/trl/dataset_formats) plus the multi-annotator rows of
:mod:`trl_renyi.data.multi_completion`:

=====================  ===========================================  ====================
format                 columns                                      trainer
=====================  ===========================================  ====================
language modelling     ``text`` (or ``messages``, conversational)    SFT
prompt–completion      ``prompt`` + ``completion``                   SFT
multi-annotator        ``prompt`` + ``completions`` (+ weights)      SFT
preference             ``chosen`` + ``rejected`` (+ ``prompt``)      DPO
=====================  ===========================================  ====================

Conversational columns hold lists of ``{"role", "content"}`` messages. ShareGPT-style messages (``from`` /
``value``, roles ``human`` / ``gpt``, a ``conversations`` column) are converted to that form, as TRL's
``maybe_convert_to_chatml`` does, with the ShareGPT role names mapped to ``user`` / ``assistant``.
"""

from __future__ import annotations

from trl_renyi.data.group_conflicts import is_group_annotated
from trl_renyi.data.multi_completion import MULTI_COMPLETION_COLUMNS

#: The columns each trainer accepts, in the order they are tried.
SFT_FORMATS = {
    "multi-annotator": set(MULTI_COMPLETION_COLUMNS),
    "prompt-completion": {"prompt", "completion"},
    "conversational": {"messages"},
    "language-modelling": {"text"},
}
PREFERENCE_FORMATS = {"preference": {"chosen", "rejected"}}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
_MESSAGE_COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")


def _column_order(column: str) -> tuple:
    return (column not in ("prompt",), column)


def detect_format(columns, kind: str, source: str = "dataset", dataset_text_field: str = "text") -> str:
    """The format name of a dataset with ``columns`` for trainer ``kind`` (``"sft"`` or ``"dpo"``).

    Raises ``ValueError`` naming ``source``, the columns found and those expected, and pointing to the other trainer
    when the data fits it.
    """
    found = set(columns or [])
    if {"input_ids"} <= found or {"prompt_ids", "chosen_ids"} <= found:
        return "tokenized"
    sft_formats = {**SFT_FORMATS, "language-modelling": {dataset_text_field}}
    own, other = (sft_formats, PREFERENCE_FORMATS) if kind == "sft" else (PREFERENCE_FORMATS, sft_formats)
    for name, needed in own.items():
        if needed <= found:
            return name
    if "conversations" in found and kind == "sft":
        return "conversational"  # ShareGPT, converted by to_chatml
    expected = ", ".join(f"{' + '.join(sorted(c, key=_column_order))} ({name})" for name, c in own.items())
    message = f"{source} has columns {sorted(found)}; the {kind.upper()} trainer expects {expected}."
    for name, needed in other.items():
        if needed <= found:
            command = "dpo" if kind == "sft" else "sft"
            message += f" These are {name} data: train on them with `trl-renyi {command}` (Renyi{command.upper()}Trainer)."
            break
    raise ValueError(message)


def evaluation_format(first: dict, path="data") -> str:
    """The format of an evaluation file from its first record: ``"mc1"`` / ``"mc2"`` for TruthfulQA-style records
    (``mc1_targets`` / ``mc2_targets``), ``"preference"`` for chosen/rejected pairs (the training formats:
    :func:`detect_format`)."""
    if "mc1_targets" in first or "mc2_targets" in first:
        return "mc1" if "mc1_targets" in first else "mc2"
    if "chosen" in first and "rejected" in first:
        return "preference"
    raise ValueError(
        f"Cannot tell the format of {path}: its first record has fields {sorted(first)}; expected TruthfulQA's "
        "'question' + 'mc1_targets'/'mc2_targets', or preference pairs 'chosen'/'rejected' (with or without 'prompt')."
    )


def is_sharegpt(example: dict) -> bool:
    """Whether a row holds ShareGPT-style messages (``from`` / ``value`` keys, or a ``conversations`` column)."""
    for key in _MESSAGE_COLUMNS:
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and ("from" in value[0] or "value" in value[0]):
            return True
    return False


def to_chatml(example: dict) -> dict:
    """One ShareGPT-style row as TRL's conversational row: ``role`` / ``content`` keys, ``messages`` column."""
    converted = {}
    for key, value in example.items():
        if key in _MESSAGE_COLUMNS and isinstance(value, list):
            messages = []
            for message in value:
                if isinstance(message, dict) and ("from" in message or "value" in message):
                    role = str(message.get("from", message.get("role", "")))
                    message = {"role": _SHAREGPT_ROLES.get(role.lower(), role), "content": message.get("value", "")}
                messages.append(message)
            value = messages
        converted["messages" if key == "conversations" else key] = value
    return converted


def check_messages(example: dict, source: str, row: int) -> None:
    """Raise ``ValueError`` naming ``source`` and ``row`` when a message lacks ``role`` / ``content``."""
    for key in _MESSAGE_COLUMNS:
        value = example.get(key)
        if not isinstance(value, list):
            continue
        for message in value:
            if isinstance(message, dict) and not {"role", "content"} <= set(message):
                raise ValueError(
                    f"{source}, row {row} (counting from 0), column {key!r}: a message has keys {sorted(message)}; expected 'role' and "
                    "'content' (or ShareGPT's 'from' and 'value')."
                )


def prepare_training_datasets(train_dataset, eval_dataset, kind: str, dataset_text_field: str = "text"):
    """:func:`prepare_training_dataset` for a trainer's train and eval datasets (a dict of eval datasets too)."""
    train_dataset, fmt = prepare_training_dataset(train_dataset, kind, "train_dataset", dataset_text_field)
    if isinstance(eval_dataset, dict):
        eval_dataset = {
            name: prepare_training_dataset(data, kind, f"eval_dataset[{name!r}]", dataset_text_field)[0]
            for name, data in eval_dataset.items()
        }
    else:
        eval_dataset = prepare_training_dataset(eval_dataset, kind, "eval_dataset", dataset_text_field)[0]
    return train_dataset, eval_dataset, fmt


def value_problem(value, column: str) -> str | None:
    """What is wrong with one field of a training row (``None`` when nothing is): a null, or something other than
    text or a list of ``{"role", "content"}`` messages (for ``completions``: a list of those; for
    ``completion_weights``: a list of numbers)."""
    if column == "completion_weights":
        if not isinstance(value, list) or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in value):
            return f"{_shown(value)}; expected a list of numbers"
        return None
    if column == "completions":
        if not isinstance(value, list) or not value:
            return f"{_shown(value)}; expected a non-empty list of completions"
        return next((f"completion {j} is {problem}" for j, v in enumerate(value) if (problem := value_problem(v, ""))), None)
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for j, message in enumerate(value):
            content = message.get("content", message.get("value"))
            if content is None:
                return f"message {j} has content null; expected a string"
        return None
    return f"{_shown(value)}; expected a string or a list of {{'role', 'content'}} messages"


def _shown(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def check_values(dataset, columns, source: str) -> None:
    """Raise ``ValueError`` naming ``source``, the row and the column of the first null or non-text field among
    ``columns`` (read in Arrow batches, so a large dataset is scanned without building Python rows for the rest)."""
    columns = [c for c in columns if c in dataset.column_names]
    if not columns:
        return
    row = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for column in columns:
            for offset, value in enumerate(batch[column]):
                problem = value_problem(value, column)
                if problem:
                    raise ValueError(f"{source}, row {row + offset} (counting from 0), column {column!r}: {problem}.")
        row += len(batch[columns[0]])


def format_columns(fmt: str, dataset_text_field: str = "text") -> tuple[str, ...]:
    """The text columns of a format that must hold a string or messages in every row (plus the optional ones)."""
    return {
        "multi-annotator": ("prompt", "completions", "completion_weights"),
        "prompt-completion": ("prompt", "completion"),
        "conversational": ("messages", "conversations"),
        "language-modelling": (dataset_text_field,),
        "preference": ("prompt", "chosen", "rejected"),
    }.get(fmt, ())


def prepare_training_dataset(dataset, kind: str, source: str = "train_dataset", dataset_text_field: str = "text"):
    """Check ``dataset`` (a ``datasets.Dataset`` / ``IterableDataset`` or ``None``) for trainer ``kind`` and return it
    with ShareGPT messages converted; ``(dataset, format)``.

    Raises ``ValueError`` naming ``source`` (and the row and column where one is at fault) for columns of no format,
    an empty dataset, and null or non-text fields.
    """
    if dataset is None:
        return None, None
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset of unknown features: look at its first row
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"{source} is empty: it holds no rows.")
        columns = list(first)
    if is_group_annotated(columns):  # rows are built from it by the trainer (``group_rows``), which checks the items
        return dataset, "group-annotated"
    fmt = detect_format(columns, kind, source, dataset_text_field)
    if not hasattr(dataset, "__len__"):
        return dataset, fmt
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty: it has columns {sorted(columns)} but no rows.")
    first = dataset[0]
    if is_sharegpt(first):
        renamed = [c for c in ("conversations",) if c in dataset.column_names]
        dataset = dataset.map(to_chatml, remove_columns=renamed, desc="Converting ShareGPT messages")
        first = dataset[0]
    check_messages(first, source, 0)
    check_values(dataset, format_columns(fmt, dataset_text_field), source)
    return dataset, fmt
