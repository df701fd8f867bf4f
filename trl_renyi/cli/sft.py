"""``trl-renyi sft``: supervised fine-tuning of an α-Rényi LoRA ensemble, with the flags of ``trl sft``.

Every flag of ``trl sft`` (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``--config file.yaml``) works, plus the
ensemble fields of :class:`~trl_renyi.RenyiSFTConfig` (``--num_members``, ``--alpha``, ``--alpha_warmup_ratio``,
``--member_init_std``, ...). ``--dataset_name`` takes a Hub dataset id, a local data file (json, jsonl, csv, parquet)
or folder, or ``trl_renyi:conflict_sft`` (the bundled conflicting data). ``--model_name_or_path`` defaults to the
embedded ``smollm2-135m-instruct``. Members are LoRA adapters, so ``--use_peft`` is implied.

Example::

    trl-renyi sft --model_name_or_path smollm2-135m-instruct --dataset_name trl_renyi:conflict_sft_chat \\
        --num_members 4 --alpha -1 --alpha_warmup_ratio 0.5 --member_init_std 0.01 \\
        --lora_r 8 --lora_alpha 16 --lora_target_modules all-linear --learning_rate 2e-3 \\
        --max_steps 80 --per_device_train_batch_size 8 --no_bf16 --output_dir outputs/renyi-sft
"""

from __future__ import annotations

from trl_renyi.cli import training

_COMMAND = training.TrainingCommand("sft", "trl_renyi.training.sft", "RenyiSFTTrainer", "RenyiSFTConfig")
make_parser = _COMMAND.make_parser
train = _COMMAND.train
main = _COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
