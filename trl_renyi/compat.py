"""Every private TRL / transformers / PEFT internal that trl_renyi relies on, in one place.

The libraries' public extension points are used wherever they exist; what remains (a private hook of
``transformers.Trainer``, a TRL helper that is not exported, a PEFT registration method with a leading underscore)
is reached through this module only, so that an upgrade breaks in one file, with a message that names the
internal, instead of deep inside a training step.

Checked against the versions in :data:`CHECKED_VERSIONS`; ``tests/test_compat.py`` fails with a named message when an
expected internal is missing from the installed libraries. ``EXPECTED_INTERNALS`` also lists the private methods and
class attributes that trl_renyi's trainers override (``Trainer._save``, ``Trainer._load_best_model``, …), since an
upgrade that renames one of them silently bypasses the override.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

#: The library versions these internals were checked against (the upper bounds in ``pyproject.toml``).
CHECKED_VERSIONS = {"trl": "1.16", "transformers": "5.24", "peft": "0.21", "torch": "2.13"}


@contextmanager
def quiet_checkpointing_alias() -> Iterator[None]:
    """Silence transformers' ``FutureWarning`` for the deprecated ``is_gradient_checkpointing`` /
    ``gradient_checkpointing_enable`` / ``gradient_checkpointing_disable`` aliases inside the block.

    PEFT 0.21 (``PeftModel.__init__``, ``get_peft_model``) and TRL 1.16 (``disable_gradient_checkpointing``) still call
    them; the warning is theirs to fix, and nothing a user of trl_renyi can change. Warnings of the same names from a
    user's own calls outside these blocks are untouched.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", category=FutureWarning
        )
        yield


# ---------------------------------------------------------------------------------------------------------- PEFT
def register_member_layer(lora_config, layer_class, quantized: dict | None = None) -> None:
    """Make PEFT create ``layer_class`` for every ``torch.nn.Linear`` and ``Conv1D`` target of ``lora_config``, and
    ``quantized[type]`` for targets of a quantised ``nn.Linear`` subclass (registered first: PEFT takes the first
    registered type the target is an instance of).

    Internal: ``LoraConfig._register_custom_module`` (PEFT's experimental custom-layer API, peft 0.21), consulted
    first when LoRA layers are created (``LoraModel._create_new_module``).
    """
    register = getattr(lora_config, "_register_custom_module", None)
    if register is None:
        raise ImportError(missing_internal("peft", "LoraConfig._register_custom_module"))
    register({**(quantized or {}), torch.nn.Linear: layer_class, Conv1D: layer_class})


def missing_internal(library: str, name: str) -> str:
    """The error message for an internal that the installed ``library`` lacks."""
    return (
        f"{library} no longer provides {name}, which trl_renyi uses (checked against {library} "
        f"{CHECKED_VERSIONS[library]}); install the version range in trl_renyi's pyproject.toml."
    )


