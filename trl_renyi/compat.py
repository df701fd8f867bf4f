"""Every private TRL / transformers / PEFT internal that trl_renyi relies on, in one place.

The libraries' public extension points are used wherever they exist; what remains (a private hook of
``transformers.Trainer``, a TRL helper that is not exported, a PEFT registration method with a leading underscore)
is reached through this module only, so that an upgrade breaks in one file, with a message that names the
internal, instead of deep inside a training step.

Checked against the versions in :data:`CHECKED_VERSIONS`; ``tests/test_compat.py`` fails with a named message when
an expected internal is missing from the installed libraries.
"""

from __future__ import annotations

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


#: ``(library, object path)`` of every internal reached here or overridden by trl_renyi's trainers.
EXPECTED_INTERNALS = [
    ("peft", "peft.LoraConfig._register_custom_module"),
    ("peft", "peft.tuners.lora.layer.Linear.update_layer"),
    ("trl", "trl.trainer.utils.create_model_from_path"),
    ("trl", "trl.trainer.utils.FusedCausalLMOutput"),
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
    import importlib

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
