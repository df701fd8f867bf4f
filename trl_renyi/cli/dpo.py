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

from trl_renyi.cli import training

_COMMAND = training.TrainingCommand("dpo", "trl_renyi.training.dpo", "RenyiDPOTrainer", "RenyiDPOConfig")
make_parser = _COMMAND.make_parser
train = _COMMAND.train
main = _COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