def _internal(library: str, module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(missing_internal(library, f"{module}.{name}")) from error


# ----------------------------------------------------------------------------------------------------------- TRL
#: TRL internals, resolved on first use (so that the model-level modules import without TRL, e.g. on a GPU machine
#: that has only torch, transformers and peft): name -> (module, attribute).
#:
#: * ``create_model_from_path``: TRL's loader for a model given by name (``model_init_kwargs``, TRL's order), so
#:   K = 1 by name is TRL;
#: * ``FusedCausalLMOutput``: the output type of TRL's fused LM head, which the completion head returns too;
#: * ``gather_partitioned_parameters``: all-gathers ZeRO-3-partitioned head parameters (a null context otherwise);
#: * ``disable_gradient_checkpointing``: switches gradient checkpointing off (DPO's reference pass).
_TRL_INTERNALS = {
    "create_model_from_path": ("trl.trainer.utils", "create_model_from_path"),
    "FusedCausalLMOutput": ("trl.trainer.utils", "FusedCausalLMOutput"),
    "gather_partitioned_parameters": ("trl.trainer.utils", "maybe_gather_lm_head_ctx"),
    "disable_gradient_checkpointing": ("trl.models.utils", "disable_gradient_checkpointing"),
}


def __getattr__(name: str):
    if name in _TRL_INTERNALS:
        value = _internal("trl", *_TRL_INTERNALS[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DefaultAliasConfigs(dict):
    """A ``peft_config`` mapping that answers ``["default"]`` with a copy of member_0's config when there is none."""

    def __missing__(self, key):
        if key == "default":
            return copy.deepcopy(self["member_0"])
        raise KeyError(key)


@contextmanager
def dpo_trainer_accepts_ensemble(model, ref_model) -> Iterator[None]:
    """Let ``DPOTrainer.__init__`` (trl 1.16) accept the ensemble PeftModel, then undo its reference adapter.

    Handed a ready PeftModel and no ``ref_model``, DPOTrainer reads ``peft_config["default"]`` (a KeyError for an
    ensemble, whose adapters are ``member_*``) and adds a ``"ref"`` adapter copied from it, which it would then score
    as π_ref, also for precomputed reference log-probs: a copy of a member, wrong as soon as a member's initial
    B ≠ 0. The ensemble's π_ref is the base model (see ``RenyiDPOTrainer.compute_ref_log_probs``), so inside
    the block the lookup is answered with member_0's config, and afterwards TRL's ``"ref"`` adapter is deleted.

    Why not through TRL's public arguments: a ready PeftModel with ``ref_model=None`` always takes this branch; the
    bare base model with ``peft_config`` would make TRL wrap it in one adapter named ``"default"`` after the members
    were built and checked (they are assembled before TRL's constructor); and an explicit ``ref_model`` loads a second
    copy of the base, the memory the shared-base reference exists to save. So the swap stays, here, for the
    constructor only.
    """
    if ref_model is not None or not isinstance(model, PeftModel):
        yield
        return
    original = model.peft_config
    if "ref" in original:
        raise ValueError(
            "The PeftModel already holds an adapter named 'ref', which DPOTrainer would overwrite with its own "
            "reference copy; remove it (the ensemble's reference is the base model)."
        )
    aliased = _DefaultAliasConfigs(original)
    model.peft_config = aliased
    try:
        yield
    finally:
        original.update({name: config for name, config in aliased.items() if name not in original})
        model.peft_config = original
        if "ref" in original:
            model.delete_adapter("ref")


def trainer_metrics(trainer, mode: str) -> dict[str, list]:
    """TRL's per-mode metric store, averaged and cleared by TRL's ``log``: ``metrics[key].append(value)``.

    Internal: ``SFTTrainer._metrics`` / ``DPOTrainer._metrics`` (trl 1.16; TRL's documented way to add metrics).
    """
    return trainer._metrics[mode]


def log_num_tokens(trainer, mode: str, new_tokens: int | None = None) -> None:
    """TRL's ``num_tokens`` metric: add ``new_tokens`` (the batch's tokens summed over processes; training only) to TRL's
    running count, divided over tensor-parallel ranks as TRL divides it, and log the count.

    Internals: ``SFTTrainer._total_train_tokens`` / ``DPOTrainer._total_train_tokens`` and ``._tp_size`` (trl 1.16).
    """
    if new_tokens is not None:
        trainer._total_train_tokens += int(new_tokens) // trainer._tp_size
    trainer_metrics(trainer, mode)["num_tokens"] = [trainer._total_train_tokens]


def peft_wraps_moe_parameters(model_type: str) -> bool:
    """Whether PEFT's ``all-linear`` on this MoE ``model_type`` also wraps router / expert parameters
    (``ParamWrapper``), so that resolving ``all-linear`` to the linear layers leaves something out.

    Internal: ``peft.utils.transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN`` (peft 0.21); ``True`` when
    it is missing, so the ensemble then says what it leaves out rather than stay silent.
    """
    try:
        module = importlib.import_module("peft.utils.transformers_weight_conversion")
        return model_type in module._MODEL_TO_CONVERSION_PATTERN
    except (ImportError, AttributeError):
        return True


# -------------------------------------------------------------------------------------------------- transformers
def config_attn_implementation(config) -> str | None:
    """The attention implementation a model config selects (``None`` when unset).

    Internal: ``PretrainedConfig._attn_implementation`` (a property in transformers 5.24, which has no public reader).
    """
    return getattr(config, "_attn_implementation", None)


def signature_columns(trainer) -> list[str]:
    """The dataset columns the Trainer keeps when it removes unused ones (the model forward's arguments).

    Internals: ``Trainer._set_signature_columns_if_needed`` and ``Trainer._signature_columns``.
    """
    trainer._set_signature_columns_if_needed()
    return list(trainer._signature_columns)


def set_signature_columns(trainer, columns) -> None:
    """Make the Trainer keep exactly ``columns`` when it removes unused dataset columns (internal:
    ``Trainer._signature_columns``)."""
    trainer._signature_columns = list(columns)


# --------------------------------------------------------------------------------------------------------- torch
def ignore_in_ddp(model, names) -> None:
    """Parameters and buffers (by name) that ``DistributedDataParallel`` neither broadcasts nor synchronises.

    Internal: ``module._ddp_params_and_buffers_to_ignore``, read by ``torch.nn.parallel.DistributedDataParallel``
    (torch 2.13; TRL's DPO scripts set it for ``ignore_bias_buffers``).
    """
    model._ddp_params_and_buffers_to_ignore = list(names)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """The MoE load-balancing loss every transformers MoE family shares (Mixtral's, which TRL's fused head uses).

    Internal: ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func``.
    """
    function = _internal("transformers", "transformers.models.mixtral.modeling_mixtral", "load_balancing_loss_func")
    return function(router_logits, num_experts, top_k, attention_mask)


#: ``(library, object path)`` of every internal reached here or overridden by trl_renyi's trainers. A path whose last
#: part is an instance attribute (set in ``__init__``, not on the class) is found in the class's source.
EXPECTED_INTERNALS = [
    ("peft", "peft.LoraConfig._register_custom_module"),
    ("peft", "peft.tuners.lora.layer.Linear.update_layer"),
    ("peft", "peft.utils.transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN"),
    ("trl", "trl.trainer.utils.create_model_from_path"),
    ("trl", "trl.trainer.utils.FusedCausalLMOutput"),
    ("trl", "trl.trainer.utils.maybe_gather_lm_head_ctx"),
    ("transformers", "transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func"),
    ("trl", "trl.SFTTrainer._prepare_dataset"),
    ("trl", "trl.DPOTrainer._prepare_dataset"),
    ("trl", "trl.DPOTrainer.compute_ref_log_probs"),
    ("trl", "trl.models.utils.disable_gradient_checkpointing"),
    ("transformers", "transformers.Trainer._save"),
    ("transformers", "transformers.Trainer._save_checkpoint"),
    ("transformers", "transformers.Trainer._get_output_dir"),
    ("transformers", "transformers.Trainer._load_from_checkpoint"),
    ("transformers", "transformers.Trainer._push_from_checkpoint"),
    ("transformers", "transformers.Trainer._prepare_inputs"),
    ("transformers", "transformers.Trainer._load_best_model"),
    ("transformers", "transformers.Trainer._set_signature_columns_if_needed"),
    ("transformers", "transformers.Trainer._signature_columns"),
    ("transformers", "transformers.PretrainedConfig._attn_implementation"),
    ("trl", "trl.SFTTrainer._metrics"),
    ("trl", "trl.DPOTrainer._metrics"),
    ("trl", "trl.SFTTrainer._total_train_tokens"),
    ("trl", "trl.DPOTrainer._total_train_tokens"),
    ("trl", "trl.SFTTrainer._tp_size"),
    ("trl", "trl.DPOTrainer._tp_size"),
    ("trl", "trl.SFTTrainer._tag_names"),
    ("trl", "trl.DPOTrainer._tag_names"),
    ("trl", "trl.SFTTrainer._name"),
    ("trl", "trl.DPOTrainer._name"),
    ("torch", "torch.nn.parallel.DistributedDataParallel._ddp_params_and_buffers_to_ignore"),
]


def _sets_instance_attribute(cls, name: str) -> bool:
    """Whether the source of ``cls`` (or of a class it inherits from) reads or writes the attribute ``name``."""

    pattern = re.compile(rf"\.{re.escape(name)}\b")
    for klass in getattr(cls, "__mro__", ()):
        if klass is object:
            continue
        try:
            if pattern.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def check_internals() -> list[str]:
    """Messages for every expected internal the installed libraries lack (an empty list when all are present)."""
    problems = []
    for library, path in EXPECTED_INTERNALS:
        parts = path.split(".")
        obj, found = None, False
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            found = True
            for index, attribute in enumerate(parts[split:], start=split):
                if hasattr(obj, attribute):
                    obj = getattr(obj, attribute)
                    continue
                last = index == len(parts) - 1
                found = last and isinstance(obj, type) and _sets_instance_attribute(obj, attribute)
                break
            break
        if not found:
            problems.append(missing_internal(library, path))
    return problems
