"""Every private TRL / transformers / PEFT internal that trl_renyi relies on, in one place.

The libraries' public extension points are used wherever they exist; what remains (a private hook of
``transformers.Trainer``, a TRL helper that is not exported, a PEFT registration method with a leading underscore)
is reached through this module only, so that an upgrade breaks in one file, with a message that names the
internal, instead of deep inside a training step.

Checked against the versions in :data:`CHECKED_VERSIONS`; ``tests/test_compat.py`` fails with a named message when
an expected internal is missing from the installed libraries.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

#: The library versions these internals were checked against (the upper bounds in ``pyproject.toml``).
CHECKED_VERSIONS = {"trl": "1.16", "transformers": "5.24", "peft": "0.21"}


# ---------------------------------------------------------------------------------------------------------- PEFT
def register_member_layer(lora_config, layer_class) -> None:
    """Make PEFT create ``layer_class`` for every ``torch.nn.Linear`` and ``Conv1D`` target of ``lora_config``.

    Internal: ``LoraConfig._register_custom_module`` (PEFT's experimental custom-layer API, peft 0.21), consulted
    first when LoRA layers are created (``LoraModel._create_new_module``).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    register = getattr(lora_config, "_register_custom_module", None)
    if register is None:
        raise ImportError(missing_internal("peft", "LoraConfig._register_custom_module"))
    register({torch.nn.Linear: layer_class, Conv1D: layer_class})


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
    """
    from peft import PeftModel

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
def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """The MoE load-balancing loss every transformers MoE family shares (Mixtral's, which TRL's fused head uses).

    Internal: ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func``.
    """
    function = _internal("transformers", "transformers.models.mixtral.modeling_mixtral", "load_balancing_loss_func")
    return function(router_logits, num_experts, top_k, attention_mask)


#: ``(library, object path)`` of every internal reached here or overridden by trl_renyi's trainers.
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
]


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
            try:
                for attribute in parts[split:]:
                    obj = getattr(obj, attribute)
                found = True
            except AttributeError:
                found = False
            break
        if not found:
            problems.append(missing_internal(library, path))
    return problems
