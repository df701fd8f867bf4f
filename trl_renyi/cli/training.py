"""What ``trl-renyi sft`` and ``trl-renyi dpo`` share: argument parsing like ``trl sft`` / ``trl dpo``, data loading
(Hub names, local files and folders, the bundled conflicting-data generator), LoRA members by default, train, save,
publish.
"""

from __future__ import annotations

from trl_renyi.data.formats import prepare_training_dataset
from trl_renyi.data.loading import load_dataset_dict
from trl_renyi.model.loading import DEFAULT_MODEL


def make_parser(config_class, prog: str, subparsers=None, name: str | None = None):
    """A :class:`~trl.TrlParser` over ``(ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig)``, the same
    dataclasses as TRL's own scripts with the Rényi config in place of TRL's, so every ``trl sft`` / ``trl dpo`` flag
    and ``--config file.yaml`` works, plus the ensemble fields (``--num_members``, ``--alpha``, ...)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from trl_renyi.cli.parsing import RenyiParser

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
    from trl import get_dataset

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
    if training_args.eval_strategy == "no":
        return train, None
    if script_args.dataset_test_split not in dataset:
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy!r} needs the split dataset_test_split="
            f"{script_args.dataset_test_split!r}, which is not in the dataset's splits {splits}."
        )
    return train, dataset[script_args.dataset_test_split]


def ensemble_peft_config(model_args):
    """The ``LoraConfig`` replicated into every member, from ModelConfig's ``--lora_*`` flags. The ensemble is made of
    LoRA members, so ``--use_peft`` is implied."""
    from trl import get_peft_config

    model_args.use_peft = True
    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1 and targets[0] in ("all-linear", "all_linear"):
        model_args.lora_target_modules = "all-linear"  # PEFT recognises the shorthand only as a string
    return get_peft_config(model_args)


def model_init_kwargs(model_args, training_args) -> dict:
    """The loading arguments of the base model (as TRL's scripts build them)."""
    from trl import get_quantization_config

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


def run(trainer_class, script_args, training_args, model_args, dataset_args):
    """Build ``trainer_class`` from parsed arguments, train, save (members, ``renyi_ensemble.json``, model card) and
    push to the Hub when ``--push_to_hub`` is set. Returns the trainer."""
    if not model_args.model_name_or_path:
        model_args.model_name_or_path = DEFAULT_MODEL
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    dataset = load_training_data(script_args, dataset_args, seed=training_args.seed)
    train_dataset, eval_dataset = select_splits(dataset, script_args, training_args)
    # the data's format is checked (and ShareGPT converted) before the model loads, naming the dataset and split
    kind = "dpo" if "DPO" in trainer_class.__name__ else "sft"
    name = script_args.dataset_name or "the dataset mixture"
    train_dataset, _ = prepare_training_dataset(
        train_dataset, kind, f"{name} (split {script_args.dataset_train_split!r})", training_args.dataset_text_field
        if kind == "sft" else "text",
    )  # fmt: skip
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=ensemble_peft_config(model_args),
    )
    if getattr(script_args, "ignore_bias_buffers", False):
        import torch

        from trl_renyi.compat import ignore_in_ddp

        ignore_in_ddp(trainer.model, [name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Ensemble of {training_args.num_members} members saved to {training_args.output_dir} "
        "(member_k/ adapters, renyi_ensemble.json, README.md)."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


class TrainingCommand:
    """``trl-renyi sft`` / ``dpo`` in the shape of TRL's own scripts: :meth:`make_parser`, :meth:`train` (what
    ``examples/`` call) and :meth:`main` (the command's entry point). Trainer and config are imported only when used,
    so ``--help`` stays fast."""

    def __init__(self, kind: str, trainer_module: str, trainer_name: str, config_name: str):
        self.kind, self.trainer_module, self.trainer_name, self.config_name = (
            kind,
            trainer_module,
            trainer_name,
            config_name,
        )

    def make_parser(self, subparsers=None):
        """Every ``trl <kind>`` flag plus the ensemble fields of the Rényi config."""
        from trl_renyi.training import config

        return make_parser(getattr(config, self.config_name), f"trl-renyi {self.kind}", subparsers, self.kind)

    def train(self, script_args, training_args, model_args, dataset_args):
        """Train, save and (with ``--push_to_hub``) publish an ensemble from parsed arguments."""
        import importlib

        trainer_class = getattr(importlib.import_module(self.trainer_module), self.trainer_name)
        return run(trainer_class, script_args, training_args, model_args, dataset_args)

    def main(self, argv: list[str] | None = None) -> int:
        script_args, training_args, model_args, dataset_args = self.make_parser().parse_args_and_config(argv)
        self.train(script_args, training_args, model_args, dataset_args)
        return 0
