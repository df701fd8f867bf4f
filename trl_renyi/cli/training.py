"""What the training scripts ``trl-renyi sft`` / ``trl-renyi dpo`` share: the parser of ``trl sft`` / ``trl dpo``
with the Rényi config, data loading and checking (Hub names, local files and folders, the bundled conflicting data),
LoRA members by default, the base model's loading arguments, the output folder and the checkpoint to resume from.

The scripts themselves (:mod:`trl_renyi.cli.sft`, :mod:`trl_renyi.cli.dpo`) read top to bottom like TRL's
``trl/scripts/sft.py``; these helpers are the steps they share.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint
from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)

from trl_renyi.cli.parsing import RenyiParser
from trl_renyi.compat import ignore_in_ddp
from trl_renyi.data.formats import prepare_training_dataset
from trl_renyi.data.group_conflicts import (
    ANNOTATOR_COLUMN,
    annotator_choice_rows,
    group_choice_rows,
    group_items_from_rows,
    is_group_annotated,
    pooled_vote_rows,
)
from trl_renyi.data.loading import load_dataset_dict
from trl_renyi.model.loading import DEFAULT_MODEL
from trl_renyi.model.saved_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    METADATA_FILE,
    member_names,
)
from trl_renyi.stability import choice_votes, pair_votes, sequence_votes
from trl_renyi.stability.votes import answer_choice_votes
from trl_renyi.training.config import RenyiDPOConfig
from trl_renyi.training.construction import coerce_config
from trl_renyi.training.dpo import RenyiDPOTrainer
from trl_renyi.training.sft import RenyiSFTTrainer


def make_parser(config_class, prog: str, subparsers=None, name: str | None = None):
    """A :class:`~trl.TrlParser` over ``(ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig)``, the same
    dataclasses as TRL's own scripts with the Rényi config in place of TRL's, so every ``trl sft`` / ``trl dpo`` flag
    and ``--config file.yaml`` works, plus the ensemble fields (``--num_members``, ``--alpha``, ...)."""
    dataclass_types = (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser(name, help=f"Run {prog}", dataclass_types=dataclass_types)
    else:
        parser = RenyiParser(dataclass_types, prog=prog)
    # what the command does anyway, shown in --help: the embedded model by default, LoRA members always
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL, use_peft=True)
    return parser


def load_training_data(script_args, dataset_args, seed: int = 0):
    """The ``DatasetDict`` named by ``--dataset_name`` (Hub id, local file or folder, ``trl_renyi:<name>``) or by a
    ``datasets:`` mixture in the YAML config (TRL's ``DatasetMixtureConfig``)."""
    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError(
            "dataset_name is required: a Hub dataset id, a local data file or folder, or trl_renyi:<name>."
        )
    return load_dataset_dict(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming, seed=seed
    )


def select_splits(dataset, script_args, training_args):
    """``(train, eval or None)`` from the loaded splits; errors name the missing split."""
    splits = list(dataset.keys())
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset_train_split {script_args.dataset_train_split!r} not in the dataset's splits {splits}."
        )
    train = dataset[script_args.dataset_train_split]
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)  # an enum after parsing
    if strategy == "no":
        return train, None
    if script_args.dataset_test_split not in dataset:
        raise ValueError(
            f"eval_strategy={strategy!r} needs the split dataset_test_split="
            f"{script_args.dataset_test_split!r}, which is not in the dataset's splits {splits}."
        )
    return train, dataset[script_args.dataset_test_split]


def ensemble_peft_config(model_args):
    """The ``LoraConfig`` replicated into every member, from ModelConfig's ``--lora_*`` flags. The ensemble is made of
    LoRA members, so ``--use_peft`` is implied."""
    model_args.use_peft = True
    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1 and targets[0] in ("all-linear", "all_linear"):
        model_args.lora_target_modules = "all-linear"  # PEFT recognises the shorthand only as a string
    return get_peft_config(model_args)


