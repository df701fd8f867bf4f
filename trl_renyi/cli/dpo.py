"""``trl-renyi dpo``: preference optimisation of an α-Rényi LoRA ensemble, with the flags of ``trl dpo``.

Every flag of ``trl dpo`` (``ScriptArguments``, ``DPOConfig``, ``ModelConfig``, ``--config file.yaml``) works, plus the
ensemble fields of :class:`~trl_renyi.RenyiDPOConfig`. ``--dataset_name`` takes a Hub dataset id, a local data file
(json, jsonl, csv, parquet) or folder, or ``trl_renyi:conflict_preference`` (the bundled preference data, where two
annotator groups disagree on some task families). ``--model_name_or_path`` defaults to the embedded
``smollm2-135m-instruct``. Members are LoRA adapters, so ``--use_peft`` is implied; the reference model is the base
model with the adapters disabled.

Example::

    trl-renyi dpo --dataset_name trl_renyi:conflict_preference_chat --num_members 4 --alpha -1 \\
        --alpha_warmup_ratio 0.5 --member_init_std 0.01 --lora_r 8 --lora_target_modules all-linear \\
        --learning_rate 1e-3 --max_steps 80 --per_device_train_batch_size 8 --no_bf16 --output_dir outputs/renyi-dpo
"""

from __future__ import annotations

import argparse

from trl_renyi.cli import training


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    """The parser of ``trl-renyi dpo``: every ``trl dpo`` flag plus the ensemble fields of :class:`RenyiDPOConfig`."""
    from trl_renyi.training.config import RenyiDPOConfig

    return training.make_parser(RenyiDPOConfig, "trl-renyi dpo", subparsers=subparsers, name="dpo")


def train(script_args, training_args, model_args, dataset_args):
    """Train, save and (with ``--push_to_hub``) publish an ensemble from parsed arguments, as TRL's ``dpo.py`` does."""
    from trl_renyi.training.dpo import RenyiDPOTrainer  # imported only when the command runs

    return training.run(RenyiDPOTrainer, script_args, training_args, model_args, dataset_args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-renyi dpo``."""
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(argv)
    train(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
