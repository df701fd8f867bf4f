"""How both trainers are built, up to TRL's constructor: one path for SFT and DPO.

:func:`construct_ensemble` runs the steps in order — the config converted, the options refused by name, the datasets
checked before any model loads, TRL's ``quantization_config`` folded in, the K-member model built (or an existing
``member_*`` PeftModel attached) — and returns an :class:`EnsembleConstruction` whose :meth:`~EnsembleConstruction.
trl_arguments` are what the trainer passes to TRL's constructor, inside :func:`model_init_kwargs_spent`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

from peft import PeftConfig, PeftModel
from transformers import TrainingArguments, set_seed

from trl_renyi.compat import create_model_from_path
from trl_renyi.data.formats import prepare_training_datasets
from trl_renyi.data.group_conflicts import (
    GROUP_ROW_SETTINGS,
    group_training_dataset,
)
from trl_renyi.model.loading import (
    check_model_reference,
    is_embedded,
    load_causal_lm,
    load_tokenizer,
    model_load_error,
    with_quantization_config,
)
from trl_renyi.model.members import attach_ensemble, build_ensemble
from trl_renyi.model.shared_prompt import shared_prompt_refusal
from trl_renyi.training.config import RenyiEnsembleArguments
from trl_renyi.training.options import check_options

logger = logging.getLogger(__name__)


def coerce_config(args, config_class, model_name: str, suffix: str):
    """Return ``args`` as ``config_class``: a default one when ``None``, converted from plain TRL/HF arguments."""
    if args is None:
        return config_class(output_dir=f"{model_name.split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        values["hub_token"] = args.hub_token
        known = set(config_class.__dataclass_fields__)
        return config_class(**{k: v for k, v in values.items() if k in known})
    raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}.")


@dataclass
class EnsembleConstruction:
    """What a trainer's constructor hands on to TRL's: the converted config, the K-member model, the tokenizer and
    the checked datasets and their format, and whether the model was loaded here by name (so ``model_init_kwargs`` are spent)."""

    args: RenyiEnsembleArguments
    model: PeftModel
    processing_class: object
    train_dataset: object
    eval_dataset: object
    dataset_format: str
    loaded_here: bool

    def trl_arguments(self, **others) -> dict:
        """The keyword arguments of TRL's constructor: these fields and the trainer's ``others``."""
        return dict(
            model=self.model, args=self.args, train_dataset=self.train_dataset, eval_dataset=self.eval_dataset,
            processing_class=self.processing_class, **others,
        )  # fmt: skip


def construct_ensemble(
    model, args, config_class, kind: str, peft_config, processing_class, train_dataset, eval_dataset,
    quantization_config=None, spends_init_kwargs: bool = True, compute_loss_func=None, check_config=None,
) -> EnsembleConstruction:  # fmt: skip
    """Both trainers' construction up to TRL's constructor, in order: the config (``config_class``, converted from
    plain TRL/HF arguments), the options refused by name, the datasets checked before any model loads
    (``kind`` ``"sft"`` or ``"dpo"``), the trainer's own ``check_config(args)``, TRL's ``quantization_config``
    folded into ``model_init_kwargs``, and the K-member model. ``spends_init_kwargs``: a model loaded here by name
    used ``model_init_kwargs`` (DPO: unless a reference model is also given by name)."""
    suffix = config_class.__name__.removesuffix("Config")
    args = coerce_config(args, config_class, model if isinstance(model, str) else "model", suffix)
    check_options(args, compute_loss_func=compute_loss_func)
    train_dataset, eval_dataset = prepare_group_rows(args, train_dataset, eval_dataset, kind)
    train_dataset, eval_dataset, dataset_format = prepare_training_datasets(
        train_dataset, eval_dataset, kind, getattr(args, "dataset_text_field", "text")
    )
    if check_config is not None:
        check_config(args)
    if isinstance(model, str):  # one line naming a model that cannot be loaded, before anything is loaded
        check_model_reference(model, (args.model_init_kwargs or {}).get("revision"))
    loaded_here = isinstance(model, str) and spends_init_kwargs
    args.model_init_kwargs = with_quantization_config(args.model_init_kwargs, model, quantization_config)
    model, processing_class = prepare_ensemble_model(model, args, peft_config, processing_class)
    return EnsembleConstruction(args, model, processing_class, train_dataset, eval_dataset, dataset_format, loaded_here)


def prepare_group_rows(args, train_dataset, eval_dataset, kind: str):
    """``(train, eval)`` with a group-annotated dataset replaced by the training rows ``args.group_rows`` names
    (:func:`~trl_renyi.data.group_conflicts.group_training_dataset`; group names dropped) and the settings those rows
    need set on ``args`` (:data:`~trl_renyi.data.group_conflicts.GROUP_ROW_SETTINGS`), one log line saying so. A
    setting the user gave another value is refused by name, as is ``group_rows`` on data that is not group-annotated."""
    rows_used = None
    converted = []
    for dataset, source in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
        if isinstance(dataset, dict):
            parts = {k: group_training_dataset(v, args.group_rows, kind, f"{source}[{k!r}]", args.seed) for k, v in dataset.items()}
            dataset, rows = {k: d for k, (d, _) in parts.items()}, next((r for _, r in parts.values() if r), None)
        else:
            split = "train" if source == "train_dataset" else None  # a file's own held-out items never train
            dataset, rows = group_training_dataset(dataset, args.group_rows, kind, source, args.seed, split)
        rows_used = rows_used or rows
        converted.append(dataset)
    if rows_used is None:
        if args.group_rows is not None:
            columns = getattr(train_dataset, "column_names", None)
            raise ValueError(
                f"group_rows={args.group_rows!r} builds training rows from a group-annotated dataset (columns prompt, "
                f"options, groups); train_dataset has columns {columns}. Unset group_rows for other data."
            )
        return tuple(converted)
    for name, value in GROUP_ROW_SETTINGS.get(rows_used, {}).items():
        now = getattr(args, name)
        default = next(f.default for f in dataclasses.fields(args) if f.name == name)
        if now != value and now != default:
            raise ValueError(f"group_rows={rows_used!r} needs {name}={value!r}, but {name} is {now!r}.")
        if now != value:
            setattr(args, name, value)
            logger.info("group_rows=%r: %s set to %r.", rows_used, name, value)
    if hasattr(args, "_validate_sft_fields"):
        args._validate_sft_fields()
    return tuple(converted)


@contextlib.contextmanager
def model_init_kwargs_spent(args, loaded_here: bool):
    """Around TRL's constructor: a model this trainer loaded by name has already used ``args.model_init_kwargs``,
    so TRL, which only sees the instance, must not warn that they "will be ignored". They are restored after."""
    kwargs = args.model_init_kwargs
    if loaded_here:
        args.model_init_kwargs = None
    try:
        yield
    finally:
        args.model_init_kwargs = kwargs


def prepare_ensemble_model(model, args: RenyiEnsembleArguments, peft_config, processing_class):
    """Return ``(ensemble PeftModel, processing_class)`` to hand to TRL's constructor (with no peft_config)."""
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError(
                "Pass either a PeftModel holding the member_* adapters or a base model with peft_config, not both."
            )
        return attach_ensemble(model, args.num_members), processing_class
    if peft_config is None:
        raise ValueError(
            "peft_config is required: a LoraConfig replicated into num_members LoRA members (or pass a PeftModel "
            "that already holds adapters member_0 … member_{K-1})."
        )
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}.")
    # Same seeding point as TRL: the first adapter's init draws from the RNG right after set_seed(args.seed).
    set_seed(args.seed)
    if isinstance(model, str):
        name = model
        init_kwargs = dict(args.model_init_kwargs or {})
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        if is_embedded(name):
            model = load_causal_lm(name, dtype=init_kwargs.pop("dtype", "float32"), **init_kwargs)
            if processing_class is None:
                processing_class = load_tokenizer(name)
        else:  # TRL's own loader, in TRL's order, so that K = 1 by name is TRL to the bit
            try:
                model = create_model_from_path(name, **init_kwargs)
            except OSError as error:
                raise model_load_error(name, error) from error
    peft_model = build_ensemble(model, peft_config, args.num_members, args.seed, args.member_init_std)
    return peft_model, processing_class


def resolve_share_prompt(args: RenyiEnsembleArguments, model, blockers: dict[str, bool]) -> bool:
    """Whether to run one prompt pass for all completions of a prompt (``args.share_prompt``; ``None``: wherever it
    is exact). ``blockers`` maps a reason to whether it applies; ``share_prompt=True`` with a reason is refused."""
    if args.share_prompt is False:
        return False
    reason = shared_prompt_refusal(model) or next((why for why, applies in blockers.items() if applies), None)
    if reason is None:
        return True
    if args.share_prompt:
        raise ValueError(f"share_prompt=True cannot be honoured: {reason}. Set share_prompt=False or leave it unset.")
    logger.debug("share_prompt is off: %s.", reason)
    return False