def model_init_kwargs(model_args, training_args) -> dict:
    """The loading arguments of the base model (as TRL's scripts build them)."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def prepare_run(script_args, training_args, model_args, dataset_args, kind: str) -> tuple[dict, str | None]:
    """Everything a training script settles before the model loads, in order: the base model's loading arguments
    (into ``training_args.model_init_kwargs``, as TRL's scripts build them), the dataset loaded and checked for
    trainer ``kind``, the output folder writable, the checkpoint to resume from. Returns ``(datasets, checkpoint)``
    with ``datasets`` the trainer's ``train_dataset`` / ``eval_dataset`` keywords."""
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = training_datasets(script_args, training_args, dataset_args, kind)
    check_output_dir(training_args.output_dir)
    return {"train_dataset": train_dataset, "eval_dataset": eval_dataset}, checkpoint_to_resume(training_args)


def training_datasets(script_args, training_args, dataset_args, kind: str):
    """``(train, eval or None)``: the splits named on the command line, each checked for trainer ``kind``
    (``"sft"`` / ``"dpo"``) before any model loads, so that a wrong column, an empty split or a null field is one
    line naming the dataset, the split, the row and the column (ShareGPT messages are converted)."""
    dataset = load_training_data(script_args, dataset_args, seed=training_args.seed)
    splits = select_splits(dataset, script_args, training_args)
    name = script_args.dataset_name or "the dataset mixture"
    text_field = training_args.dataset_text_field if kind == "sft" else "text"
    split_names = (script_args.dataset_train_split, script_args.dataset_test_split)
    return tuple(
        prepare_training_dataset(split, kind, f"{name} (split {split_name!r})", text_field)[0]
        for split, split_name in zip(splits, split_names, strict=True)
    )


def check_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` or raise ``PermissionError`` naming it when it cannot be written (a read-only path),
    before the model loads rather than at the first save."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error}).") from None


def checkpoint_to_resume(training_args) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a folder, or with ``True`` the latest ``checkpoint-*`` of
    ``--output_dir`` (transformers' ``get_last_checkpoint``, as TRL's scripts resolve it); ``None`` to start afresh."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() not in ("true", "yes"):
        return str(value)
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is None:
        raise ValueError(
            f"--resume_from_checkpoint True: no checkpoint-* folder in --output_dir {training_args.output_dir} to "
            "resume from."
        )
    return last


def ignore_bias_buffers(trainer) -> None:
    """``--ignore_bias_buffers`` of TRL's DPO script: DDP skips the model's boolean buffers."""
    ignore_in_ddp(trainer.model, [name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool])


def save_and_push(trainer, script_args, training_args) -> None:
    """The end of a training script: save the ensemble to ``--output_dir`` (members, ``renyi_ensemble.json``, model
    card), push it with ``--push_to_hub``, and finish the trackers and the process group (``trainer.end()``)."""
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Ensemble of {training_args.num_members} members saved to {training_args.output_dir} "
        "(member_k/ adapters, renyi_ensemble.json, README.md)."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()


# ------------------------------------------------------------------------------------------------ trl-renyi stability
def stability_data(script_args, training_args, dataset_args, stability_args):
    """``(fit rows, choice rows or None)`` of ``trl-renyi stability``: for a group-annotated file or choice rows
    (``options`` with ``label`` / ``label_counts``) the rows one LoRA is fitted on and the choice rows the criterion is
    measured on (exact Fisher); for any other data the checked training rows and ``None`` (the trainer's own rows
    are measured)."""
    dataset = load_training_data(script_args, dataset_args, seed=training_args.seed)
    split = script_args.dataset_train_split
    if split not in dataset:
        raise ValueError(f"dataset_train_split {split!r} not in the dataset's splits {list(dataset)}.")
    train = dataset[split]
    name = f"{script_args.dataset_name} (split {split!r})"
    columns = train.column_names
    if is_group_annotated(columns):
        items = group_items_from_rows(train.to_list(), name)
        rows = annotator_choice_rows(items) if stability_args.unit == "source" else group_choice_rows(items)
        return Dataset.from_dict(pooled_vote_rows(items)), rows
    if {"prompt", "options"} <= set(columns) and ({"label", "label_counts"} & set(columns)):
        rows = train.to_list()
        fit = {"prompt": [], "completions": [], "completion_weights": []}
        for row in rows:
            counts = row.get("label_counts") or [int(c == row["label"]) for c in range(len(row["options"]))]
            fit["prompt"].append(row["prompt"])
            fit["completions"].append(list(row["options"]))
            fit["completion_weights"].append([float(c) for c in counts])
        return Dataset.from_dict(fit), rows
    kind = stability_args.trainer
    text_field = training_args.dataset_text_field if kind == "sft" else "text"
    return prepare_training_dataset(train, kind, name, text_field)[0], None


def single_fit_trainer(fit_rows, stability_args, training_args, model_args):
    """A one-member trainer (α = 1: plain TRL training) on ``fit_rows``, whose member 0 is θ*: fitted by
    ``trainer.train()``, or holding ``stability_args.adapter`` (a PEFT adapter folder, or member
    ``stability_args.member`` of a saved ensemble) when one is given."""
    dpo = stability_args.trainer == "dpo"
    fit_dir = str(Path(training_args.output_dir) / "fit")  # the fit's run files apart from the report
    values = {"num_members": 1, "alpha": 1.0, "alpha_warmup_ratio": 0.0, "save_strategy": "no", "output_dir": fit_dir}
    if dpo or stability_args.unit != "source":
        values["source_column"] = None  # one member: routing by source would train exactly the same
    args = dataclasses.replace(training_args, **values)
    args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    if dpo:
        args = coerce_config(args, RenyiDPOConfig, model_args.model_name_or_path, "DPO")
    adapter = _adapter_folder(stability_args)
    if adapter:
        peft_config = LoraConfig.from_pretrained(str(adapter))
        peft_config.base_model_name_or_path = None  # the layout only: the base is the one loaded here (no rename warning)
    else:
        peft_config = ensemble_peft_config(model_args)
    trainer_class = RenyiDPOTrainer if dpo else RenyiSFTTrainer
    trainer = trainer_class(model_args.model_name_or_path, args, train_dataset=fit_rows, peft_config=peft_config)
    if adapter:
        state = load_file(str(adapter / ADAPTER_WEIGHTS))
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = set_peft_model_state_dict(model, state, adapter_name=trainer.member_names[0])
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"--adapter {adapter}: weights {result.unexpected_keys[:3]} do not fit the model.")
    return trainer


def _adapter_folder(stability_args) -> Path | None:
    """The folder holding the adapter weights of ``--adapter`` (an ensemble's ``member_k/``), or ``None``."""
    if stability_args.adapter is None:
        return None
    folder = Path(stability_args.adapter).expanduser()
    if (folder / METADATA_FILE).is_file():
        folder = folder / member_names(stability_args.member + 1)[-1]
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"--adapter {stability_args.adapter}: no {ADAPTER_CONFIG} in {folder}.")
    return folder


def stability_votes(trainer, choice_rows, stability_args, source_column: str | None = None):
    """The votes ``trl-renyi stability`` measures: the choice rows (group files keep annotator ids in
    ``annotator``), or the trainer's own prepared rows per ``--unit`` (sources named by ``source_column``)."""
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    if choice_rows is not None:
        source = source_column or ANNOTATOR_COLUMN
        return choice_votes(choice_rows, tokenizer, unit=stability_args.unit, source_key=source)
    if stability_args.trainer == "dpo":
        return pair_votes(trainer.train_dataset, trainer.beta, unit=stability_args.unit, source_key=source_column)
    if stability_args.unit == "source" and source_column is None:
        raise ValueError("--unit source needs --source_column (the column naming each row's source).")
    votes = sequence_votes(trainer.train_dataset, stability_args.unit)
    return answer_choice_votes(votes) or votes
