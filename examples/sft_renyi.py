# /// script
# dependencies = [
#     "trl_renyi",
# ]
# ///

"""
Supervised fine-tuning of an α-Rényi ensemble of K LoRA adapters: TRL's `sft.py` with `RenyiSFTTrainer` in place of
`SFTTrainer`. Every `trl sft` flag works, plus the ensemble fields (`--num_members`, `--alpha`,
`--alpha_warmup_ratio`, `--responsibility_floor`, `--member_init_std`, ...). The base model stays frozen and every
member is a LoRA adapter (`--use_peft` is implied); `--num_members 1` is exactly a LoRA `SFTTrainer` run.

# Embedded model (offline, CPU): SmolLM2-135M-Instruct on the bundled conflicting data
```bash
python examples/sft_renyi.py \
    --model_name_or_path smollm2-135m-instruct \
    --dataset_name trl_renyi:conflict_sft_chat \
    --num_members 4 \
    --alpha -1 \
    --alpha_warmup_ratio 0.5 \
    --responsibility_floor 0.1 \
    --member_init_std 0.01 \
    --lora_r 8 \
    --lora_alpha 16 \
    --lora_target_modules all-linear \
    --learning_rate 2e-3 \
    --lr_scheduler_type constant \
    --max_steps 80 \
    --per_device_train_batch_size 8 \
    --gradient_checkpointing false \
    --bf16 false \
    --report_to none \
    --output_dir outputs/SmolLM2-135M-Renyi-SFT
```

# Hub model and dataset (LoRA members on a larger base, GPU)
```bash
python examples/sft_renyi.py \
    --model_name_or_path Qwen/Qwen2-0.5B \
    --dataset_name trl-lib/Capybara \
    --learning_rate 2.0e-4 \
    --num_train_epochs 1 \
    --packing \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --eos_token '<|im_end|>' \
    --eval_strategy steps \
    --eval_steps 100 \
    --num_members 4 \
    --alpha 0 \
    --alpha_warmup_ratio 0.5 \
    --responsibility_floor 0.1 \
    --member_init_std 0.001 \
    --lora_r 32 \
    --lora_alpha 16 \
    --lora_target_modules all-linear \
    --output_dir Qwen2-0.5B-Renyi-SFT \
    --push_to_hub
```

# From a YAML file (command-line flags override it)
```bash
python examples/sft_renyi.py --config examples/configs/sft_smollm2.yaml
```

`--dataset_name` also takes a local file (`data.jsonl`, `.json`, `.csv`, `.parquet`) or a `save_to_disk` folder.
"""

from trl_renyi.cli.sft import make_parser, train

if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    train(script_args, training_args, model_args, dataset_args)
