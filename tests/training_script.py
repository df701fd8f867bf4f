"""Small, fully offline training runs shared by the reliability tests, in-process and in subprocesses.

Launched as a script it runs one of two jobs:

* ``pause``: train, and at the end of optimizer step ``--pause-after-step`` write ``paused`` in the output folder
  and wait (the test kills the process there with SIGTERM, mid-epoch, after a checkpoint was saved);
* ``distributed``: train under ``accelerate launch`` (each ``--kind`` in turn) and have every process write
  ``KIND/rank{r}.json`` (its rank, the world size, the backend, its logged losses) and ``KIND/rank{r}.safetensors``
  (its member weights).

    python tests/training_script.py pause --kind sft --output-dir OUT --pause-after-step 3
    accelerate launch --multi_gpu --num_processes 2 tests/training_script.py distributed --kind sft,dpo --output-dir OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import TrainerCallback

from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.testing import tiny_llama, tiny_tokenizer

PROMPTS = [
    "What colour is the sky?",
    "What is two plus three?",
    "Say hello.",
    "Count to three.",
    "What is the capital of France?",
    "Name a colour.",
    "What colour is grass?",
    "Say good morning.",
]
CHOSEN = [" It is blue.", " Five.", " Ahoy matey!", " one two three", " Paris.", " red", " green", " Good morning, sir."]
REJECTED = [" It is green.", " Six.", " Go away.", " three two one", " Rome.", " seven", " blue", " Good night."]

# Settings of every scripted run; tests override some of them.
COMMON = {
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "logging_steps": 1,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 0,
    "learning_rate": 1e-2,
    "num_members": 3,
    "alpha": 0.0,
    "member_init_std": 0.05,
    "per_device_train_batch_size": 2,
    "max_steps": 6,
    "save_strategy": "no",
    "gradient_checkpointing": False,
}


def dataset(kind: str) -> Dataset:
    if kind == "sft":
        return Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def build_trainer(kind: str, output_dir, tokenizer=None, model=None, train_dataset=None, **overrides):
    """A RenyiSFTTrainer / RenyiDPOTrainer on the tiny Llama (init std 0.5, seed 0) with :data:`COMMON` settings,
    trained on :func:`dataset` unless ``train_dataset`` is given."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = model if model is not None else tiny_llama(tokenizer, seed=0, init_std=0.5)
    settings = {**COMMON, **overrides}
    if kind == "sft":
        config_cls, trainer_cls = RenyiSFTConfig, RenyiSFTTrainer
    elif kind == "dpo":
        config_cls, trainer_cls = RenyiDPOConfig, RenyiDPOTrainer
    else:
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}.")
    args = config_cls(output_dir=str(output_dir), **settings)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset if train_dataset is not None else dataset(kind),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def member_weights(trainer) -> dict[str, torch.Tensor]:
    """Every member's LoRA weights by parameter name (contiguous CPU copies)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        name: param.detach().cpu().contiguous().clone()
        for name, param in model.named_parameters()
        if ".member_" in name and "lora_" in name
    }


class PauseAfterStep(TrainerCallback):
    """Mark ``output_dir/paused`` at the end of optimizer step ``step`` and wait there to be killed."""

    def __init__(self, step: int, output_dir: str):
        self.step, self.output_dir = step, output_dir

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            Path(self.output_dir, "paused").write_text(str(os.getpid()))
            time.sleep(600)


def run_pause(opts) -> None:
    trainer = build_trainer(opts.kind, opts.output_dir, save_strategy="steps", save_steps=opts.save_steps)
    trainer.add_callback(PauseAfterStep(opts.pause_after_step, opts.output_dir))
    trainer.train()
    raise SystemExit("training finished without being interrupted")


def run_distributed(opts) -> None:
    overrides = json.loads(opts.overrides) if opts.overrides else {}
    for kind in opts.kind.split(","):  # several trainers, one after the other, in the same processes
        out = Path(opts.output_dir) / kind
        trainer = build_trainer(kind, out, **overrides)
        trainer.train()
        rank = trainer.args.process_index
        report = {
            "rank": rank,
            "world_size": trainer.args.world_size,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "pid": os.getpid(),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "alphas": [entry["renyi/alpha"] for entry in trainer.state.log_history if "renyi/alpha" in entry],
            "auto_alpha": trainer.auto_alpha.resolution.to_dict() if trainer.auto_alpha.resolution else None,
        }
        save_file(member_weights(trainer), str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps(report))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["pause", "distributed"])
    parser.add_argument("--kind", default="sft", help="sft or dpo; for `distributed`, a comma-separated list")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--pause-after-step", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--overrides", default="", help="JSON object of extra config fields")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    if opts.job == "pause":
        run_pause(opts)
    else:
        run_distributed(opts)


if __name__ == "__main__":
    main()
