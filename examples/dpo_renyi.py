# /// script
# dependencies = [
#     "trl_renyi",
# ]
# ///

"""
Direct preference optimisation of an α-Rényi ensemble of K LoRA adapters: TRL's `dpo.py` with `RenyiDPOTrainer` in
place of `DPOTrainer`. Every `trl dpo` flag works, plus the ensemble fields (`--num_members`, `--alpha`,
`--alpha_warmup_ratio`, ...). The reference model is the frozen base (all members switched off), one pass shared by
every member. Members are LoRA adapters (`--use_peft` is implied); `--num_members 1` is exactly a LoRA `DPOTrainer`
run with the sigmoid loss.

# Embedded model (offline, CPU): SmolLM2-135M-Instruct on the bundled preference data, where two annotator groups
# disagree on some task families
```bash
python examples/dpo_renyi.py \
    --model_name_or_path smollm2-135m-instruct \
    --dataset_name trl_renyi:conflict_preference_chat \
    --num_members 4 \
    --alpha -1 \
    --alpha_warmup_ratio 0.5 \
    --member_init_std 0.01 \
    --beta 0.1 \
    --lora_r 8 \
    --lora_alpha 16 \
    --lora_target_modules all-linear \
    --learning_rate 1e-3 \
    --max_steps 80 \
    --per_device_train_batch_size 8 \
    --gradient_checkpointing false \
    --bf16 false \
    --report_to none \
    --output_dir outputs/SmolLM2-135M-Renyi-DPO
```

# Hub model and dataset (LoRA members on a larger base, GPU)
```bash
python examples/dpo_renyi.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --learning_rate 5.0e-6 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --max_steps 1000 \
    --gradient_accumulation_steps 8 \
    --eval_strategy steps \
    --eval_steps 50 \
    --num_members 4 \
    --alpha 0 \
    --alpha_warmup_ratio 0.5 \
    --member_init_std 0.001 \
    --lora_r 32 \
    --lora_alpha 16 \
    --output_dir Qwen2-0.5B-Renyi-DPO \
    --no_remove_unused_columns
```

# From a YAML file (command-line flags override it)
```bash
python examples/dpo_renyi.py --config examples/configs/dpo_smollm2.yaml
```
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from trl_renyi.cli.training import ensemble_peft_config, load_training_data, model_init_kwargs, select_splits
    from trl_renyi.training.dpo import RenyiDPOTrainer

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    # Load the dataset: a Hub id, a local file or folder, `trl_renyi:<name>`, or a `datasets:` mixture in the YAML
    dataset = load_training_data(script_args, dataset_args, seed=training_args.seed)
    train_dataset, eval_dataset = select_splits(dataset, script_args, training_args)

    # Initialize the Rényi DPO trainer: K LoRA members, the frozen base as the reference model
    trainer = RenyiDPOTrainer(
        model=model_args.model_name_or_path or "smollm2-135m-instruct",
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=ensemble_peft_config(model_args),
    )

    # Train the ensemble
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Save the members (member_k/), renyi_ensemble.json and the model card, and push to the Hub
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Ensemble saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_renyi import RenyiDPOConfig

    dataclass_types = (ScriptArguments, RenyiDPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("dpo", help="Run the Rényi DPO training script", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
