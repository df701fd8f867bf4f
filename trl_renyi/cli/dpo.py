# /// script
# dependencies = [
#     "trl_renyi",
# ]
# ///

"""``trl-renyi dpo``: direct preference optimisation of an α-Rényi ensemble of K LoRA adapters.

TRL's ``dpo.py`` with :class:`~trl_renyi.RenyiDPOTrainer` in place of ``DPOTrainer``; this file is both the command
(``trl-renyi dpo``) and the script to copy and edit (``examples/dpo_renyi.py`` is this file). Every ``trl dpo`` flag
works, plus the ensemble fields of :class:`~trl_renyi.RenyiDPOConfig` (``--num_members``, ``--alpha``,
``--alpha_warmup_ratio``, ...). The reference model is the frozen base (all members switched off), one pass shared by
every member. Members are LoRA adapters (``--use_peft`` is implied); ``--num_members 1`` is exactly a LoRA
``DPOTrainer`` run with the sigmoid loss. ``--dataset_name`` takes a Hub dataset id, a local data file or folder, or
``trl_renyi:conflict_preference`` (the bundled preference data, where two annotator groups disagree on some task
families); ``--model_name_or_path`` defaults to the embedded ``smollm2-135m-instruct``.

# Embedded model (offline, CPU): SmolLM2-135M-Instruct on the bundled preference data
```bash
python examples/dpo_renyi.py \\
    --model_name_or_path smollm2-135m-instruct \\
    --dataset_name trl_renyi:conflict_preference_chat \\
    --num_members 4 \\
    --alpha -1 \\
    --alpha_warmup_ratio 0.5 \\
    --member_init_std 0.01 \\
    --beta 0.1 \\
    --lora_r 8 \\
    --lora_alpha 16 \\
    --lora_target_modules all-linear \\
    --learning_rate 1e-3 \\
    --max_steps 80 \\
    --per_device_train_batch_size 8 \\
    --gradient_checkpointing false \\
    --bf16 false \\
    --report_to none \\
    --output_dir outputs/SmolLM2-135M-Renyi-DPO
```

# Hub model and dataset (LoRA members on a larger base, GPU)
```bash
python examples/dpo_renyi.py \\
    --dataset_name trl-lib/ultrafeedback_binarized \\
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \\
    --learning_rate 5.0e-6 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 2 \\
    --max_steps 1000 \\
    --gradient_accumulation_steps 8 \\
    --eval_strategy steps \\
    --eval_steps 50 \\
    --num_members 4 \\
    --alpha 0 \\
    --alpha_warmup_ratio 0.5 \\
    --member_init_std 0.001 \\
    --lora_r 32 \\
    --lora_alpha 16 \\
    --output_dir Qwen2-0.5B-Renyi-DPO \\
    --no_remove_unused_columns
```

# From a YAML file (command-line flags override it)
```bash
python examples/dpo_renyi.py --config examples/configs/dpo_smollm2.yaml
```
"""

from __future__ import annotations

import argparse

from trl_renyi.cli import training
from trl_renyi.training.config import RenyiDPOConfig
from trl_renyi.training.dpo import RenyiDPOTrainer


def main(script_args, training_args, model_args, dataset_args):
    # The base model's loading arguments, the dataset checked (columns, empty splits, null fields), the output
    # folder and the checkpoint to resume from, all before the model loads
    datasets, checkpoint = training.prepare_run(script_args, training_args, model_args, dataset_args, "dpo")

    # Initialize the trainer: K LoRA members on one frozen base model, which is also the reference model
    peft_config = training.ensemble_peft_config(model_args)
    trainer = RenyiDPOTrainer(model_args.model_name_or_path, args=training_args, peft_config=peft_config, **datasets)
    if script_args.ignore_bias_buffers:
        training.ignore_bias_buffers(trainer)

    # Train the model
    trainer.train(resume_from_checkpoint=checkpoint)

    # Save (member_k/ adapters, renyi_ensemble.json, model card), push to the Hub, finish the trackers
    training.save_and_push(trainer, script_args, training_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    return training.make_parser(RenyiDPOConfig, "trl-renyi dpo", subparsers, "dpo")


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
