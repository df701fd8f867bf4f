"""trl_renyi: uncertainty-aware post-training for TRL with α-Rényi ensembles of LoRA adapters.

The public names are imported on first use, so that ``import trl_renyi.model.layer`` (or ``trl_renyi.objective``)
needs only torch, transformers and peft, while ``from trl_renyi import RenyiSFTTrainer`` imports TRL as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trl_renyi.run_log import configure_library_logger
from trl_renyi.version import __version__

configure_library_logger()

_EXPORTS = {
    "RenyiEnsemble": "trl_renyi.inference.ensemble",
    "ScoreResult": "trl_renyi.inference.scoring",
    "member_names": "trl_renyi.model.layer",
    "build_ensemble": "trl_renyi.model.members",
    "tile_for_members": "trl_renyi.model.members",
    "RenyiBound": "trl_renyi.objective",
    "renyi_bound": "trl_renyi.objective",
    "RenyiDPOConfig": "trl_renyi.training.config",
    "RenyiEnsembleArguments": "trl_renyi.training.config",
    "RenyiSFTConfig": "trl_renyi.training.config",
    "RenyiDPOTrainer": "trl_renyi.training.dpo",
    "RenyiSFTTrainer": "trl_renyi.training.sft",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from trl_renyi.inference.ensemble import RenyiEnsemble
    from trl_renyi.inference.scoring import ScoreResult
    from trl_renyi.model.layer import member_names
    from trl_renyi.model.members import build_ensemble, tile_for_members
    from trl_renyi.objective import RenyiBound, renyi_bound
    from trl_renyi.training.config import (
        RenyiDPOConfig,
        RenyiEnsembleArguments,
        RenyiSFTConfig,
    )
    from trl_renyi.training.dpo import RenyiDPOTrainer
    from trl_renyi.training.sft import RenyiSFTTrainer


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_renyi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
