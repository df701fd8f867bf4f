"""trl_renyi: uncertainty-aware post-training for TRL with α-Rényi ensembles of LoRA adapters."""

__version__ = "0.1.0"

from trl_renyi.inference.ensemble import RenyiEnsemble, ScoreResult
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

__all__ = [
    "RenyiBound",
    "RenyiDPOConfig",
    "RenyiDPOTrainer",
    "RenyiEnsemble",
    "RenyiEnsembleArguments",
    "RenyiSFTConfig",
    "RenyiSFTTrainer",
    "ScoreResult",
    "__version__",
    "build_ensemble",
    "member_names",
    "renyi_bound",
    "tile_for_members",
]
