# /// script
# dependencies = [
#     "trl_renyi",
# ]
# ///

"""``trl-renyi sft``: supervised fine-tuning of an α-Rényi ensemble of K LoRA adapters.

TRL's ``sft.py`` with :class:`~trl_renyi.RenyiSFTTrainer` in place of ``SFTTrainer``; this file is both the command
(``trl-renyi sft``) and the script to copy and edit (``examples/sft_renyi.py`` is this file). Every ``trl sft`` flag
works (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``--config file.yaml``), plus the ensemble fields of
:class:`~trl_renyi.RenyiSFTConfig` (``--num_members``, ``--alpha``, ``--alpha_warmup_ratio``,
``--responsibility_floor``, ``--member_init_std``, ...). The base model stays frozen and every member is a LoRA adapter
(``--use_peft`` is implied); ``--num_members 1`` is exactly a LoRA ``SFTTrainer`` run. ``--dataset_name`` takes a Hub
dataset id, a local data file (json, jsonl, csv, parquet) or ``save_to_disk`` folder, or ``trl_renyi:conflict_sft``
(the bundled conflicting data); ``--model_name_or_path`` defaults to the embedded ``smollm2-135m-instruct``.

# Embedded model (offline, CPU): SmolLM2-135M-Instruct on the bundled conflicting data
```bash
python examples/sft_renyi.py \\
    --model_name_or_path smollm2-135m-instruct \\
    --dataset_name trl_renyi:conflict_sft_chat \\
    --num_members 4 \\
    --alpha -1 \\
    --alpha_warmup_ratio 0.5 \\
    --responsibility_floor 0.1 \\
    --member_init_std 0.01 \\
    --lora_r 8 \\
    --lora_alpha 16 \\
    --lora_target_modules all-linear \\
    --learning_rate 2e-3 \\
    --lr_scheduler_type constant \\
    --max_steps 80 \\
    --per_device_train_batch_size 8 \\
    --gradient_checkpointing false \\
    --bf16 false \\
    --report_to none \\
    --output_dir outputs/SmolLM2-135M-Renyi-SFT
```

# Hub model and dataset (LoRA members on a larger base, GPU)
```bash
python examples/sft_renyi.py \\
    --model_name_or_path Qwen/Qwen2-0.5B \\
    --dataset_name trl-lib/Capybara \\
    --learning_rate 2.0e-4 \\
    --num_train_epochs 1 \\
    --packing \\
    --per_device_train_batch_size 2 \\
    --gradient_accumulation_steps 8 \\
    --eos_token '<|im_end|>' \\
    --eval_strategy steps \\
    --eval_steps 100 \\
    --num_members 4 \\
    --alpha 0 \\
    --alpha_warmup_ratio 0.5 \\
    --responsibility_floor 0.1 \\
    --member_init_std 0.001 \\
    --lora_r 32 \\
    --lora_alpha 16 \\
    --lora_target_modules all-linear \\
    --output_dir Qwen2-0.5B-Renyi-SFT \\
    --push_to_hub
```

# From a YAML file (command-line flags override it)
```bash
python examples/sft_renyi.py --config examples/configs/sft_smollm2.yaml
```
"""

from __future__ import annotations

import argparse

from trl_renyi.cli import training
from trl_renyi.training.config import RenyiSFTConfig
from trl_renyi.training.sft import RenyiSFTTrainer


def main(script_args, training_args, model_args, dataset_args):
    # The base model's loading arguments, the dataset checked (columns, empty splits, null fields), the output
    # folder and the checkpoint to resume from, all before the model loads
    datasets, checkpoint = training.prepare_run(script_args, training_args, model_args, dataset_args, "sft")

    # Initialize the trainer: K LoRA members (the --lora_* flags) on one frozen base model
    peft_config = training.ensemble_peft_config(model_args)
    trainer = RenyiSFTTrainer(model_args.model_name_or_path, training_args, peft_config=peft_config, **datasets)

    # Train the model
    trainer.train(resume_from_checkpoint=checkpoint)

    # Save (member_k/ adapters, renyi_ensemble.json, model card), push to the Hub, finish the trackers
    training.save_and_push(trainer, script_args, training_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    return training.make_parser(RenyiSFTConfig, "trl-renyi sft", subparsers, "sft")


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
